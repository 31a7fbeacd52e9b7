"""The demo: build the `small` model, train it a few steps with the MTP loss, print the table.

    make demo        (or: python tools/demo.py [steps=40])

Data is synthetic and made here (a copy task: random tokens, then the same tokens again), so
nothing is downloaded. Later issues grow this into the whole pipeline.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm


def main(argv: list[str]) -> list[dict]:
    args = dict(a.split("=", 1) for a in argv)
    steps = int(args.get("steps", 40))
    from mimo_train.data.copy_task import copy_batch
    from mimo_train.model.config import ModelConfig
    from mimo_train.model.gpt import build_model
    from mimo_train.model.params import count_parameters
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.training.loss import lm_loss

    console = Console()
    init_distributed(seed=0)
    cfg = ModelConfig.preset("small")
    counts = count_parameters(cfg)
    console.print(f"[bold]small[/] model: {counts['total']:,} parameters, {counts['active_per_token']:,} active "
                  f"per token, {counts['mtp']:,} in {cfg.num_nextn_predict_layers} MTP layers")
    release = count_parameters(ModelConfig.preset("mimo_v2_flash"))
    console.print(f"[bold]mimo_v2_flash[/] preset: {release['total'] / 1e9:.1f}B total, "
                  f"{release['active_per_token'] / 1e9:.1f}B active per token, {release['mtp'] / 1e9:.2f}B MTP")

    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    history, start = [], time.time()
    for step in (bar := tqdm(range(1, steps + 1), desc="train small")):
        ids, labels, mask = copy_batch(32, 16, 24, gen)
        loss, metrics = lm_loss(model(ids, labels=labels, loss_mask=mask), mtp_weight=0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"step": step, **metrics})
        bar.set_postfix(loss=f"{metrics['loss/main']:.3f}", mtp1=f"{metrics['loss/mtp_1']:.3f}")

    depths = ["main"] + [f"mtp_{k}" for k in range(1, cfg.num_nextn_predict_layers + 1)]
    table = Table(title=f"small model, copy task, {steps} steps in {time.time() - start:.0f}s")
    table.add_column("step", justify="right")
    for d in depths:
        table.add_column(f"loss {d}", justify="right")
    for d in depths:
        table.add_column(f"acc {d}", justify="right")
    for row in history:
        if row["step"] in (1, steps) or row["step"] % 10 == 0:
            table.add_row(str(row["step"]), *[f"{row[f'loss/{d}']:.3f}" for d in depths],
                          *[f"{row[f'acc/{d}']:.2f}" for d in depths])
    console.print(table)
    return history


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main(sys.argv[1:])
