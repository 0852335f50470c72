"""RL loop state beyond weights and optimizer: `save(..., rollout_state=..., policy_version=...)` and `ResumeState`.

A replay buffer or buffered generations come back on resume exactly (tensors bit for bit, tuples as
tuples, int keys as ints), each rank its own, never through pickle; what cannot be stored is
refused before anything is committed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dist_helpers import pickle_files, torchrun  # noqa: E402

from hf_rl_ckpt import CheckpointConfig, CheckpointManager  # noqa: E402
from hf_rl_ckpt.errors import CheckpointSaveError  # noqa: E402
from training_objects import make_training_objects  # noqa: E402

pytestmark = pytest.mark.logic


def replay_buffer() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "cursor": 3,
        "episodes": [
            {"tokens": torch.randint(0, 500, (4, 9), generator=generator), "logprobs": torch.randn(4, 9, generator=generator, dtype=torch.float64),
             "done": torch.tensor([True, False, True, True]), "reward": 0.25, "text": "2 plus 2 is 4"},
            {"tokens": torch.empty(0, 9, dtype=torch.int64), "logprobs": None, "advantages": torch.randn(3, generator=generator).to(torch.bfloat16)},
        ],
        "shape": (4, 9),
        7: "an int key",
    }


def assert_same_tree(actual, expected, path="rollout_state"):
    assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), path
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tree(a, e, f"{path}.{index}")
    else:
        assert actual == expected, path


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_rollout_state_and_policy_version_come_back_on_resume(tmp_path, async_save):
    objs = make_training_objects()
    buffer = replay_buffer()
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), async_save=async_save)
    manager = CheckpointManager(config)
    manager.save(5, **objs.as_kwargs(), rollout_state=buffer, policy_version=4)
    saved = replay_buffer()
    buffer["episodes"][0]["tokens"].zero_()  # the loop refills its buffer in place while an async save is still writing
    manager.finalize()

    info = json.loads((tmp_path / "ckpt" / "step_5" / "training_info.json").read_text())
    assert info["policy_version"] == 4 and info["contents"]["rollout"]
    assert {"rollout/rank_0.safetensors", "rollout/rank_0.json"} <= set(info["manifest"])
    assert pickle_files(tmp_path / "ckpt") == []
    state = CheckpointManager(config).resume(**make_training_objects(seed=1).as_kwargs())
    assert state.step == 5 and state.policy_version == 4
    assert_same_tree(state.rollout_state, saved)


def test_a_checkpoint_without_rollout_state_resumes_with_none(tmp_path):
    objs = make_training_objects()
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"))
    CheckpointManager(config).save(1, **objs.as_kwargs())
    state = CheckpointManager(config).resume(**objs.as_kwargs())
    assert state.rollout_state is None and state.policy_version is None


def test_weights_only_resume_leaves_the_rollout_state_behind(tmp_path):
    objs = make_training_objects()
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"))).save(1, **objs.as_kwargs(), rollout_state={"cursor": 1})
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), resume={"load_weight_only": True})
    assert CheckpointManager(config).resume(model=objs.model).rollout_state is None


@pytest.mark.parametrize(
    ("rollout_state", "policy_version", "message"),
    [
        ({"episodes": [{"env": object()}]}, None, r"rollout_state\.episodes\.0\.env holds a object.*never pickle"),
        ({(1, 2): torch.ones(2)}, None, r"rollout_state has the key \(1, 2\) \(tuple\)"),
        ({"cursor": 1}, 1.5, r"policy_version 1\.5 \(float\) is not a step number"),
    ],
    ids=["object", "tuple-key", "float-version"],
)
def test_what_cannot_be_stored_is_refused_and_nothing_is_left(tmp_path, rollout_state, policy_version, message):
    objs = make_training_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt")))
    manager.save(1, **objs.as_kwargs())
    with pytest.raises(CheckpointSaveError, match=message):
        manager.save(2, **objs.as_kwargs(), rollout_state=rollout_state, policy_version=policy_version)
    manager.finalize()
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir() if not path.name.startswith(".")) == ["checkpoints.json", "step_1"]
    assert not any((tmp_path / "ckpt" / ".incomplete").iterdir())


def test_each_rank_gets_its_own_rollout_state_back(tmp_path):
    output = torchrun(Path(__file__).parent / "dist" / "rollout.py", 2, str(tmp_path / "run"), timeout=180)
    assert output.count("rollout OK") == 2, output
