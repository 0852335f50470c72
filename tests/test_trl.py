"""`CheckpointCallback` with TRL trainers: `SFTTrainer` resumes exactly; `GRPOTrainer` resumes exactly, also
from a checkpoint inside its generation buffer, and keeps the top-k checkpoints by the reward it logs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import _trainer_run as R
import pytest

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.integrations.generation_buffer import GenerationBuffer
from hf_rl_ckpt.errors import UnsupportedVersionError
from hf_rl_ckpt.retention import RetentionPolicy

#: One generation serves 4 optimizer steps, twice over (PPO-style epochs): generations at steps 1 and 9.
BUFFERED = {"steps_per_generation": 4, "num_iterations": 2}


@pytest.fixture(scope="module")
def trl_runs(tmp_path_factory):
    """SFT: 6 uninterrupted steps vs stopped after 3 and resumed. GRPO (default settings): 4 steps vs stopped
    after 2 and resumed. GRPO with a generation buffer (`BUFFERED`): 10 steps vs killed right after the step-6
    checkpoint (inside the buffer of the generation at step 1) and resumed.

    The interrupted runs share one process and the resumed runs another, to pay the start-up once; the
    uninterrupted runs go in a process beside them.
    """
    work = tmp_path_factory.mktemp("trl")
    sft = {"kind": "sft", "work_dir": str(work)}
    grpo = {"kind": "grpo", "work_dir": str(work)}
    buffered = {**grpo, "grpo_args": BUFFERED, "max_steps": 10, "checkpointing": {"save_period": 2, "metric_name": None, "keep_top_k": None}}
    references = R.start([
        {**sft, "ckpt_dir": str(work / "sft_ref_ckpt"), "out_dir": str(work / "sft_ref")},
        {**grpo, "ckpt_dir": str(work / "grpo_ref_ckpt"), "out_dir": str(work / "grpo_ref")},
        {**buffered, "ckpt_dir": str(work / "buffered_ref_ckpt"), "out_dir": str(work / "buffered_ref")},
    ])
    R.finish(R.start([
        {**sft, "ckpt_dir": str(work / "sft_ckpt"), "out_dir": str(work / "sft_stopped"), "stop_at": 3},
        {**grpo, "ckpt_dir": str(work / "grpo_ckpt"), "out_dir": str(work / "grpo_stopped"), "stop_at": 2},
        {**buffered, "ckpt_dir": str(work / "buffered_ckpt"), "out_dir": str(work / "buffered_killed"), "kill_after_save": 6},
    ]))
    checkpoint_6 = json.loads((work / "buffered_ckpt" / "step_6" / "rollout" / "rank_0.json").read_text())
    R.finish(R.start([
        {**sft, "ckpt_dir": str(work / "sft_ckpt"), "out_dir": str(work / "sft_resumed")},
        {**grpo, "ckpt_dir": str(work / "grpo_ckpt"), "out_dir": str(work / "grpo_resumed")},
        {**buffered, "ckpt_dir": str(work / "buffered_ckpt"), "out_dir": str(work / "buffered_resumed")},
    ]))
    R.finish(references)
    names = ("sft_ref", "sft_stopped", "sft_resumed", "grpo_ref", "grpo_stopped", "grpo_resumed", "buffered_ref", "buffered_resumed")
    return SimpleNamespace(work=work, checkpoint_6=checkpoint_6, **{name: R.result(work / name) for name in names})


def per_step(log_history):
    """(step, loss, reward) of every logged training step; the reward is logged at the steps that generated."""
    return [(entry["step"], entry["loss"], entry.get("reward")) for entry in log_history if "loss" in entry]


def test_sft_trainer_resumes_exactly(trl_runs):
    assert trl_runs.sft_stopped["global_step"] == 3 and trl_runs.sft_resumed["global_step"] == 6
    expected = R.losses(trl_runs.sft_ref["log_history"])
    assert [step for step, _, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert R.losses(trl_runs.sft_resumed["log_history"]) == expected
    R.assert_same_weights(trl_runs.sft_resumed["weights"], trl_runs.sft_ref["weights"])


def test_grpo_trainer_resumes_exactly_and_keeps_top_k_by_reward(trl_runs):
    stopped, resumed = trl_runs.grpo_stopped, trl_runs.grpo_resumed
    assert stopped["global_step"] == 2 and resumed["global_step"] == 4 and resumed["steps_trained_here"] == 2
    assert per_step(resumed["log_history"]) == per_step(trl_runs.grpo_ref["log_history"])
    R.assert_same_weights(resumed["weights"], trl_runs.grpo_ref["weights"])
    rewards = {entry["step"]: entry["reward"] for entry in resumed["log_history"] if "reward" in entry}
    assert sorted(rewards) == [1, 2, 3, 4]
    # The resumed process continued the stopped one's history rather than starting over.
    assert resumed["log_history"][:2] == stopped["log_history"][:2]
    rows = CheckpointManager(CheckpointConfig(checkpoint_dir=str(trl_runs.work / "grpo_ckpt"), resume={"mode": "disable"})).checkpoints()
    assert {row.step for row in rows} == RetentionPolicy(2, "reward").retained(rewards)
    assert all(row.metrics["reward"] == rewards[row.step] for row in rows)
    assert len(set(rewards.values())) > 1  # the ranking was not decided by ties alone


def test_grpo_resumes_inside_its_generation_buffer_exactly(trl_runs):
    """Killed after the step-6 checkpoint, 2 passes into the 8-step life of the step-1 generation: the resumed
    process trains on the buffered completions (no new generation until step 9, as uninterrupted)."""
    saved = trl_runs.checkpoint_6
    assert saved["state"] is not None and saved["rank"] == 0
    resumed, reference = trl_runs.buffered_resumed, trl_runs.buffered_ref
    assert resumed["global_step"] == 10 and resumed["steps_trained_here"] == 4
    expected = per_step(reference["log_history"])
    assert [step for step, _, reward in expected if reward is not None] == [1, 9]  # the run generated twice
    assert per_step(resumed["log_history"]) == expected
    R.assert_same_weights(resumed["weights"], reference["weights"])
    info = json.loads((trl_runs.work / "buffered_ckpt" / "step_6" / "training_info.json").read_text())
    assert info["policy_version"] == 0 and info["contents"]["rollout"]  # the buffered completions came from the initial policy


def test_unknown_trl_generation_internals_fail_before_training(tmp_path):
    """A TRL release whose online trainer keeps its buffer under other names: refused naming the version, not resumed off the buffer."""

    class RenamedInternals:  # what a GRPO trainer of such a release looks like to us: its args, no `_buffered_inputs`
        args = SimpleNamespace(steps_per_generation=4, gradient_accumulation_steps=1)
        num_iterations, _step, _metrics = 2, 0, {"train": {}}

    with pytest.raises(UnsupportedVersionError, match=r"RenamedInternals .*has no _buffered_inputs in trl \d"):
        GenerationBuffer.of(RenamedInternals())
    assert GenerationBuffer.of(SimpleNamespace(args=SimpleNamespace(per_device_train_batch_size=2))) is None  # SFT/DPO: nothing buffered
