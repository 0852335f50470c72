"""Disk full during a save, on a real size-limited filesystem (tmpfs), at every depth of the save.

A ballast file leaves a chosen number of bytes free, from none to almost a whole checkpoint,
so ENOSPC strikes while staging, in the weights, in the optimizer's DCP shards, in the small
state files or while sealing. Each time: a `CheckpointSaveError` that says the disk is
full, the model and optimizer in memory untouched (training goes on), the previous
checkpoint intact and verified, nothing left in `.incomplete/`.
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, CheckpointSaveError, verify_checkpoint

pytestmark = pytest.mark.logic

FRACTIONS_FREE = (0.0, 0.01, 0.2, 0.5, 0.8, 0.95)


def _snapshot(objs) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in objs.model.state_dict().items()}
    for index, slots in objs.optimizer.state_dict()["state"].items():
        state.update({f"optim.{index}.{slot}": v.clone() for slot, v in slots.items()})
    return state


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fill(mount, ballast, leave_free: int) -> None:
    ballast.unlink(missing_ok=True)
    stat = os.statvfs(mount)
    size = max(0, stat.f_bavail * stat.f_frsize - leave_free)
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * size)


def test_disk_full_fails_cleanly_at_every_depth_of_a_save(small_fs, make_objects):
    ckpt, ballast = small_fs / "ckpt", small_fs / "ballast"
    objs = make_objects()
    batches = (batch for _ in range(3) for batch in objs.loader)
    objs.train_step(next(batches))
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt)))
    first = manager.save(1, **objs.as_kwargs())
    size = manager.checkpoints()[0].size_bytes

    for fraction in FRACTIONS_FREE:
        objs.train_step(next(batches))
        before = _snapshot(objs)
        _fill(small_fs, ballast, int(fraction * size))
        with pytest.raises(CheckpointSaveError, match=r"saving step 2 failed \(.*No space left on device.*nothing was committed.*step_1 is intact"):
            manager.save(2, **objs.as_kwargs())
        assert _same(before, _snapshot(objs)), "a failed save must not touch the training state in memory"
        assert not any((ckpt / ".incomplete").iterdir()), f"{fraction:.0%} free: staging left behind"
        assert [row.step for row in manager.checkpoints()] == [1]
        verify_checkpoint(first)

    ballast.unlink()
    objs.train_step(next(batches))  # training went on the whole time
    assert manager.save(2, **objs.as_kwargs()).name == "step_2"
    fresh = make_objects(seed=5)
    assert CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt))).resume(**fresh.as_kwargs()).step == 2
    assert _same(_snapshot(objs), _snapshot(fresh))
