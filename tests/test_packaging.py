"""Install metadata: floors only, the oldest-versions CI run pins exactly those floors, and what it skips touches no release."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.logic

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


# ---------------------------------------------------------------- what the oldest-releases run skips
#: Imports a `logic` module may not have: the releases the oldest-releases run is there to check, and our modules and
#: test helpers that call them. A tiny transformers model built by `hf_rl_ckpt.testing.tiny` is allowed as the payload
#: of a save: its own save and load paths are what the Trainer, PEFT, convert and export tests check on both runs.
VERSIONED_IMPORTS = (
    "transformers", "accelerate", "peft", "trl", "deepspeed", "huggingface_hub", "datasets", "s3fs", "fsspec",
    "hf_rl_ckpt.integrations", "hf_rl_ckpt.accelerate", "hf_rl_ckpt.hub", "hf_rl_ckpt.shims", "hf_rl_ckpt.compat",
    "hf_rl_ckpt.remote", "hf_rl_ckpt.convert", "hf_rl_ckpt.export", "hf_rl_ckpt.testing.hub_server", "_trainer_run", "s3_server",
)
#: Fixtures that start a versioned service (moto's S3 server, reached through s3fs).
VERSIONED_FIXTURES = {"s3", "s3_server"}
TESTS = ROOT / "tests"
#: Helper modules of the suite, by import name (tests/, tests/dist/ and tests/faults/ are on the tests' sys.path).
HELPERS = {path.stem: path for folder in (TESTS, TESTS / "dist", TESTS / "faults") for path in folder.glob("*.py") if not path.name.startswith("test_")}


def _imports(path: Path, seen: set[Path]) -> set[str]:
    """Every module `path` imports, anywhere in it, and what the suite's own helper modules it imports import."""
    seen.add(path)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    for name in sorted(names):
        if name in HELPERS and HELPERS[name] not in seen:
            names |= _imports(HELPERS[name], seen)
    return names


def _module_marks(tree: ast.Module, mark: str) -> bool:
    return any(
        isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["pytestmark"] and f"mark.{mark}" in ast.unparse(node.value)
        for node in tree.body
    )


def test_logic_modules_import_nothing_the_oldest_releases_run_exists_to_check():
    logic = []
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        marked_elsewhere = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                            and any("mark.logic" in ast.unparse(d) for d in node.decorator_list)]
        assert not marked_elsewhere, f"{path.name}:{marked_elsewhere}: `logic` marks whole modules (pytestmark), so the file says which run has it"
        if not _module_marks(tree, "logic"):
            continue
        logic.append(path.name)
        versioned = sorted(name for name in _imports(path, set()) if any(name == prefix or name.startswith(prefix + ".") for prefix in VERSIONED_IMPORTS))
        assert not versioned, f"{path.relative_to(ROOT)} is marked logic (skipped by the oldest-releases run) but imports {versioned}"
        fixtures = sorted({arg.arg for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) for arg in node.args.args} & VERSIONED_FIXTURES)
        assert not fixtures, f"{path.relative_to(ROOT)} is marked logic but uses the fixtures {fixtures} (a versioned service)"
    assert "test_retention.py" in logic and "test_trainer_callback.py" not in logic, logic
