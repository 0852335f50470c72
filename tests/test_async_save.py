"""`async_save`: the training loop only pays for staging; files, fsync, hashes and commit happen in the background."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_rl_ckpt.async_save as async_save
import hf_rl_ckpt.write as write_module
import hf_rl_ckpt.verify as verify_module
from hf_rl_ckpt import CheckpointConfig, CheckpointManager, verify_checkpoint
from hf_rl_ckpt.errors import CheckpointSaveError
from hf_rl_ckpt.layout import TRAINING_INFO
from hf_rl_ckpt.state.optim import capture_optimizer

pytestmark = pytest.mark.logic

TESTS = Path(__file__).parent


def _config(ckpt: Path, **overrides) -> CheckpointConfig:
    return CheckpointConfig(checkpoint_dir=str(ckpt), **overrides)


def _train(objs, steps: int, manager: CheckpointManager | None = None, start: int = 0) -> list[float]:
    """`steps` training steps from step `start`, saving after each one when a manager is given."""
    losses = []
    batches = objs.endless_batches()
    for step in range(start + 1, start + steps + 1):
        batch = next(batches)
        losses.append(objs.train_step(batch))
        if manager is not None:
            manager.save(step, **objs.as_kwargs(), metrics={"loss": losses[-1]}, extra_state={"step": step})
    return losses


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _seed() -> None:
    """The same global RNG for every run of a test (the loader's shuffle draws from it)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_async_and_sync_saves_write_identical_files(tmp_path, make_objects):
    """Same training, one manager sync and one async: every file is byte-identical except what records the mode and the clock."""
    for mode in ("sync", "async"):  # both in the same directory (the model card names it), moved aside afterwards
        _seed()
        objs = make_objects()
        manager = CheckpointManager(_config(tmp_path / "ckpt", async_save=mode == "async"))
        _train(objs, 3, manager)
        manager.finalize()
        shutil.move(tmp_path / "ckpt", tmp_path / mode)
    sync, async_ = tmp_path / "sync" / "step_3", tmp_path / "async" / "step_3"
    sync_files, async_files = _files(sync), _files(async_)
    assert sync_files.keys() == async_files.keys()
    differing = sorted(name for name in sync_files if sync_files[name] != async_files[name])
    # training_info.json holds created_at and save_seconds; config.yaml and the model card's config summary record async_save.
    assert differing == ["README.md", "config.yaml", TRAINING_INFO], differing
    for name in ("README.md", "config.yaml"):
        changed = [(a, b) for a, b in zip(sync_files[name].splitlines(), async_files[name].splitlines()) if a != b]
        assert changed == [(b"  async_save: false", b"  async_save: true")], (name, changed)
    sync_info, async_info = (json.loads(files[TRAINING_INFO]) for files in (sync_files, async_files))
    for info in (sync_info, async_info):
        info.pop("created_at"), info.pop("save_seconds"), info["manifest"].pop("config.yaml"), info["manifest"].pop("README.md")
    assert sync_info == async_info
    # The optimizer tensors are streamed by our writer into DCP's file name, header and index.
    assert {"optim/model-00001-of-00001.safetensors", "optim/model.safetensors.index.json"} <= set(async_info["manifest"])
    verify_checkpoint(async_)


def test_training_is_identical_with_async_on_and_off(tmp_path, make_objects):
    """Losses and final weights do not depend on async_save; resuming an async checkpoint continues the same run."""
    results = {}
    for mode in ("sync", "async"):
        _seed()
        objs = make_objects()
        manager = CheckpointManager(_config(tmp_path / mode, async_save=mode == "async"))
        losses = _train(objs, 6, manager)
        manager.finalize()
        results[mode] = (losses, {k: v.clone() for k, v in objs.model.state_dict().items()})
    assert results["sync"][0] == results["async"][0]
    assert all(torch.equal(results["sync"][1][k], results["async"][1][k]) for k in results["sync"][1])

    objs = make_objects(seed=5)  # different initial weights: everything must come from the checkpoint
    state = CheckpointManager(_config(tmp_path / "async")).load(tmp_path / "async" / "step_3", **objs.as_kwargs())
    assert state.step == 3
    assert _train(objs, 3, start=3) == results["async"][0][3:]
    assert all(torch.equal(v, results["async"][1][k]) for k, v in objs.model.state_dict().items())


def test_twenty_async_saves_reuse_the_staging_buffer(tmp_path, make_objects):
    """RSS does not grow after the second save: the staging buffer is refilled in place, never reallocated."""
    objs = make_objects(hidden_size=256, intermediate_size=768, num_attention_heads=8)
    state_bytes = sum(t.numel() * t.element_size() for t in objs.model.state_dict().values()) * 3  # weights + AdamW moments
    manager = CheckpointManager(_config(tmp_path, async_save=True, keep_top_k=1, metric_name="step"))
    sizes, rss = [], {}
    batches = objs.endless_batches()
    for step in range(1, 21):
        batch = next(batches)
        objs.train_step(batch)
        manager.save(step, **objs.as_kwargs())
        manager._writer.background.join()  # the optimizer state is staged by the background thread
        sizes.append(manager._writer.background.buffer.nbytes())
        if step in (2, 20):
            rss[step] = _rss()
    manager.finalize()
    assert len(set(sizes)) == 1 and sizes[0] >= state_bytes * 0.95, (sizes[0], state_bytes)
    growth = rss[20] - rss[2]
    assert growth < state_bytes, f"RSS grew by {growth / 1e6:.1f} MB over 18 saves of {state_bytes / 1e6:.1f} MB state"
    assert [row.step for row in manager.checkpoints()] == [20]
    assert not any((tmp_path / ".incomplete").iterdir())


def test_background_failure_surfaces_at_the_next_save_and_at_finalize(tmp_path, make_objects, monkeypatch):
    objs = make_objects()
    manager = CheckpointManager(_config(tmp_path, async_save=True))
    _train(objs, 1, manager)
    manager._writer.background.join()  # step 1 is committed before the disk "fills up"
    real = write_module.write_optimizer_tensors

    def disk_full(*args, **kwargs):
        time.sleep(0.2)  # still running when save() returns: the failure can only surface later
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write_module, "write_optimizer_tensors", disk_full)
    started = time.perf_counter()
    path = manager.save(2, **objs.as_kwargs())
    assert time.perf_counter() - started < 0.2, "save() must return before the background write finishes"
    with pytest.raises(CheckpointSaveError, match=r"step 2 failed \(rank 0: OSError.*No space left.*step_1"):
        manager.save(3, **objs.as_kwargs())
    assert not path.exists() and not any((tmp_path / ".incomplete").iterdir())
    assert [row.step for row in manager.checkpoints()] == [1]
    manager.save(3, **objs.as_kwargs())  # the failed step 3 call saved nothing; this one fails in the background too
    with pytest.raises(CheckpointSaveError, match="step 3 failed"):
        manager.finalize()
    monkeypatch.setattr(write_module, "write_optimizer_tensors", real)
    manager.save(4, **objs.as_kwargs())
    manager.finalize()
    assert [row.step for row in manager.checkpoints()] == [1, 4]


def test_optimizer_state_copied_in_the_background_is_the_state_as_of_save(tmp_path, make_objects, monkeypatch):
    """The optimizer state is staged by the writer thread; an optimizer step right after save() waits for that copy."""
    objs = make_objects()
    manager = CheckpointManager(_config(tmp_path, async_save=True))
    _train(objs, 1)
    before = {k: v.clone() for k, v in capture_optimizer(objs.model, objs.optimizer).tensors.items()}
    real_run = async_save.DeferredCopy.run
    at_step = threading.Event()
    # Registered before save(), so it runs before the hook that makes step() wait for the copy.
    objs.optimizer.register_step_pre_hook(lambda *_: at_step.set())

    def copy_after_the_step_began(self, buffer):
        at_step.wait(timeout=30)  # the training loop has reached its next optimizer step (whatever the machine's load)
        time.sleep(0.3)
        real_run(self, buffer)

    monkeypatch.setattr(async_save.DeferredCopy, "run", copy_after_the_step_began)
    path = manager.save(1, **objs.as_kwargs())
    objs.train_step(next(iter(objs.loader)))  # forward, backward, then step(): held until the state is staged
    assert at_step.is_set() and manager._writer.background.step_waited >= 0.25, "step() did not wait for the copy"
    manager.finalize()
    restored = make_objects(seed=1)
    CheckpointManager(_config(tmp_path)).load(path, **restored.as_kwargs())
    after_load = capture_optimizer(restored.model, restored.optimizer).tensors
    assert before.keys() == after_load.keys() and all(torch.equal(before[k], after_load[k]) for k in before)
    assert not all(torch.equal(before[k], v) for k, v in capture_optimizer(objs.model, objs.optimizer).tensors.items())


def test_async_save_records_the_state_as_of_the_call(tmp_path, make_objects):
    """What the caller changes after save() returns (loop counters, the optimizer's lr) is not what gets written."""
    objs = make_objects()
    manager = CheckpointManager(_config(tmp_path, async_save=True))
    _train(objs, 1)
    extra = {"counters": {"episodes": 7}}
    path = manager.save(1, **objs.as_kwargs(), extra_state=extra)
    extra["counters"]["episodes"] = 8
    objs.scheduler.step()
    manager.finalize()
    assert json.loads((path / TRAINING_INFO).read_text())["extra"] == {"counters": {"episodes": 7}}
    fresh = make_objects(seed=2)
    state = CheckpointManager(_config(tmp_path)).load(path, **fresh.as_kwargs())
    assert state.extra == {"counters": {"episodes": 7}}
    assert fresh.scheduler.last_epoch == objs.scheduler.last_epoch - 1


def test_resume_reads_tensor_files_once_and_still_refuses_damage_before_loading(tmp_path, make_objects, monkeypatch, caplog):
    objs = make_objects()
    manager = CheckpointManager(_config(tmp_path, async_save=True))
    _train(objs, 2, manager)
    manager.finalize()
    hashed = []
    real_hash = verify_module.hash_file
    monkeypatch.setattr(verify_module, "hash_file", lambda path, *algorithm: hashed.append(Path(path)) or real_hash(path, *algorithm))
    fresh = make_objects(seed=3)
    assert CheckpointManager(_config(tmp_path)).resume(**fresh.as_kwargs()).step == 2
    tensor_files = [p for p in hashed if p.suffix == ".safetensors" and p.parent.name in ("consolidated", "optim")]
    assert not tensor_files, f"read twice (hashed, then loaded): {tensor_files}"
    assert all(torch.equal(v, objs.model.state_dict()[k]) for k, v in fresh.model.state_dict().items())

    # A flipped bit in step 2's optimizer file: refused before anything is loaded; auto resume falls back to step 1.
    optim_file = tmp_path / "step_2" / "optim" / "model-00001-of-00001.safetensors"
    data = bytearray(optim_file.read_bytes())
    data[-5] ^= 0x40
    optim_file.write_bytes(bytes(data))
    target = make_objects(seed=4)
    state = CheckpointManager(_config(tmp_path)).resume(**target.as_kwargs())
    assert state.step == 1
    assert "xxh3_128 does not match" in caplog.text


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from training_objects import make_training_objects
    from hf_rl_ckpt import CheckpointConfig, CheckpointManager, faultpoint

    ckpt, ready, delay = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    objs = make_training_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=ckpt, async_save=True))
    batches = objs.endless_batches()
    for step in range(1, 1000):
        batch = next(batches)
        objs.train_step(batch)
        if step <= 3:
            if step == 3 and delay != "0":
                manager.finalize(terminate=False)  # step 2 is committed; only the step-3 write is held
                faultpoint.arm("save.part_written", faultpoint.sleep(float(delay)))  # the background write of step 3 stalls mid-way
            manager.save(step, **objs.as_kwargs())
            if step == 3:
                ready.write_text("returned")  # save() is back; training goes on while step 3 is being written
    """
)


@pytest.mark.parametrize("how", ["sigkill-while-writing", "faultpoint-in-background-thread"])
def test_crash_during_an_async_write_keeps_the_previous_checkpoint(tmp_path, make_objects, how):
    script, ckpt, ready = tmp_path / "child.py", tmp_path / "ckpt", tmp_path / "ready"
    script.write_text(_CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    crash = []
    if how == "faultpoint-in-background-thread":
        # 4 parts per save: the 2nd part (optimizer) of step 3, in the writer thread
        crash = ["-m", "hf_rl_ckpt.testing.crash", "--at", "save.part_written@10", "--"]
    proc = subprocess.Popen([sys.executable, *crash, str(script), str(ckpt), str(ready), "60" if how.startswith("sigkill") else "0"], cwd=TESTS, env=env)
    try:
        deadline = time.monotonic() + 120
        if how.startswith("sigkill"):
            while not (ready.exists() and ready.read_text() == "returned"):
                assert proc.poll() is None and time.monotonic() < deadline, "child died or never reached step 3"
                time.sleep(0.02)
            time.sleep(0.3)  # training runs on; the step-3 write is held in flight by the armed sleep
            assert (ckpt / ".incomplete" / "step_3").is_dir(), "the step-3 write should be in flight"
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (ckpt / ".incomplete" / "step_3" / "model" / "consolidated").is_dir()
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == ["step_1", "step_2"]
    objs = make_objects(seed=9)
    manager = CheckpointManager(_config(ckpt))  # resume.mode defaults to auto
    assert not any((ckpt / ".incomplete").iterdir()), "the interrupted write is cleaned on start"
    state = manager.resume(**objs.as_kwargs())
    assert state.step == 2
    verify_checkpoint(ckpt / "step_2")


def test_optimizer_state_is_copied_inside_save_when_deferring_is_off(make_objects):
    """`async_defer_optimizer_copy: false`: the writer stages the optimizer state at once, leaving no step hook behind."""
    objs = make_objects()
    _train(objs, 1)

    def optimizer_part() -> async_save.SavePart:
        state = capture_optimizer(objs.model, objs.optimizer).tensors
        return async_save.SavePart("optimizer", write=lambda tensors: {}, tensors=state, written_by_step=objs.optimizer)

    deferring = async_save.AsyncCheckpointWriter()
    assert len(deferring.stage([optimizer_part()])) == 1
    deferring.close()
    eager = async_save.AsyncCheckpointWriter(defer_optimizer_copy=False)
    part = optimizer_part()
    assert eager.stage([part]) == []
    assert eager.buffer.nbytes() == sum(t.numel() * t.element_size() for t in part.tensors.values()) > 0
    eager.close()
