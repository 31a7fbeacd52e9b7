"""mimo-train: MiMo-V2-Flash-style models under Megatron parallelism."""

from mimo_train.model import megatron_jit
from mimo_train.model.config import ModelConfig

megatron_jit.install()  # before anything imports megatron-core (see the module)


def load_hf(path, **kwargs):
    """Load a serving-format (or transformers `save_pretrained`) directory as our model; see
    `mimo_train.model.load.load_hf`."""
    from mimo_train.model.load import load_hf as _load_hf

    return _load_hf(path, **kwargs)


__all__ = ["ModelConfig", "load_hf"]
