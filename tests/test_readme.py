"""The README stays true: its configuration table matches CheckpointConfig, CI runs its test command, and its
troubleshooting section quotes messages the library still prints."""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from hf_rl_ckpt import CheckpointConfig

pytestmark = pytest.mark.logic

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _table_fields() -> dict[str, str]:
    table = README.split("<!-- config-table -->")[1].split("<!-- /config-table -->")[0]
    rows = re.findall(r"^\|\s*`([^`]+)`\s*\|\s*`?([^|`]*)`?\s*\|", table, flags=re.MULTILINE)
    return dict(rows)


def _flat(values: dict[str, object], prefix: str = "") -> dict[str, object]:
    """Sub-blocks (resume, hub_retry) as `block.key` rows, as the table lists them."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def test_config_table_lists_exactly_the_config_fields():
    assert set(_table_fields()) == set(_flat(CheckpointConfig().to_dict(redact=False)))
    assert {"resume.mode", "hub_retry.attempts"} <= set(_table_fields())


def test_config_table_defaults_match():
    defaults = _flat(CheckpointConfig().to_dict(redact=False))
    for name, shown in _table_fields().items():
        value = defaults[name]
        expected = "null" if value is None else str(value).lower() if isinstance(value, bool) else f'"{value}"' if isinstance(value, str) else str(value)
        assert shown.strip() == expected, f"README default of {name} is {shown!r}, code has {expected!r}"


def _readme_line(pattern: str) -> str:
    """The README line `.ci/run` picks with `pattern` (same grep, same comment stripping)."""
    return subprocess.run(
        ["bash", "-c", f"grep -m1 -E '{pattern}' README.md | sed 's/[[:space:]]*#.*$//'"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()


def test_ci_runs_the_readme_test_commands():
    ci = (ROOT / ".ci/run").read_text()
    newest_pattern, oldest_pattern = "^pip install .*&& python -m pytest", r"^python -m venv \.venv-oldest .*-m pytest"
    assert newest_pattern in ci and oldest_pattern in ci
    newest = _readme_line(newest_pattern)
    assert newest.endswith("python -m pytest") and "torch==2.13.0" in newest and " -c " not in newest
    oldest = _readme_line(oldest_pattern)
    # The oldest releases run what depends on a release: the default selection less the `logic` modules.
    default_selection = re.search(r"-m '([^']+)'", PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]).group(1)
    assert "-c ci/oldest.txt" in oldest and oldest.endswith(f'.venv-oldest/bin/python -m pytest -m "{default_selection} and not logic"')
    first_commands = re.findall(r"^pip install .*$", README, flags=re.MULTILINE)[:2]
    assert len(first_commands) == 2 and "python examples/demo.py" in first_commands[0]


# ---------------------------------------------------------------- troubleshooting messages
def _template(node: ast.AST) -> list[str | None] | None:
    """A string expression of the source as literal parts and None for what varies at run time.

    f-string fields and `%s`-style specifiers vary (an f-string field that is itself a string
    expression keeps its text); `a + b` joins; `x if c else ""` takes `x` (the optional part the
    README quotes), any other choice varies. None: not a string expression.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        parts: list[str | None] = []
        for i, piece in enumerate(re.split(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfgix]", node.value)):
            parts += ([None] if i else []) + [piece]
        return parts
    if isinstance(node, ast.JoinedStr):
        return [part for value in node.values for part in (_template(value) or [None])]
    if isinstance(node, ast.FormattedValue):
        return _template(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        return None if left is None and right is None else (left or [None]) + (right or [None])
    if isinstance(node, ast.IfExp) and isinstance(node.orelse, ast.Constant) and node.orelse.value == "":
        return _template(node.body)
    return None


def _source_templates() -> list[tuple[re.Pattern[str], int]]:
    """Every string expression of the package as a regex (varying parts match anything) with its literal length."""
    templates = []
    for path in (ROOT / "hf_rl_ckpt").rglob("*.py"):
        tree = ast.parse(path.read_text())
        inner: set[int] = set()  # parts of a larger string expression: only whole messages count
        for node in ast.walk(tree):  # parents before children
            parts = _template(node)
            if parts is None or id(node) in inner:
                continue
            inner.update(id(child) for child in ast.walk(node) if child is not node)
            literal = sum(len(part) for part in parts if part)
            templates.append((re.compile("".join(".*?" if part is None else re.escape(part) for part in parts), re.DOTALL), literal))
    return templates


def test_troubleshooting_quotes_messages_the_library_prints():
    section = README.split("<!-- messages -->")[1].split("<!-- /messages -->")[0]
    quotes = re.findall(r"^```text\n(.*?)\n```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(quotes) >= 10
    templates = _source_templates()
    for quote in quotes:
        # A message of the source must match the quote, and its fixed text must make up most of it
        # (so a template that is mostly placeholders, like "{path}: {reason}", proves nothing).
        covered = max((literal for pattern, literal in templates if pattern.search(quote)), default=0)
        assert covered >= max(20, 0.6 * len(quote)), f"README quotes a message the library no longer prints:\n{quote}"
