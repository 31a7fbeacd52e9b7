"""Every step's metrics reach metrics.jsonl (per-depth loss and accuracy, router load and
entropy, throughput), and a run ends with a PNG of the loss curves."""

from tests.training.runs import metrics


def test_metrics_and_plot(reference_run):
    rows = metrics(reference_run)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for key in ("loss/main", "loss/mtp_1", "loss/mtp_2", "loss/mtp_3", "acc/main", "acc/mtp_3", "grad_norm",
                "lr", "tokens_per_s", "moe/load_imbalance", "moe/router_entropy", "moe/expert_load"):
        assert key in rows[6], key
    assert set(rows[6]["moe/expert_load"]) == {f"layer_{i}" for i in range(1, 6)}  # tiny: layer 0 is dense
    assert abs(sum(rows[6]["moe/expert_load"]["layer_1"]) - 1) < 1e-3
    assert rows[6]["loss/main"] < rows[1]["loss/main"]
    png = reference_run / "loss.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
