"""The demo: synthetic verifiable tasks -> pretrain the `small` model with MTP -> results table.

    make demo        (or: python tools/demo.py [steps=60] [out=runs/demo])

Everything is made here (data from the task generators, a character tokenizer), so nothing
is downloaded. The run is the pretrain recipe, exactly as `mimo_train/run.py` runs it, so its
checkpoints, metrics.jsonl and loss.png are under <out>/pretrain.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "tools" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make


def main(argv: list[str]) -> list[dict]:
    args = dict(a.split("=", 1) for a in argv)
    steps = int(args.get("steps", 60))
    out = Path(args.get("out", "runs/demo"))
    from rich.console import Console
    from rich.table import Table

    from mimo_train.model.config import ModelConfig
    from mimo_train.model.params import count_parameters
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.run import main as run
    from mimo_train.training.tracking import read_metrics

    console = Console()
    init_distributed(seed=0)  # a one-process group: the parameter count builds the model
    cfg = ModelConfig.preset("small")
    counts = count_parameters(cfg)
    console.print(f"[bold]small[/] model: {counts['total']:,} parameters, {counts['active_per_token']:,} active "
                  f"per token, {counts['mtp']:,} in {cfg.num_nextn_predict_layers} MTP layers")
    release = count_parameters(ModelConfig.preset("mimo_v2_flash"))
    console.print(f"[bold]mimo_v2_flash[/] preset: {release['total'] / 1e9:.1f}B total, "
                  f"{release['active_per_token'] / 1e9:.1f}B active per token, {release['mtp'] / 1e9:.2f}B MTP")

    data = out / "data"
    if not (data / "train.jsonl").exists():
        summary = _make_data()(data, kind="pretrain", n=3000, n_eval=100, seed=0)
        console.print(f"data: {summary['train_rows']} rows of {', '.join(summary['domains'])} in {data}")
    run_dir = out / "pretrain"
    start = time.time()
    code = run(["recipe=pretrain", "model=small", f"train.steps={steps}", "train.global_batch=8",
                "train.micro_batch=4", "data.seq_len=128", f"data.path={data}/train.jsonl",
                f"data.tokenizer={data}/tokenizer", f"logging.run_dir={run_dir}", "checkpoint.every=50",
                f"optim.warmup_steps={min(10, steps - 1)}"])
    if code:
        raise SystemExit(code)

    rows = read_metrics(run_dir)
    depths = ["main"] + [f"mtp_{k}" for k in range(1, cfg.num_nextn_predict_layers + 1)]
    table = Table(title=f"pretrain small on synthetic tasks: {rows[-1]['step']} steps, {time.time() - start:.0f}s "
                        f"(top-1 accuracy of each depth: main predicts t+1, mtp_k predicts t+1+k)")
    table.add_column("step", justify="right")
    for d in depths:
        table.add_column(f"loss {d}", justify="right")
    for d in depths:
        table.add_column(f"acc {d}", justify="right")
    shown = {1, rows[-1]["step"]} | {r["step"] for r in rows if r["step"] % max(1, steps // 6) == 0}
    for row in rows:
        if row["step"] in shown:
            table.add_row(str(row["step"]), *[f"{row[f'loss/{d}']:.3f}" for d in depths],
                          *[f"{row[f'acc/{d}']:.2f}" for d in depths])
    console.print(table)
    console.print(f"loss curves: {run_dir / 'loss.png'}   metrics: {run_dir / 'metrics.jsonl'}   "
                  f"checkpoints: {run_dir / 'checkpoints'}")
    return rows


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "offline")
    main(sys.argv[1:])
