"""Two managers on one checkpoint directory: the second process is refused, naming the holder; a dead holder's lock is recovered."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
from faultlib import alive, reported, wait_for

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.cli import main as cli_main
from hf_rl_ckpt.lock import CheckpointLockedError

pytestmark = pytest.mark.logic


def test_second_process_is_refused_and_a_killed_holders_lock_is_recovered(tmp_path, zygote, caplog):
    ckpt, ready = tmp_path / "ckpt", tmp_path / "ready"
    pid = zygote.run(ckpt, ready)
    wait_for(lambda: len(reported(ready)) >= 2, timeout=60, what="the first process to save twice")

    with pytest.raises(CheckpointLockedError, match=rf"{ckpt} is in use by pid {pid} on host {socket.gethostname()}") as err:
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt)))
    assert err.value.holder["pid"] == pid and err.value.holder["program"] == "_zygote.py"
    assert cli_main(["list", str(ckpt)]) == 0, "read-only commands do not need the lock"
    assert not (ckpt / ".incomplete").exists() or alive(pid), "the refused manager must not have cleaned anything"

    os.kill(pid, signal.SIGKILL)
    zygote.wait(pid)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt)))
    assert f"taking over the stale lock {ckpt / '.lock'}: its holder (pid {pid}" in caplog.text
    assert json.loads((ckpt / ".lock").read_text())["pid"] == os.getpid()
    manager.finalize()
    assert (ckpt / ".lock").read_text() == "", "a clean release leaves no holder behind"


def test_managers_in_one_process_share_the_lock(tmp_path, make_objects, caplog):
    objs = make_objects()
    first = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    second = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    first.save(1, **objs.as_kwargs())
    second.save(2, **objs.as_kwargs())
    first.finalize()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid(), "still held by the second manager"
    second.finalize()
    assert (tmp_path / ".lock").read_text() == ""
    second.save(3, **objs.as_kwargs())  # a save after finalize() takes the lock again
    assert "stale" not in caplog.text


def test_planted_stale_lock_from_a_dead_process_is_taken_over(tmp_path, caplog):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 999999, "host": "old-node", "started_at": "2024-01-01T00:00:00+00:00"}))
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).finalize()
    assert "taking over the stale lock" in caplog.text and "pid 999999 on host old-node" in caplog.text


def test_a_descendant_of_the_holder_shares_its_lock(tmp_path, zygote, caplog):
    """A launcher (here: this test process) holds the directory while the job it started saves into it."""
    holder = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt")))
    ready = tmp_path / "ready"
    pid = zygote.run(tmp_path / "ckpt", ready)  # a grandchild of this process
    wait_for(lambda: len(reported(ready)) >= 2, timeout=60, what="the descendant to save while the lock is held")
    os.kill(pid, signal.SIGKILL)
    zygote.wait(pid)
    assert json.loads((tmp_path / "ckpt" / ".lock").read_text())["pid"] == os.getpid()
    holder.finalize()
