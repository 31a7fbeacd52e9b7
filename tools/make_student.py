"""Write a small transformers causal LM, randomly initialised, as a serving directory: a student
for trainer=deepspeed to try without downloading anything (tests and docs/deepspeed.md use it).

    python tools/make_student.py --arch llama --tokenizer data/synthetic_sft/tokenizer --out students/llama
    python tools/make_student.py --arch qwen2 --vocab-from runs/teacher_sort/checkpoints --tokenizer ... --out students/qwen

The directory holds config.json, model.safetensors and the tokenizer's files: what
`save_pretrained` writes for a real model, which is what trainer.model_dir takes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = {  # transformers' config and model classes, by the name this tool takes
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def make(out: Path, *, arch: str = "llama", tokenizer: Path, vocab_size: int = 256, hidden: int = 128, layers: int = 2,
         heads: int = 4, kv_heads: int = 2, intermediate: int = 128, max_positions: int = 4096, seed: int = 0,
         tie: bool = False) -> Path:
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: one of {', '.join(ARCHS)}")
    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tokenizer))
    if vocab_size < len(tok):
        raise ValueError(f"--vocab-size {vocab_size} is below the tokenizer's {len(tok)} tokens")
    config = config_cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=max_positions, tie_word_embeddings=tie,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = model_cls(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(tokenizer).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


def vocab_of(path: Path) -> int:
    """The vocabulary size of a training checkpoint or a serving directory."""
    import json

    from mimo_train.training import checkpoint

    path = Path(path)
    if (path / "config.json").is_file():
        return int(json.loads((path / "config.json").read_text())["vocab_size"])
    iter_dir = checkpoint.latest(path) if (path / "latest").exists() else path
    return int(checkpoint.read_state(iter_dir)["model"]["vocab_size"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    ap.add_argument("--tokenizer", required=True, type=Path, help="tokenizer dir (tools/make_data.py writes one)")
    ap.add_argument("--out", required=True, type=Path)
    vocab = ap.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-size", type=int, default=256, help="match the teachers' (MOPD checks it)")
    vocab.add_argument("--vocab-from", type=Path, help="a training checkpoint (dir with `latest`, or iter_*) or serving "
                       "dir whose vocabulary size to take: a student for that model's teachers")
    ap.add_argument("--hidden", type=int, default=128, help="with --heads 4: head dim 32, a size vLLM serves on CPU")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    vocab_size = vocab_of(a.vocab_from) if a.vocab_from else a.vocab_size
    out = make(a.out, arch=a.arch, tokenizer=a.tokenizer, vocab_size=vocab_size, hidden=a.hidden, layers=a.layers,
               heads=a.heads, kv_heads=a.kv_heads, intermediate=a.intermediate, seed=a.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
