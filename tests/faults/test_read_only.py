"""A checkpoint directory on a read-only filesystem (a real `mount -o remount,ro`; chmod means nothing to root).

Resuming must work (evaluation jobs read checkpoints from read-only mounts), leftovers of
an interrupted save are reported instead of cleaned, and a save fails before writing
anything with an error that says the directory is read-only.
"""

from __future__ import annotations

import subprocess

import pytest

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, CheckpointSaveError
from hf_rl_ckpt.cli import main as cli_main

pytestmark = pytest.mark.logic


def _tree(root):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def test_read_only_checkpoint_dir_resumes_and_refuses_saves(small_fs, make_objects, caplog):
    ckpt = small_fs / "ckpt"
    objs = make_objects()
    writer = CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt)))
    writer.save(1, **objs.as_kwargs())
    writer.save(2, **objs.as_kwargs())
    writer.finalize()
    (ckpt / ".incomplete" / "step_3").mkdir()  # what a save killed mid-way leaves
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    before = _tree(ckpt)

    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt)))
    assert manager.read_only
    assert "Read-only file system" in caplog.text and "resuming works, saving will fail" in caplog.text
    assert "cannot clean up after an interrupted process" in caplog.text and "step_3" in caplog.text
    assert manager.resume(**make_objects(seed=4).as_kwargs()).step == 2
    with pytest.raises(CheckpointSaveError, match=r"saving step 3 failed .*is read-only.*step_2 is intact"):
        manager.save(3, **objs.as_kwargs())
    assert cli_main(["verify", str(ckpt / "step_2")]) == 0
    assert cli_main(["list", str(ckpt)]) == 0
    assert _tree(ckpt) == before, "nothing in a read-only directory may change"
