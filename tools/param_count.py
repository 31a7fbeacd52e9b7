"""Parameter counts of a model preset, built on the meta device (no memory, any size).

    python tools/param_count.py model=mimo_v2_flash

Prints one JSON line: {"model", "total", "active_per_token", "mtp"}.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> dict:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = [a for a in argv if "=" not in a] + sorted(set(args) - {"model"})
    if bad:
        raise SystemExit(f"unknown argument(s) {bad}; usage: python tools/param_count.py model=<preset>")

    from mimo_train.model.config import ModelConfig
    from mimo_train.model.params import count_parameters
    from mimo_train.parallel.setup import init_distributed

    name = args.get("model", "mimo_v2_flash")
    init_distributed()
    counts = {"model": name, **count_parameters(ModelConfig.preset(name))}
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main(sys.argv[1:])
