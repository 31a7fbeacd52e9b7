"""trainer.backend=deepspeed: a transformers causal LM trained under DeepSpeed ZeRO as the megatron
path trains ours: the same step on any number of ranks and either ZeRO stage, the same update as
plain PyTorch AdamW, bit-exact resume after kill -9, skipped non-finite steps, and one error line
for a student it cannot train."""

import json
import math
import shutil

import pytest
import torch

from mimo_train.run import main
from tests.training.runs import kill_once_logged, launch, metrics, tool, train


@pytest.fixture(scope="module")
def student(synthetic_data, tmp_path_factory):
    """A tiny transformers Llama on the synthetic data's tokenizer (vocab 256, as the tiny MiMo)."""
    return tool("make_student").make(tmp_path_factory.mktemp("student") / "llama", arch="llama",
                                     tokenizer=synthetic_data / "tokenizer")


# DeepSpeed keeps parameters under 1e5 elements whole on every rank under ZeRO-3 (its default
# persistence threshold): all of a tiny model's. 0 partitions every one, as a large model's are.
PARTITION_ALL = "+trainer.ds_config.zero_optimization.stage3_param_persistence_threshold=0"


def ds_args(data, student, run_dir, *extra, steps: int = 3) -> list[str]:
    return ["recipe=pretrain", "trainer=deepspeed", f"trainer.model_dir={student}", PARTITION_ALL, f"train.steps={steps}",
            "train.global_batch=8", "train.micro_batch=2", "optim.warmup_steps=1", "data.seq_len=64",
            f"data.path={data}/train.jsonl", f"data.tokenizer={data}/tokenizer", f"logging.run_dir={run_dir}",
            "logging.progress=false", "logging.plot=false", *extra]


@pytest.fixture(scope="module")
def one_process(synthetic_data, student, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ds_one")
    train(ds_args(synthetic_data, student, run_dir, "trainer.zero_stage=2"))
    return metrics(run_dir)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_give_the_one_process_losses(synthetic_data, student, one_process, tmp_path, stage):
    train(ds_args(synthetic_data, student, tmp_path, f"trainer.zero_stage={stage}"), nproc=2)
    ours = metrics(tmp_path)
    assert sorted(ours) == [1, 2, 3]
    for step in ours:
        for key in ("loss/main", "grad_norm"):
            assert ours[step][key] == pytest.approx(one_process[step][key], rel=1e-5), (step, key)
    assert one_process[3]["loss/main"] < one_process[1]["loss/main"]  # it trains


def test_optimizer_offload_gives_the_same_losses(synthetic_data, student, one_process, tmp_path, megatron_single):
    """ZeRO-Offload: optimizer state and step on the CPU (DeepSpeed's CPUAdam, built at first use)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from mimo_train.training.config import load_config
    from mimo_train.training.deepspeed_trainer import DeepSpeedTrainer

    args = ds_args(synthetic_data, student, tmp_path, "trainer.zero_stage=2", "trainer.offload_optimizer=true")
    engine = DeepSpeedTrainer(load_config(args), layout=None).engine
    assert engine.zero_cpu_offload() and isinstance(engine.optimizer.optimizer, DeepSpeedCPUAdam)
    train(args)
    ours = metrics(tmp_path)
    for step in ours:
        assert ours[step]["loss/main"] == pytest.approx(one_process[step]["loss/main"], rel=1e-6), step


def _documents(mb: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(tokens, labels, mask) of each document of a packed row, cut at `cu_seqlens`."""
    cu = mb["cu_seqlens"].tolist()
    return [(mb["tokens"][:, a:b], mb["labels"][:, a:b], mb["loss_mask"][:, a:b].float()) for a, b in zip(cu, cu[1:])]


def test_one_step_is_plain_pytorch_adamw_on_the_transformers_model(synthetic_data, student, tmp_path, megatron_single):
    """One optimizer step (clipping active, weight decay on matrices only) equals torch AdamW on
    transformers' model fed one document at a time: packing, loss scaling, groups and clipping
    all agree. The probe's logits after the step are compared."""
    from transformers import AutoModelForCausalLM

    from mimo_train.data.dataset import DataLoader, PackedDataset
    from mimo_train.training.config import load_config
    from mimo_train.training.deepspeed_trainer import DeepSpeedTrainer

    config = load_config(ds_args(synthetic_data, student, tmp_path, "trainer.zero_stage=2", "optim.warmup_steps=0",
                                 "optim.schedule=constant", "optim.lr=1e-2", "optim.min_lr=1e-2",
                                 "optim.weight_decay=0.1", "optim.clip_grad=0.5"))
    batch = DataLoader(PackedDataset(config.data), global_batch=8, micro_batch=2, dp_rank=0,
                       dp_size=1).next_global_batch()
    trainer = DeepSpeedTrainer(config, layout=None)
    result = trainer.train_step(batch)

    ref = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    groups = [{"params": [p for p in ref.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    docs = [d for mb in batch for d in _documents(mb)]
    total = sum(float(m.sum()) for _, _, m in docs)
    loss = 0.0
    for tokens, labels, mask in docs:
        logits = ref(input_ids=tokens).logits
        ce = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
        loss = loss + (ce * mask[0]).sum() / total
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt.step()

    assert result.metrics["loss/main"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert result.metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert float(norm) > 0.5  # the clip was active
    probe = batch[0]["tokens"][:, :32]
    with torch.no_grad():
        ours, theirs = trainer.engine.module(input_ids=probe).logits, ref(input_ids=probe).logits
        before = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)(input_ids=probe).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert (before - theirs).abs().max() > 100 * 1e-5  # control: the step moved the logits far more


def test_kill_9_then_resume_is_bit_exact(synthetic_data, student, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    args = lambda d: ds_args(synthetic_data, student, d, "checkpoint.every=1", steps=6)  # noqa: E731
    train(args(ref_dir))
    proc = launch(args(run_dir), wait=False)
    kill_once_logged(proc, run_dir, step=3)
    assert (run_dir / "checkpoints" / "latest").exists()
    assert "resumed from" in train(args(run_dir))
    ours, ref = metrics(run_dir), metrics(ref_dir)
    assert sorted(ours) == [1, 2, 3, 4, 5, 6]
    for step in ours:
        for key in ("loss/main", "grad_norm", "lr"):
            assert ours[step][key] == ref[step][key], (step, key)


def test_non_finite_steps_are_skipped_then_the_run_stops(capsys, monkeypatch, synthetic_data, student, tmp_path,
                                                         megatron_single):
    from mimo_train.training.deepspeed_trainer import DeepSpeedTrainer

    original = DeepSpeedTrainer._lm_loss

    def poisoned(self, count, mb):
        loss, sums = original(self, count, mb)
        return (loss * float("nan"), sums) if self.step + 1 in (2, 3) else (loss, sums)

    monkeypatch.setattr(DeepSpeedTrainer, "_lm_loss", poisoned)
    code = main(ds_args(synthetic_data, student, tmp_path, "checkpoint.every=1", "train.max_skipped_steps=1", steps=4))
    assert code == 2
    assert "max_skipped_steps" in capsys.readouterr().err
    rows = metrics(tmp_path)
    assert [rows[s]["skipped"] for s in (1, 2, 3)] == [0, 1, 1]
    assert math.isnan(rows[2]["grad_norm"]) or math.isinf(rows[2]["grad_norm"])
    assert rows[2]["lr"] == rows[3]["lr"]  # the schedule does not advance on a skipped step
    # Step 2 was skipped within the allowance (and saved); step 3 went past it: nothing saved after step 2.
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_0000002"


def _error_line(capsys) -> str:
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_student_without_safetensors_is_refused(capsys, synthetic_data, student, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(student, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert main(ds_args(synthetic_data, pickled, tmp_path / "run")) == 2
    line = _error_line(capsys)
    assert "no *.safetensors" in line and "pytorch_model.bin" in line and "safe_serialization=True" in line


def test_a_student_needing_remote_code_is_refused(capsys, synthetic_data, student, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(student, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    assert main(ds_args(synthetic_data, remote, tmp_path / "run")) == 2
    assert "trust_remote_code" in _error_line(capsys)


def test_megatron_only_settings_are_refused_by_name(capsys, synthetic_data, student, tmp_path):
    assert main(ds_args(synthetic_data, student, tmp_path, "parallel.tp=2")) == 2
    assert "parallel.tp" in _error_line(capsys)
