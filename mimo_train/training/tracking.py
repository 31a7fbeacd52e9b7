"""Where metrics go: `metrics.jsonl` in the run directory, W&B, a progress line, PNG plots.

Only global rank 0 tracks; the other ranks get a `Tracker` that does nothing, so call sites
need no rank checks. W&B runs offline by default (`logging.wandb_mode`); the WANDB_MODE
environment variable wins, so tests set it to `disabled`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from tqdm import tqdm


# The progress bar's postfix: key in the metrics -> label.
_SHOWN = {"loss/main": "main", "loss/mtp_1": "mtp_1", "reward/mean": "reward", "rollout/accept_length": "accept"}


class Tracker:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, config: dict,
                 wandb_project: str, wandb_mode: str, progress: bool, name: str):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._wandb = None
        self._bar = None
        self._t0 = time.time()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        mode = os.environ.get("WANDB_MODE", wandb_mode)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=name, dir=str(self.run_dir), mode=mode,
                                     config=config, resume="allow", id=_run_id(self.run_dir))
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            # RL runs have no main-depth loss; their reward and accept length are what to watch.
            shown = {label: f"{metrics[k]:.3f}" for k, label in _SHOWN.items() if isinstance(metrics.get(k), float)}
            if "tokens_per_s" in metrics:
                shown["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            self._bar.set_postfix(shown)

    def message(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _run_id(run_dir: Path) -> str:
    """A W&B id stored in the run directory, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of metrics.jsonl; for a resumed run, the latest row of each step wins."""
    rows = {}
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """PNG of the main and every MTP depth's loss (and top-1 accuracy) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = sorted({k for r in rows for k in r if k.startswith("loss/") and k != "loss/total"},
                  key=lambda k: (k != "loss/main", k))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key in keys:
        steps = [r["step"] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        ax_loss.plot(steps, [r[key] for r in rows if r["step"] in set(steps)], label=key.split("/")[1])
        acc = key.replace("loss/", "acc/")
        ax_acc.plot(steps, [r.get(acc, float("nan")) for r in rows if r["step"] in set(steps)],
                    label=acc.split("/")[1])
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss per depth", yscale="log")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="next-token accuracy per depth")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out or Path(run_dir) / "loss.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
