"""Fuzzed training_info.json, checkpoints.json and safetensors headers: only `CorruptCheckpointError` (or `ConfigError`) escapes.

A checkpoint or run directory from elsewhere may hold anything. Each example rewrites one
file of a real two-checkpoint run (the newest checkpoint's training_info.json or weights
header, the run's checkpoints.json), with a random JSON value, a real document with one
field replaced by one, or nesting far past Python's recursion limit, and runs every reader
on it: `verify`, `inspect` and `list` (the CLI, in process), `resume` with `auto`. The
readers may refuse (exit code 1, `CorruptCheckpointError`); a resume falls back to the
older checkpoint or loads the newest. No other error, no traceback, ever.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ConfigError, CorruptCheckpointError, verify_checkpoint
from hf_rl_ckpt.cli import main as cli_main
from hf_rl_ckpt.state.safetensors_io import check_safetensors_header

pytestmark = pytest.mark.logic

WEIGHTS = "model/consolidated/model.safetensors"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
DEEP = st.integers(min_value=2_000, max_value=100_000).map(lambda depth: "[" * depth + "]" * depth)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A run with committed steps 1 and 2 (a plain module, no transformers: the readers are what is under test)."""
    root = tmp_path_factory.mktemp("fuzz") / "run"
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(root)))
    model = TinyModel()
    for step in (1, 2):
        with torch.no_grad():
            model.linear.weight.add_(1.0)
        manager.save(step, model=model, metrics={"loss": 1.0 / step})
    manager.finalize()
    return root


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    root = tmp_path / "run"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(pristine, root, symlinks=True)
    return root


def _fresh(run: Path, pristine: Path) -> Path:
    shutil.rmtree(run)
    shutil.copytree(pristine, run, symlinks=True)
    return run


def _all_readers_refuse_cleanly(root: Path, capsys) -> None:
    newest = root / "step_2"
    try:
        verify_checkpoint(newest)
    except CorruptCheckpointError:
        pass
    for args in (["verify", str(newest)], ["inspect", str(newest)], ["list", str(root)], ["list", str(root), "--verify"]):
        code = cli_main(args)
        err = capsys.readouterr().err
        assert code in (0, 1, 2) and "Traceback" not in err, (args, code, err[-2000:])
    try:
        state = CheckpointManager(CheckpointConfig(checkpoint_dir=str(root))).resume(model=TinyModel())
        assert state is None or state.step in (1, 2)
    except (CorruptCheckpointError, ConfigError):
        pass


def _replace_field(document: dict, key: str, value) -> dict:
    return {**document, key: value}


@FUZZ
@given(data=st.data())
def test_a_fuzzed_training_info_is_refused_or_read_never_crashes(run, pristine, capsys, data) -> None:
    root = _fresh(run, pristine)
    path = root / "step_2" / "training_info.json"
    original = json.loads(path.read_text())
    choice = data.draw(st.sampled_from(["value", "field", "deep", "contents", "manifest_entry"]))
    if choice == "value":
        text = json.dumps(data.draw(JSON))
    elif choice == "field":
        text = json.dumps(_replace_field(original, data.draw(st.sampled_from(sorted(original))), data.draw(JSON)))
    elif choice == "contents":
        text = json.dumps(_replace_field(original, "contents", {**original["contents"], data.draw(st.sampled_from(sorted(original["contents"]))): data.draw(JSON)}))
    elif choice == "manifest_entry":
        manifest = dict(original["manifest"])
        manifest[data.draw(st.sampled_from(sorted(manifest)))] = data.draw(JSON)
        text = json.dumps(_replace_field(original, "manifest", manifest))
    else:
        text = data.draw(DEEP)
    path.write_text(text)
    _all_readers_refuse_cleanly(root, capsys)


@FUZZ
@given(data=st.data())
def test_a_fuzzed_registry_is_refused_or_rebuilt_never_crashes(run, pristine, capsys, data) -> None:
    root = _fresh(run, pristine)
    path = root / "checkpoints.json"
    original = json.loads(path.read_text())
    choice = data.draw(st.sampled_from(["value", "field", "row", "deep"]))
    if choice == "value":
        text = json.dumps(data.draw(JSON))
    elif choice == "field":
        text = json.dumps(_replace_field(original, data.draw(st.sampled_from(sorted(original))), data.draw(JSON)))
    elif choice == "row":
        rows = list(original["checkpoints"])
        rows[data.draw(st.integers(0, len(rows) - 1))] = data.draw(JSON)
        text = json.dumps(_replace_field(original, "checkpoints", rows))
    else:
        text = data.draw(DEEP)
    path.write_text(text)
    try:
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(root))).finalize()
    except (CorruptCheckpointError, ConfigError):
        pass
    code = cli_main(["list", str(root)])
    err = capsys.readouterr().err
    assert code in (0, 1, 2) and "Traceback" not in err, err[-2000:]


@FUZZ
@given(data=st.data())
def test_a_fuzzed_safetensors_header_is_refused_never_crashes(run, pristine, capsys, data) -> None:
    root = _fresh(run, pristine)
    path = root / "step_2" / WEIGHTS
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = next(key for key in header if key != "__metadata__")
    choice = data.draw(st.sampled_from(["value", "tensor", "field", "metadata", "deep"]))
    if choice == "value":
        encoded = json.dumps(data.draw(JSON)).encode()
    elif choice == "tensor":
        encoded = json.dumps({**header, name: data.draw(JSON)}).encode()
    elif choice == "field":
        encoded = json.dumps({**header, name: {**header[name], data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])): data.draw(JSON)}}).encode()
    elif choice == "metadata":
        encoded = json.dumps({**header, "__metadata__": data.draw(JSON)}).encode()
    else:
        encoded = data.draw(DEEP).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    info = json.loads((root / "step_2" / "training_info.json").read_text())
    info["manifest"][WEIGHTS] = {"size": path.stat().st_size, "sha256": __import__("hashlib").sha256(path.read_bytes()).hexdigest()}
    (root / "step_2" / "training_info.json").write_text(json.dumps(info))  # the attacker rewrote the manifest too
    try:
        check_safetensors_header(path)
    except CorruptCheckpointError:
        pass
    _all_readers_refuse_cleanly(root, capsys)
