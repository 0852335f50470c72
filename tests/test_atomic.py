"""The directory commit every published folder goes through: whole or absent, and the old or the new one after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_rl_ckpt import atomic
from hf_rl_ckpt.atomic import StreamingFileWriter, atomic_directory, atomic_write_bytes, commit_directory, recover_parked
from hf_rl_ckpt.digest import digest_bytes
from hf_rl_ckpt.faultpoint import REPLACE_POINTS

pytestmark = pytest.mark.logic

OLD = {"config.json": "old", "model.safetensors": "old weights"}
NEW = {"config.json": "new", "model.safetensors": "new weights", "tokenizer.json": "new tokenizer"}


def _fill(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _contents(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(folder.iterdir())}


def test_a_clean_block_publishes_the_whole_directory_and_leaves_nothing_else(tmp_path):
    final = tmp_path / "exports" / "model"  # the parent is created too
    with atomic_directory(final) as staging:
        assert staging.parent == final.parent and staging.name.startswith(".") and not any(staging.iterdir())
        _fill(staging, NEW)
        assert not final.exists(), "nothing is visible before the block ends"
    assert _contents(final) == NEW
    assert os.listdir(final.parent) == ["model"]


def test_a_failure_inside_the_block_leaves_nothing_and_propagates(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_directory(final) as staging:
            _fill(staging, NEW)
            raise RuntimeError("disk on fire")
    assert os.listdir(tmp_path) == []


def test_a_target_that_appears_meanwhile_is_left_untouched(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(FileExistsError):
        with atomic_directory(final) as staging:
            _fill(staging, NEW)
            _fill(final, OLD)  # another process won the race
    assert _contents(final) == OLD
    assert os.listdir(tmp_path) == ["model"]


def test_commit_refuses_an_existing_target_without_a_place_to_park_it(tmp_path):
    final, staging = _fill(tmp_path / "model", OLD), _fill(tmp_path / ".incomplete" / "model", NEW)
    with pytest.raises(FileExistsError):
        commit_directory(staging, final)
    assert _contents(final) == OLD and _contents(staging) == NEW


def test_replace_swaps_in_the_new_directory_and_deletes_the_old(tmp_path):
    final, staging = _fill(tmp_path / "step_4", OLD), _fill(tmp_path / ".incomplete" / "step_4", NEW)
    parked = tmp_path / ".trash" / "replaced-step_4"  # its parent is created on demand
    commit_directory(staging, final, parked=parked)
    assert _contents(final) == NEW
    assert not staging.exists() and not parked.exists()
    assert sorted(os.listdir(tmp_path)) == [".incomplete", ".trash", "step_4"]


def test_a_file_is_replaced_through_its_hidden_sibling(tmp_path):
    target = tmp_path / "checkpoints.json"
    target.write_text("old")
    assert atomic_write_bytes(target, b"new")[0] == 3
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["checkpoints.json"]


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from hf_rl_ckpt.atomic import atomic_directory, commit_directory, fsync_tree

    how, root = sys.argv[1], Path(sys.argv[2])
    if how == "kill-inside-block":
        with atomic_directory(root / "model") as staging:
            (staging / "config.json").write_text("new")
            os.kill(os.getpid(), signal.SIGKILL)  # half written: the weights never came
    else:
        staging = root / ".incomplete" / "step_4"
        fsync_tree(staging)
        commit_directory(staging, root / "step_4", parked=root / ".trash" / "replaced-step_4")
    """
)


def _run_child(tmp_path: Path, how: str, fault: str | None = None) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    armed = ["-m", "hf_rl_ckpt.testing.crash", "--at", fault, "--"] if fault is not None else []
    result = subprocess.run([sys.executable, *armed, str(script), how, str(tmp_path / "root")], env=env, timeout=120, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr


def test_sigkill_inside_the_block_leaves_no_target_only_a_hidden_staging_sibling(tmp_path):
    (tmp_path / "root").mkdir()
    _run_child(tmp_path, "kill-inside-block")
    (leftover,) = (tmp_path / "root").iterdir()
    assert leftover.name.startswith(".model.tmp-") and _contents(leftover) == {"config.json": "new"}


@pytest.mark.parametrize("point", REPLACE_POINTS)
def test_sigkill_during_a_replacement_leaves_the_old_or_the_new_directory_once_recovered(tmp_path, point):
    root = tmp_path / "root"
    final, staging = _fill(root / "step_4", OLD), _fill(root / ".incomplete" / "step_4", NEW)
    parked = root / ".trash" / "replaced-step_4"
    _run_child(tmp_path, "replace", fault=point)
    assert parked.is_dir(), "the kill should land while the old directory is parked"
    recover_parked(parked, final)
    assert not parked.exists()
    expected = {"replace.parked": OLD, "replace.swapped": NEW}[point]  # a new point needs its expectation here
    assert _contents(final) == expected
    assert staging.exists() == (expected is OLD), "the new directory is in place or still staged, never both or neither"


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page-cache"])
def test_streaming_writer_writes_exactly_the_bytes_it_hashes(tmp_path, monkeypatch, direct):
    if not direct:  # a filesystem that refuses O_DIRECT (older tmpfs, some FUSE mounts): none is at hand here
        monkeypatch.setattr(atomic, "_open_direct", lambda path: None)
    pieces = [os.urandom(n) for n in (8, 100_000, 0, 4096 * 3, 1, 70_001)]  # across chunk and block edges, ending mid-block
    path = tmp_path / "streamed.bin"
    with StreamingFileWriter(path, chunk=4096 * 8) as writer:
        for piece in pieces:
            writer.write(memoryview(piece))
    data = b"".join(pieces)
    assert path.read_bytes() == data
    assert writer.digest == digest_bytes(data)
