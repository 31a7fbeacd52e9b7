"""RL settings that would silently train on wrong numbers are refused before any work."""

import pytest

from mimo_train.training.config import ConfigError, load_config

BASE = ["recipe=grpo", "model=tiny", "train.global_batch=8", "rl.prompts_per_step=4", "rl.group_size=2"]


@pytest.mark.parametrize("override,message", [
    ("rl.top_p=0.9", "rl.top_p must be 1"),
    ("parallel.recompute=full", "recompute=full is not supported with routing replay"),
    ("rl.temperature=0", "rl.temperature must be > 0"),
    ("rl.algorithm=mopd", "needs rl.algorithm=grpo"),
    # tiny has 3 MTP layers: a deeper draft would fail inside the rollout engine, mid-run.
    ("rl.spec_depth=4", r"rl.spec_depth=4 is more than the model's 3 MTP layers .*set rl.spec_depth to 0..3"),
    ("rl.spec_depth=deep", r"rl.spec_depth='deep': use an int >= 0 .*, null .* or auto"),
    # A vLLM server drafts at the depth it was started with: auto cannot move it per step.
    ("rl.spec_depth=auto rollout=vllm", r"rl.spec_depth=auto needs rollout.backend=native"),
    # vLLM (and our plugin) chain the MTP layers: drafts of a target_hidden model would be wrong.
    ("model.mtp_feed=target_hidden rollout=vllm", r"model.mtp_feed=target_hidden drafts only with rollout.backend=native"),
    ("rl.distill_loss=kl", r"rl.distill_loss='kl': use one of sampled, full, topk"),
    ("rl.distill_loss=topk", r"rl.distill_loss=topk distills from teachers: it needs rl.algorithm=mopd"),
    ("model.mtp_feed=sideways", r"mtp_feed must be one of \('chained', 'target_hidden'\), got 'sideways'"),
])
def test_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE + override.split())


def test_full_distillation_needs_in_process_teachers():
    """The whole distribution at every token is too much to send: a served teacher sends top-k."""
    for where in ("server:'http://127.0.0.1:9'", "vllm:true"):
        with pytest.raises(ConfigError, match="rl.distill_loss=full needs every teacher in-process"):
            load_config(["recipe=mopd", "model=tiny", "rl.distill_loss=full",
                         f"rl.teachers=[{{name:a,domain:sort,checkpoint:x,{where}}}]"])
    assert load_config(["recipe=mopd", "model=tiny", "rl.distill_loss=topk",
                        "rl.teachers=[{name:a,domain:sort,checkpoint:x,vllm:true}]"]).rl.distill_loss == "topk"


def test_mopd_needs_one_teacher_per_domain():
    with pytest.raises(ConfigError, match="more than one teacher for domain"):
        load_config(["recipe=mopd", "model=tiny",
                     "rl.teachers=[{name:a,domain:sort,checkpoint:x},{name:b,domain:sort,checkpoint:y}]"])
    with pytest.raises(ConfigError, match="MOPD's advantage already is"):
        load_config(["recipe=mopd", "model=tiny", "rl.kl_coef=0.1"])


@pytest.mark.parametrize("depth,value", [("0", 0), ("3", 3), ("null", None), ("auto", "auto")])
def test_spec_depth_up_to_the_mtp_layers_or_auto(depth, value):
    assert load_config(BASE + [f"rl.spec_depth={depth}"]).rl.spec_depth == value


def test_target_hidden_rolls_out_on_vllm_without_drafts_or_natively():
    assert load_config(BASE + ["model.mtp_feed=target_hidden", "rollout=vllm", "rl.spec_depth=0"]).model.mtp_feed \
        == "target_hidden"
    assert load_config(BASE + ["model.mtp_feed=target_hidden"]).rollout.backend == "native"
