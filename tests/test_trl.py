"""`CheckpointCallback` with TRL trainers: `SFTTrainer` resumes exactly; `GRPOTrainer` resumes and
keeps the top-k checkpoints by the reward it logs."""

from __future__ import annotations

from types import SimpleNamespace

import _trainer_run as R
import pytest

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.retention import RetentionPolicy


@pytest.fixture(scope="module")
def trl_runs(tmp_path_factory):
    """SFT: 6 uninterrupted steps vs stopped after 3 and resumed. GRPO: 4 steps, stopped after 2 and resumed.

    Both stopped runs share one process and both resumed runs another, to pay the start-up once.
    """
    work = tmp_path_factory.mktemp("trl")
    sft = {"kind": "sft", "work_dir": str(work)}
    grpo = {"kind": "grpo", "work_dir": str(work), "ckpt_dir": str(work / "grpo_ckpt")}
    stopped = R.start([
        {**sft, "ckpt_dir": str(work / "sft_ckpt"), "out_dir": str(work / "sft_stopped"), "stop_at": 3},
        {**grpo, "out_dir": str(work / "grpo_stopped"), "stop_at": 2},
    ])
    R.run({**sft, "ckpt_dir": str(work / "sft_ref_ckpt"), "out_dir": str(work / "sft_ref")})
    R.finish(stopped)
    R.finish(R.start([
        {**sft, "ckpt_dir": str(work / "sft_ckpt"), "out_dir": str(work / "sft_resumed")},
        {**grpo, "out_dir": str(work / "grpo_resumed")},
    ]))
    return SimpleNamespace(
        work=work, **{name: R.result(work / name) for name in ("sft_ref", "sft_stopped", "sft_resumed", "grpo_stopped", "grpo_resumed")}
    )


def test_sft_trainer_resumes_exactly(trl_runs):
    assert trl_runs.sft_stopped["global_step"] == 3 and trl_runs.sft_resumed["global_step"] == 6
    expected = R.losses(trl_runs.sft_ref["log_history"])
    assert [step for step, _, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert R.losses(trl_runs.sft_resumed["log_history"]) == expected
    R.assert_same_weights(trl_runs.sft_resumed["weights"], trl_runs.sft_ref["weights"])


def test_grpo_trainer_resumes_and_keeps_top_k_by_reward(trl_runs):
    stopped, resumed = trl_runs.grpo_stopped, trl_runs.grpo_resumed
    assert stopped["global_step"] == 2 and resumed["global_step"] == 4
    rewards = {entry["step"]: entry["reward"] for entry in resumed["log_history"] if "reward" in entry}
    assert sorted(rewards) == [1, 2, 3, 4]
    # The resumed process continued the stopped one's history rather than starting over.
    assert resumed["log_history"][:2] == stopped["log_history"][:2]
    rows = CheckpointManager(CheckpointConfig(checkpoint_dir=str(trl_runs.work / "grpo_ckpt"))).checkpoints()
    assert {row.step for row in rows} == RetentionPolicy(2, "reward").retained(rewards)
    assert all(row.metrics["reward"] == rewards[row.step] for row in rows)
    assert len(set(rewards.values())) > 1  # the ranking was not decided by ties alone
