"""Install metadata: floors only, and the oldest-versions CI run pins exactly those floors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: torch is pinned by the set-up command itself (`pip install torch==2.13.0 ...`): the CPU wheel on this machine.
PINNED_BY_SETUP = {"torch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _requirements() -> list[str]:
    return PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]


def _oldest_pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "ci" / "oldest.txt").read_text().splitlines()]
    return {_name(line): line.split("==")[1] for line in lines if line}


def test_no_upper_bounds():
    capped = [req for req in _requirements() if "<" in req or "!=" in req or "~=" in req]
    assert not capped, f"upper bounds downgrade or block users on newer releases: {capped}"


def test_oldest_constraints_pin_every_floor_exactly():
    pins = _oldest_pins()
    for requirement in _requirements():
        name = _name(requirement)
        floor = re.search(r">=\s*([\w.]+)", requirement)
        if floor is None or name in PINNED_BY_SETUP:
            continue
        assert name in pins, f"ci/oldest.txt does not pin {name} (pyproject.toml: {requirement})"
        assert pins[name] == floor.group(1) or pins[name].startswith(floor.group(1) + "."), (
            f"ci/oldest.txt pins {name}=={pins[name]} but pyproject.toml's floor is {requirement}"
        )
    unknown = set(pins) - {_name(req) for req in _requirements()}
    assert not unknown, f"ci/oldest.txt pins packages pyproject.toml does not name: {sorted(unknown)}"
