"""The hf-rl-ckpt command line: list and verify, as a user runs them."""

from __future__ import annotations

import json

import pytest

from hf_rl_ckpt import CheckpointConfig, CheckpointManager

pytestmark = pytest.mark.logic


def test_list_and_verify(tmp_path, make_objects, cli):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=1, metric_name="val_reward"))
    manager.save(10, **objs.as_kwargs(), metrics={"val_reward": 0.8})
    manager.save(20, **objs.as_kwargs(), metrics={"val_reward": 0.3})

    table = cli("list", str(tmp_path))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["step", "metrics", "top-k", "size", "status"]
    assert lines[2].split()[:3] == ["10", "val_reward=0.8", "1"] and lines[2].endswith("complete")
    assert lines[3].split()[:3] == ["20", "val_reward=0.3", "-"]

    rows = json.loads(cli("list", str(tmp_path), "--json", "--verify").stdout)
    assert [(r["step"], r["status"]) for r in rows] == [(10, "verified"), (20, "verified")]

    ok = cli("verify", str(tmp_path / "step_20"))
    assert ok.returncode == 0 and "OK" in ok.stdout
    (tmp_path / "step_20" / "scheduler.json").write_text("{}")
    bad = cli("verify", str(tmp_path / "step_20"))
    assert bad.returncode == 1 and "scheduler.json" in bad.stderr
    assert cli("verify", str(tmp_path)).returncode == 2


def test_list_fails_when_it_shows_a_corrupt_checkpoint(tmp_path, make_objects, cli):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    manager.save(10, **objs.as_kwargs())
    manager.save(20, **objs.as_kwargs())
    assert cli("list", str(tmp_path), "--verify").returncode == 0
    weights = tmp_path / "step_10" / "model" / "consolidated" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    shown = cli("list", str(tmp_path), "--verify")
    assert "CORRUPT" in shown.stdout and shown.returncode == 1, "a check that found a bad file fails (README exit codes)"
    assert cli("list", str(tmp_path), "--verify", "--json").returncode == 1
    assert cli("list", str(tmp_path)).returncode == 0, "without --verify only sizes are checked, and they are right"
