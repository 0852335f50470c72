"""What a save accepts: numpy/tensor values in metrics and extra_state, non-finite numbers, bad steps and a
checkpoint_dir that is a file. Bad input is refused before anything is written, and a save that fails for
any reason leaves nothing in `.incomplete/`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_rl_ckpt import CheckpointConfig, CheckpointError, CheckpointManager, CheckpointSaveError, ConfigError
from hf_rl_ckpt.compat.nemo_rl import CheckpointManager as NemoCheckpointManager


def _strict_json(path) -> dict:
    """Parse as a strict JSON parser does (no NaN, Infinity)."""

    def refuse(constant):
        raise ValueError(f"{path} holds the non-JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _nothing_written(root, step_name: str) -> bool:
    staging = root / ".incomplete"
    return not (root / step_name).exists() and not (staging.is_dir() and any(staging.iterdir()))


def test_numpy_and_tensor_scalars_are_recorded_as_numbers(tmp_path, make_objects, caplog):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="reward"))
    metrics = {"reward": np.float32(0.5), "loss": torch.tensor(1.5), "tokens": np.int64(4096), "grad_norm": float("nan"),
               "lr": torch.tensor(1e-3, dtype=torch.bfloat16), "val": {"acc": np.float64(0.25)}}
    extra = {"episodes": np.int64(7), "ema": torch.tensor(2.5), "history": (np.float32(1.0), 2), "overflow": np.float32("inf")}
    path = manager.save(3, **objs.as_kwargs(), metrics=metrics, epoch=np.float64(0.5), extra_state=extra)

    info = _strict_json(path / "training_info.json")
    assert info["metrics"] == {"reward": 0.5, "loss": 1.5, "tokens": 4096, "grad_norm": None,
                               "lr": pytest.approx(1e-3, rel=1e-2), "val": {"acc": 0.25}}
    assert type(info["metrics"]["tokens"]) is int and info["epoch"] == 0.5
    assert info["extra"] == {"episodes": 7, "ema": 2.5, "history": [1.0, 2], "overflow": None}
    assert _strict_json(tmp_path / "checkpoints.json")["checkpoints"][0]["metrics"]["reward"] == 0.5
    assert "metrics['grad_norm'] is nan, which JSON cannot hold: recorded as null" in caplog.text
    assert "extra_state['overflow'] is inf" in caplog.text
    state = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**make_objects().as_kwargs())
    assert state.extra == info["extra"] and state.metrics["reward"] == 0.5


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"extra_state": {"ids": torch.ones(3)}}, r"extra_state\['ids'\] is of type Tensor with shape \(3,\).*\.tolist\(\)"),
        ({"extra_state": {"seen": {1, 2}}}, r"extra_state\['seen'\] is of type set, which cannot be recorded as JSON"),
        ({"extra_state": {"per_rank": {0: 1.0}}}, r"extra_state\['per_rank'\] has the key 0 \(int\)"),
        ({"metrics": {"sample": object()}}, r"metrics\['sample'\] is of type object"),
        ({"metrics": {"probs": np.zeros((2, 2))}}, r"metrics\['probs'\] is of type ndarray with shape \(2, 2\)"),
    ],
)
def test_values_json_cannot_hold_are_refused_before_writing(tmp_path, make_objects, record, pattern, async_save):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), async_save=async_save))
    with pytest.raises(CheckpointSaveError, match=pattern):
        manager.save(1, **objs.as_kwargs(), **record)
    manager.finalize()
    assert _nothing_written(tmp_path, "step_1")
    assert manager.checkpoints() == []


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_ranking_metric_is_refused_before_writing(tmp_path, make_objects, value):
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="reward"))
    with pytest.raises(CheckpointError, match=r"metric 'reward' is (NaN|inf|-inf) at step 1; a NaN or infinite value cannot be ranked"):
        manager.save(1, model=make_objects().model, metrics={"reward": np.float32(value)})
    assert _nothing_written(tmp_path, "step_1")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_save_failing_after_the_weights_were_written_leaves_no_staging(tmp_path, make_objects, async_save):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), async_save=async_save))
    manager.save(1, **objs.as_kwargs())
    # The model part writes the weights, then the extra files: this name is refused only then, after the weights.
    with pytest.raises(CheckpointSaveError, match=r"step 2 failed.*escape.txt.*climbs out"):
        manager.save(2, **objs.as_kwargs(), extra_files={"../escape.txt": b"x"})
        manager.finalize()  # an async save reports its background failure here
    assert _nothing_written(tmp_path, "step_2")
    assert [row.step for row in manager.checkpoints()] == [1]


def test_nemo_rl_finalize_that_fails_leaves_no_staging(tmp_path):
    checkpointer = NemoCheckpointManager({"enabled": True, "checkpoint_dir": str(tmp_path), "metric_name": "val:accuracy", "keep_top_k": 2})
    staging = checkpointer.init_tmp_checkpoint(1, {"step": 1, "val:accuracy": float("nan")})
    (staging / "policy").mkdir()
    (staging / "policy" / "weights.bin").write_bytes(b"\0" * 1024)  # the loop wrote its files
    with pytest.raises(CheckpointError, match="metric 'val:accuracy' is NaN at step 1"):
        checkpointer.finalize_checkpoint(staging)
    assert _nothing_written(tmp_path, "step_1")
    checkpointer.shutdown()


@pytest.mark.parametrize("step", [-1, 1.5, "3", True, None])
def test_a_step_that_cannot_name_a_checkpoint_is_refused_before_writing(tmp_path, make_objects, step):
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    with pytest.raises(CheckpointSaveError, match=r"cannot name a checkpoint: pass the global step, an integer >= 0"):
        manager.save(step, model=make_objects().model)
    assert not any(p.name.startswith("step_") for p in tmp_path.iterdir()) and _nothing_written(tmp_path, "step_-1")
    assert manager.latest() is None


def test_numpy_and_tensor_integer_steps_are_accepted(tmp_path, make_objects):
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    assert manager.save(np.int64(4), model=make_objects().model).name == "step_4"
    assert manager.save(torch.tensor(5), model=make_objects().model).name == "step_5"
    assert json.loads((tmp_path / "step_4" / "training_info.json").read_text())["step"] == 4


def test_checkpoint_dir_that_is_a_file_is_refused_at_construction(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"checkpoint_dir {target} is a file, not a directory"):
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(target)))
    with pytest.raises(ConfigError, match=rf"checkpoint_dir {target / 'run'} cannot be created"):
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(target / "run")))
    assert target.read_text() == "not a directory"
