"""Fault points: armed explicitly (in process, or by the `hf_rl_ckpt.testing.crash` launcher), never by the environment."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from hf_rl_ckpt import faultpoint
from hf_rl_ckpt.testing.crash import parse_point

pytestmark = pytest.mark.logic


@pytest.fixture(autouse=True)
def disarmed():
    yield
    faultpoint.disarm()


def test_an_armed_action_runs_once_at_its_hit() -> None:
    hits = []
    faultpoint.arm("commit.before_rename", lambda: hits.append("fired"), at_hit=2)
    faultpoint.faultpoint("commit.after_rename")  # other points do not count
    faultpoint.faultpoint("commit.before_rename")
    assert hits == []
    faultpoint.faultpoint("commit.before_rename")
    assert hits == ["fired"]
    faultpoint.faultpoint("commit.before_rename")
    assert hits == ["fired"]


def test_fail_raises_in_the_thread_passing_the_point_and_disarm_stops_it() -> None:
    faultpoint.arm("save.staged", faultpoint.fail(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        faultpoint.faultpoint("save.staged")
    faultpoint.arm("save.staged", faultpoint.fail(OSError("disk gone")))
    faultpoint.disarm("save.staged")
    faultpoint.faultpoint("save.staged")


def test_unknown_points_and_hits_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault point 'commit.before_renam'"):
        faultpoint.arm("commit.before_renam", faultpoint.kill)
    with pytest.raises(ValueError, match="at_hit counts from 1"):
        faultpoint.arm("save.staged", faultpoint.kill, at_hit=0)
    assert parse_point("commit.before_rename@3") == ("commit.before_rename", 3)
    assert parse_point("save.staged") == ("save.staged", 1)
    with pytest.raises(ValueError, match="positive integer"):
        parse_point("save.staged@x")


def test_the_crash_launcher_kills_a_script_at_the_point(tmp_path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from hf_rl_ckpt.faultpoint import faultpoint
        for hit in range(1, 4):
            Path(sys.argv[1]).write_text(str(hit))
            faultpoint("commit.before_rename")
        """
    ))
    progress = tmp_path / "progress"
    run = subprocess.run([sys.executable, "-m", "hf_rl_ckpt.testing.crash", "--at", "commit.before_rename@2", "--", str(script), str(progress)])
    assert run.returncode == -signal.SIGKILL and progress.read_text() == "2"
    refused = subprocess.run([sys.executable, "-m", "hf_rl_ckpt.testing.crash", "--at", "nowhere", "--", str(script)], capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown fault point 'nowhere'" in refused.stderr
