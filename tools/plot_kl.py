"""Per-domain KL curves of MOPD runs, one panel per domain and one line per run: how far the
student still is from each teacher, step by step (docs/experiments.md's MOPD trials).

    python tools/plot_kl.py RUN_DIR [RUN_DIR ...] --out kl.png [--key distill/kl] [--smooth 8]

--key distill/kl (default) is the exact per-token KL(student || teacher) that `rl.distill_loss`
full and topk log (over the top-k set for topk); teacher_kl is the sampled tokens' gap
log pi_student - log pi_teacher, logged by every MOPD run. Each curve is the mean over a window
of --smooth steps (a step's value rests on a few dozen samples). Labels are the run directories'
names. Bad input (no metrics, no such key) is one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def curves(run_dir: Path, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """{domain: (steps, values)} of `key/<domain>` in the run's metrics.jsonl."""
    from mimo_train.training.tracking import read_metrics

    if not (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"{run_dir} has no metrics.jsonl: pass the run directory of a MOPD run (logging.run_dir)")
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in read_metrics(run_dir):
        for name, value in row.items():
            if name.startswith(key + "/") and isinstance(value, (int, float)):
                steps, values = out.setdefault(name[len(key) + 1:], ([], []))
                steps.append(row["step"])
                values.append(float(value))
    if not out:
        raise ValueError(f"{run_dir}/metrics.jsonl has no {key}/<domain> values: distill/kl needs "
                         f"rl.distill_loss=topk or full; teacher_kl is in every MOPD run")
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(runs: dict[str, dict[str, tuple[list[int], list[float]]]], key: str, window: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({d for per_domain in runs.values() for d in per_domain})
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.6), sharey=True, squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for name, per_domain in runs.items():
            if domain in per_domain:
                steps, values = per_domain[domain]
                ax.plot(steps, smooth(values, window), label=name)
        ax.set(title=domain, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{key} (nats/token, mean of {window} steps)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--key", default="distill/kl")
    parser.add_argument("--smooth", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        if args.smooth < 1:
            raise ValueError(f"--smooth {args.smooth}: the window is at least 1 step")
        runs = {run.name: curves(run, args.key) for run in args.runs}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plot(runs, args.key, args.smooth, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
