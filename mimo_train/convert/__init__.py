"""Checkpoint conversion: training checkpoints (megatron dist_checkpointing, any layout) to and
from the serving format (docs/export.md), with optional block FP8.

    export_checkpoint(ckpt, out, dtype="bf16", shard_size="5GB", tokenizer=...)  # tools/export.py
    import_serving(hf_dir, out, tp=1, pp=1, ep=1)                                  # tools/import_hf.py

Modules: names (the three naming schemes, shapes from the config), dist_reader (a training
checkpoint read in one process), serving / serving_reader (the serving directory, written and
read), fp8 (block-wise e4m3), exporter, importer, verify (logits against the training model),
atomic (outputs that appear complete or not at all).
"""

from mimo_train.convert.names import ConvertError


def export_checkpoint(*args, **kwargs):
    from mimo_train.convert.exporter import export_checkpoint as _export

    return _export(*args, **kwargs)


def import_serving(*args, **kwargs):
    from mimo_train.convert.importer import import_serving as _import

    return _import(*args, **kwargs)


__all__ = ["ConvertError", "export_checkpoint", "import_serving"]
