"""A save interrupted at any point leaves the previous newest checkpoint loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, verify_checkpoint
from hf_rl_ckpt.cli import list_rows

pytestmark = pytest.mark.logic

CHILD = Path(__file__).with_name("_crash_child.py")


def _spawn(ckpt_dir: Path, ready: Path, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, str(CHILD), str(ckpt_dir), str(ready), *flags], cwd=CHILD.parent, env=env)


def _wait_for(ready: Path, proc: subprocess.Popen, predicate, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists() and predicate(text := ready.read_text()):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"child exited early with {proc.returncode}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("child never reached the expected point")


def _assert_newest_resumes(ckpt_dir: Path, make_objects, at_least: int) -> int:
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt_dir)))
    assert not any((ckpt_dir / ".incomplete").iterdir()), "leftovers must be cleaned on start"
    rows = list_rows(ckpt_dir, checksums=True)
    assert rows and all(row["status"] == "verified" for row in rows), rows
    state = manager.resume(**make_objects().as_kwargs())
    assert state is not None and state.step >= at_least
    assert state.step == max(row["step"] for row in rows)
    return state.step


def test_sigkill_inside_a_save_keeps_previous_checkpoint(tmp_path, make_objects):
    ckpt, ready = tmp_path / "ckpt", tmp_path / "ready"
    proc = _spawn(ckpt, ready, "--hang-in-save")
    _wait_for(ready, proc, lambda text: text == "in-save")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpt / ".incomplete" / "step_3").is_dir(), "the kill should have hit the step-3 save in flight"
    assert [row["step"] for row in list_rows(ckpt)] == [1, 2], "no half checkpoint may be listed"
    assert _assert_newest_resumes(ckpt, make_objects, at_least=2) == 2


def test_bit_flip_and_truncation_are_caught(tmp_path, make_objects, caplog):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    manager.save(1, **objs.as_kwargs())
    newest = manager.save(2, **objs.as_kwargs())
    weights = newest / "model/consolidated/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    from hf_rl_ckpt.cli import main

    assert main(["verify", str(newest)]) == 1
    with pytest.raises(Exception, match="model.safetensors: xxh3_128 does not match"):
        verify_checkpoint(newest)
    state = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**make_objects().as_kwargs())
    assert state.step == 1
    assert "model.safetensors" in caplog.text and "falling back" in caplog.text

    rng_file = tmp_path / "step_1" / "rng/rank_0.safetensors"
    rng_file.write_bytes(rng_file.read_bytes()[:-10])
    strict = CheckpointConfig(checkpoint_dir=str(tmp_path), resume={"mode": "from_path", "resume_path": str(tmp_path / "step_1")})
    with pytest.raises(Exception, match=r"rank_0.safetensors: size .*truncated"):
        CheckpointManager(strict).resume(**make_objects().as_kwargs())
