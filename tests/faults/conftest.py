"""Fixtures of the fault suite: the fork server, and small real filesystems (tmpfs) to fill up or make read-only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from faultlib import Zygote


@pytest.fixture(scope="session")
def zygote():
    server = Zygote()
    yield server
    server.close()


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 6 MB tmpfs mounted under tmp_path: a real filesystem that fills up (ENOSPC) and can be remounted read-only.

    Needs root (CI runs as root); skipped elsewhere rather than faked.
    """
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the disk-full and read-only tests need root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)
