"""`CheckpointCallback` with a real `transformers.Trainer`: exact resume across processes, retention,
deployable consolidated weights, weight sync, and clear errors on wrong use."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import _trainer_run as R
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainerState, TrainingArguments

from hf_rl_ckpt import CheckpointCallback, CheckpointConfig, CheckpointError, CheckpointManager, StateMismatchError, verify_checkpoint
from hf_rl_ckpt.layout import CheckpointLayout
from hf_rl_ckpt.retention import RetentionPolicy
from hf_rl_ckpt.testing import tiny
from hf_rl_ckpt.testing.families import build_family
from hf_rl_ckpt.weight_sync import publish

INPUT_IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 8]])


def checkpoint_callback(trainer: Trainer) -> CheckpointCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CheckpointCallback))


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def small_trainer(tmp_path: Path, config: CheckpointConfig | None, model: torch.nn.Module | None = None, **args) -> Trainer:
    """A few-step Trainer on the tiny model (with a CheckpointCallback for `config`), for tests that need no exact-resume comparison."""
    tok = tiny.build_tokenizer()
    arguments = TrainingArguments(str(tmp_path / "out"), **{**R.COMMON_ARGS, "max_steps": 2, **args})
    return Trainer(
        model=model if model is not None else tiny.build_model("llama", seed=1), args=arguments, processing_class=tok,
        train_dataset=tiny.toy_lm_dataset(tok, n=8, seq_len=16), eval_dataset=tiny.toy_lm_dataset(tok, n=4, seq_len=16, seed=2),
        callbacks=[CheckpointCallback(config)] if config else [],
    )


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """An uninterrupted 10-step run, and the same run killed right after its step-4 checkpoint and resumed in a new process."""
    work = tmp_path_factory.mktemp("causal")
    spec = {"kind": "causal", "work_dir": str(work)}
    killed = R.start([{**spec, "ckpt_dir": str(work / "ckpt"), "out_dir": str(work / "killed"), "kill_after_save": 4}])
    reference = R.run({**spec, "ckpt_dir": str(work / "ref_ckpt"), "out_dir": str(work / "ref")})
    R.finish(killed)
    committed_at_kill = sorted(CheckpointLayout(work / "ckpt").committed_steps())
    R.finish(R.start([{**spec, "ckpt_dir": str(work / "ckpt"), "out_dir": str(work / "resumed")}]))
    return SimpleNamespace(
        work=work, spec=spec, trainer=reference, reference=R.result(work / "ref"), resumed=R.result(work / "resumed"),
        committed_at_kill=committed_at_kill,
    )


def test_killed_run_resumes_exactly(causal):
    # The first process died mid-run: it never wrote its result, and step 4 was its newest checkpoint.
    assert not (causal.work / "killed" / "result.json").exists()
    assert causal.committed_at_kill[-1] == 4
    assert causal.resumed["global_step"] == causal.reference["global_step"] == 10
    expected = R.losses(causal.reference["log_history"])
    assert [step for step, _, _ in expected] == [1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 10]
    assert R.losses(causal.resumed["log_history"]) == expected  # dropout, shuffling, grad accumulation, an epoch boundary
    R.assert_same_weights(causal.resumed["weights"], causal.reference["weights"])


def test_sigterm_saves_the_step_reached_exits_0_and_the_rerun_resumes_exactly(causal, tmp_path):
    """save_on_preemption (the default): a SIGTERM during step 5 (not a save_period step) saves step 5, stops, exits 0."""
    ckpt = str(tmp_path / "ckpt")
    R.finish(R.start([{**causal.spec, "ckpt_dir": ckpt, "out_dir": str(tmp_path / "signalled"), "sigterm_during": 5}]))
    assert json.loads((tmp_path / "signalled" / "result.json").read_text())["global_step"] == 5
    assert CheckpointLayout(ckpt).latest().name == "step_5"
    R.finish(R.start([{**causal.spec, "ckpt_dir": ckpt, "out_dir": str(tmp_path / "resumed")}]))
    resumed = R.result(tmp_path / "resumed")
    assert resumed["global_step"] == 10
    assert R.losses(resumed["log_history"]) == R.losses(causal.reference["log_history"])
    R.assert_same_weights(resumed["weights"], causal.reference["weights"])


def test_keeps_top_k_by_eval_loss_plus_newest(causal):
    evals = {e["step"]: e["eval_loss"] for e in causal.resumed["log_history"] if "eval_loss" in e}
    rows = CheckpointManager(CheckpointConfig(checkpoint_dir=str(causal.work / "ckpt"))).checkpoints()
    expected = RetentionPolicy(2, "eval_loss", higher_is_better=False).retained({**{s: None for s in (2, 4, 8)}, **evals})
    assert {row.step for row in rows} == expected
    for row in rows:
        if row.step in evals:
            assert row.metrics["eval_loss"] == evals[row.step]


def test_checkpoint_loads_with_from_pretrained_bit_exact(causal):
    folder = checkpoint_callback(causal.trainer).manager.consolidated_path()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert (logits(loaded) - logits(causal.trainer.model)).abs().max().item() == 0.0
    assert AutoTokenizer.from_pretrained(folder)("3 plus 4")["input_ids"] == tiny.build_tokenizer()("3 plus 4")["input_ids"]


def test_checkpoint_is_pickle_free_and_holds_trainer_state(causal):
    ckpt = checkpoint_callback(causal.trainer).manager.latest()
    verify_checkpoint(ckpt)  # every file is in the manifest, sizes and digests match
    for path in ckpt.rglob("*"):
        if path.is_file():
            assert path.suffix not in {".pt", ".pth", ".bin", ".pkl"}, path
            assert path.read_bytes()[:1] != b"\x80", f"{path} looks like a pickle"
    state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    assert (state.global_step, state.log_history) == (10, causal.trainer.state.log_history)
    # the Trainer skips the consumed batches itself (from trainer_state.json); a data position of ours would skip them twice
    assert not (ckpt / "dataloader").exists()


def test_train_resume_from_checkpoint_accepts_our_checkpoint(causal, tmp_path):
    spec = {
        **causal.spec, "ckpt_dir": str(tmp_path / "ckpt"), "out_dir": str(tmp_path / "out"),
        "checkpointing": {"resume": {"mode": "disable"}}, "train_kwargs": {"resume_from_checkpoint": str(causal.work / "ckpt" / "step_9")},
    }
    R.run(spec)
    again = R.result(tmp_path / "out")
    assert R.losses(again["log_history"]) == R.losses(causal.reference["log_history"])
    R.assert_same_weights(again["weights"], causal.reference["weights"])


@pytest.fixture(scope="module")
def bf16_tied(tmp_path_factory):
    """Three steps of a bf16 model with tied embeddings, small shards and a weight sync every step."""
    tmp = tmp_path_factory.mktemp("bf16")
    config = CheckpointConfig(checkpoint_dir=str(tmp / "ckpt"), max_shard_size="100KB", sync_weight_path=str(tmp / "serve" / "policy"))
    model = tiny.build_model("qwen2", seed=5, dtype=torch.bfloat16, tie_word_embeddings=True)
    trainer = small_trainer(tmp, config, model=model, max_steps=3)
    trainer.train()
    return SimpleNamespace(tmp=tmp, trainer=trainer, folder=checkpoint_callback(trainer).manager.consolidated_path())


def test_consolidated_folder_is_sharded_tied_once_and_keeps_dtype(bf16_tied):
    folder = bf16_tied.folder
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert "lm_head.weight" not in weight_map and "model.embed_tokens.weight" in weight_map
    for shard in set(weight_map.values()):
        with safe_open(folder / shard, framework="pt") as fh:
            assert {fh.get_slice(key).get_dtype() for key in fh.keys()} == {"BF16"}
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert (logits(loaded).float() - logits(bf16_tied.trainer.model).float()).abs().max().item() == 0.0


def test_sync_weight_path_is_a_link_swapped_to_the_newest_complete_folder(bf16_tied):
    link = bf16_tied.tmp / "serve" / "policy"
    assert link.is_symlink() and Path(os.path.realpath(link)).name == "step_3"
    assert sorted(p.name for p in (link.parent / ".policy.versions").iterdir()) == ["step_2", "step_3"]  # previous kept for readers
    loaded = AutoModelForCausalLM.from_pretrained(os.path.realpath(link))
    assert (logits(loaded).float() - logits(bf16_tied.trainer.model).float()).abs().max().item() == 0.0


def test_sync_weight_path_never_replaces_a_real_folder_nor_a_published_version(tmp_path):
    def write(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"weights")

    (tmp_path / "real").mkdir()
    with pytest.raises(CheckpointError, match="not the symlink"):
        publish(tmp_path / "real", "step_1", write, step=1)
    first = publish(tmp_path / "link", "step_1", write, step=1)
    again = publish(tmp_path / "link", "step_1", write, step=1)  # the same step after a resume: readers may still hold the first
    assert (first.name, again.name) == ("step_1", "step_1-1") and first.is_dir()
    assert Path(os.path.realpath(tmp_path / "link")) == again


# ---------------------------------------------------------------- wrong use
def test_model_without_config_is_refused(tmp_path):
    class Regressor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, labels=None):
            return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}

    with pytest.raises(CheckpointError, match="needs a model with a `config`"):
        small_trainer(tmp_path, CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt")), model=Regressor())


def test_metric_never_logged_is_reported_with_the_logged_ones(tmp_path, caplog):
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), metric_name="eval_accuracy", keep_top_k=1)
    small_trainer(tmp_path, config, eval_strategy="steps", eval_steps=1).train()
    [message] = [r.getMessage() for r in caplog.records if "was never logged" in r.getMessage()]
    assert "'eval_accuracy'" in message and "eval_loss" in message and "loss" in message


def test_resume_into_another_architecture_names_the_keys(causal, tmp_path):
    config = CheckpointConfig(
        checkpoint_dir=str(tmp_path / "ckpt"), resume={"mode": "from_path", "resume_path": str(causal.work / "ckpt" / "step_10")}
    )
    trainer = small_trainer(tmp_path, config, model=tiny.build_model("qwen2", seed=1))
    with pytest.raises(StateMismatchError) as caught:
        trainer.train()
    assert "q_proj.bias" in str(caught.value) and "k_proj.weight (checkpoint [64, 64], model [32, 64])" in str(caught.value)


def test_trainer_checkpointing_also_on_is_flagged(tmp_path, caplog):
    small_trainer(tmp_path, CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt")), save_strategy="steps", save_steps=1)
    assert any("save_strategy" in r.getMessage() and "CheckpointCallback" in r.getMessage() for r in caplog.records)


def test_callback_added_too_late_to_resume_says_so(causal, tmp_path):
    shutil.copytree(causal.work / "ckpt", tmp_path / "ckpt")
    trainer = small_trainer(tmp_path, None)
    trainer.add_callback(CheckpointCallback(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"))))
    with pytest.raises(CheckpointError, match="too late to resume"):
        trainer.train()


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_resume_from_checkpoint_true_resumes_our_newest_checkpoint_exactly(tmp_path, family):
    # The Trainer's own meaning of True (look for checkpoint-N in output_dir) would find nothing here: save_strategy="no".
    # The MoE model is saved one tensor per expert, as save_pretrained does, and resumed into its fused experts (the Trainer's
    # own resume of such a folder, `load_state_dict(strict=False)`, would skip them).
    def model() -> torch.nn.Module:
        return build_family(family, seed=1)

    reference = small_trainer(tmp_path / "ref", None, model=model(), max_steps=4)
    reference.train()
    first = small_trainer(tmp_path / "run", CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), save_period=2), model=model(), max_steps=4)
    first.add_callback(R.StopAt(2))
    first.train()
    config = CheckpointConfig.from_dict({"checkpoint_dir": str(tmp_path / "ckpt"), "resume": {"mode": "disable"}})
    second = small_trainer(tmp_path / "run", config, model=model(), max_steps=4)
    steps_run = []
    second.add_callback(type("Steps", (TrainerCallback,), {"on_step_end": lambda self, args, state, control, **kw: steps_run.append(state.global_step)})())
    second.train(resume_from_checkpoint=True)  # asks to resume even though the config says disable
    assert steps_run == [3, 4]
    assert R.losses(second.state.log_history) == R.losses(reference.state.log_history)
    R.assert_same_weights(second.model.state_dict(), reference.model.state_dict())


def test_two_callbacks_on_one_checkpoint_dir_are_refused(tmp_path):
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), save_period=1)
    tok = tiny.build_tokenizer()
    with pytest.raises(CheckpointError, match="two CheckpointCallbacks on checkpoint_dir"):
        Trainer(
            model=tiny.build_model("llama", seed=1), args=TrainingArguments(str(tmp_path / "out"), **{**R.COMMON_ARGS, "max_steps": 2}),
            train_dataset=tiny.toy_lm_dataset(tok, n=8, seq_len=16), processing_class=tok,
            callbacks=[CheckpointCallback(config), CheckpointCallback(CheckpointConfig(checkpoint_dir=str(tmp_path / "out" / ".." / "ckpt")))],
        )
    assert not (tmp_path / "ckpt").exists()


def test_missing_private_trainer_loader_fails_at_attach_naming_the_version(tmp_path, monkeypatch):
    import transformers

    monkeypatch.delattr(Trainer, "_load_rng_state")  # what a transformers release that renamed it would look like
    with pytest.raises(CheckpointError) as raised:
        small_trainer(tmp_path, CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt")))
    message = str(raised.value)
    assert "_load_rng_state" in message and f"transformers {transformers.__version__}" in message and "hf_rl_ckpt/shims.py" in message


def test_custom_manager_with_exactly_the_protocol_saves_and_resumes_a_trainer(tmp_path):
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), save_period=2, checkpoint_manager_class="test_manager.ProtocolOnlyManager")
    small_trainer(tmp_path, config, max_steps=2).train()
    resumed = small_trainer(tmp_path, config, max_steps=4)
    resumed.train()
    assert resumed.state.global_step == 4
    calls = checkpoint_callback(resumed).manager.calls
    assert calls[0] == "resume" and {"load_optimizer_state", "load_rng_state", "should_save", "save", "finalize"} <= set(calls)
    assert sorted(CheckpointLayout(tmp_path / "ckpt").committed_steps()) == [2, 4]


def test_save_consolidated_final_writes_the_folder_at_the_end_of_training_only(tmp_path):
    """An FSDP2-sharded model (one process) under the Trainer: the callback marks its end-of-training save final."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny.build_model("llama", seed=1)
        fully_shard(model)
        config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), save_period=1, save_consolidated="final")
        trainer = small_trainer(tmp_path, config, model=model, max_steps=3)
        trainer.train()
        trained = {name: tensor.full_tensor().detach().clone() for name, tensor in model.state_dict().items()}
    finally:
        dist.destroy_process_group()
    ckpt = tmp_path / "ckpt"
    assert [(ckpt / f"step_{step}" / "model" / "consolidated").is_dir() for step in (1, 2, 3)] == [False, False, True]
    assert all((ckpt / f"step_{step}" / "model" / "sharded").is_dir() for step in (1, 2, 3))
    deployed = AutoModelForCausalLM.from_pretrained(ckpt / "step_3" / "model" / "consolidated").state_dict()
    assert all(torch.equal(deployed[name], tensor) for name, tensor in trained.items() if name in deployed)
