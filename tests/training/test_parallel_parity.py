"""Every parallel layout trains like one process: the same losses (per depth) for the first 3
steps, fp32, relative difference <= 1e-5, on the tiny MoE + MTP model on gloo ranks (launched
as torchrun would, forked from the suite's zygote: tests/training/runs.py's `launch`)."""

import shutil

import pytest

from tests.training.runs import LOSSES, launch, metrics, tiny_args, train

# Every dimension at least once, each launch a different code path: TP and EP (MoE under TP
# switches sequence parallel on) are parts of tp2_ep2_dp2; 1F1B without and with interleaving;
# DP alone for the resume below. (A launch costs ~30 s of the suite's CPU on 2 cores: tp2 and ep2
# alone would repeat what tp2_ep2_dp2 runs.)
LAYOUTS = {  # name: (world size, overrides)
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, []),
    "tp2_ep2_dp2": (4, ["parallel.tp=2", "parallel.ep=2"]),
    # interleaved 1F1B is supported with exactly pp micro-batches per step (see layout.py)
    "tp2_pp2_vpp3": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.vpp=3", "train.micro_batch=4"]),
}


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.fixture(scope="module")
def layout_runs(synthetic_data, initial_weights, tmp_path_factory):
    runs = {}
    for name, (world, overrides) in LAYOUTS.items():
        run_dir = tmp_path_factory.mktemp(name)
        train(tiny_args(synthetic_data, run_dir, "train.stop_at=3", *overrides, init=initial_weights), nproc=world)
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(name, layout_runs, reference_run):
    ours, ref = metrics(layout_runs[name]), metrics(reference_run)
    assert sorted(ours) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in LOSSES:
            assert close(ours[step][key], ref[step][key]), (name, step, key, ours[step][key], ref[step][key])


def test_resume_under_another_data_parallel_size(layout_runs, reference_run, synthetic_data, initial_weights):
    """The DP=2 run's step-3 checkpoint (distributed optimizer, fully reshardable) continues
    in one process and follows the one-process run."""
    dp2 = layout_runs["dp2"]
    out = train(tiny_args(synthetic_data, dp2, init=initial_weights))
    assert "resumed from" in out and "iter_0000003" in out
    ours, ref = metrics(dp2), metrics(reference_run)
    for step in (4, 5, 6):
        for key in LOSSES:
            assert close(ours[step][key], ref[step][key]), (step, key, ours[step][key], ref[step][key])


def test_resume_between_ep2_and_one_process_is_refused_in_one_line(layout_runs, synthetic_data, initial_weights,
                                                                   tmp_path):
    """megatron gives the experts' optimizer state a shape of its own under EP>1: a resume into
    EP=1 cannot load it, and says so (and what to do) instead of a KeyError traceback."""
    run = shutil.copytree(layout_runs["tp2_ep2_dp2"], tmp_path / "run")
    code, out = launch(tiny_args(synthetic_data, run, init=initial_weights))
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, out[-3000:]
    assert "parallel.ep=2" in errors[0] and "parallel.ep=1" in errors[0] and "checkpoint.load" in errors[0]
    assert "Traceback" not in out
