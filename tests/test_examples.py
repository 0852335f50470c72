"""Every example runs offline to the end, started the way a user starts it, and leaves verified checkpoints.

Each example runs as its own process (a fresh interpreter, as from the shell) with small step
counts; what it wrote is then checked through the library's own readers: the registry rows
(what `hf-rl-ckpt list` prints) and a full re-hash of every checkpoint (`hf-rl-ckpt verify`).
`examples/demo.py` is the README's first command (the main job); it is run here too, so a
broken demo fails the suite rather than a newcomer's first try.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_rl_ckpt.cli import list_rows
from hf_rl_ckpt.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(*command: str, timeout: float = 240) -> str:
    """Run a command from the repository root, offline; return its output, fail with its tail on a non-zero exit."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`{' '.join(command)}` exited with {result.returncode}:\n{output[-5000:]}"
    return output


def example(name: str, *args: str) -> str:
    return run(sys.executable, str(EXAMPLES / name), *args)


def verified_rows(ckpt_dir: Path) -> dict[int, dict]:
    """Registry rows by step, after re-hashing every file of every checkpoint against its manifest."""
    rows = list_rows(ckpt_dir, checksums=True)
    assert rows and all(row["status"] == "verified" for row in rows), [(row["step"], row["status"]) for row in rows]
    return {row["step"]: row for row in rows}


def test_sft_trainer(tmp_path: Path) -> None:
    output = example("sft_trainer.py", "--output-dir", str(tmp_path), "--max-steps", "6", "--save-every", "2")
    rows = verified_rows(tmp_path / "ckpt")
    # keep_top_k=2 by eval_loss, plus the newest; each row carries the eval_loss of its step.
    losses = {step: row["metrics"]["eval_loss"] for step, row in rows.items()}
    assert 6 in rows and len(rows) <= 3 and sorted(r["top_k_rank"] for r in rows.values() if r["top_k_rank"]) == [1, 2]
    best = min(losses, key=losses.get)
    assert f"best checkpoint by eval_loss: {tmp_path / 'ckpt' / f'step_{best}'}" in output
    assert "saved checkpoint step 6" in output and cli(["verify", str(tmp_path / "ckpt" / f"step_{best}")]) == 0
    assert (tmp_path / "ckpt" / f"step_{best}" / "model" / "consolidated" / "tokenizer.json").is_file()


def test_lora_sft(tmp_path: Path) -> None:
    example("lora_sft.py", "--output-dir", str(tmp_path), "--max-steps", "4", "--save-every", "2")
    rows = verified_rows(tmp_path / "ckpt")
    assert set(rows) == {2, 4}
    step_dir = tmp_path / "ckpt" / "step_4" / "model"
    assert sorted(p.name for p in step_dir.iterdir()) == ["adapter"], "a LoRA checkpoint holds the adapter, not the base"
    adapter_config = json.loads((step_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "base")
    best = min(rows, key=lambda step: rows[step]["metrics"]["eval_loss"])
    merged = tmp_path / f"merged_step_{best}"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()


def test_grpo_trl(tmp_path: Path) -> None:
    output = example("grpo_trl.py", "--output-dir", str(tmp_path), "--max-steps", "4", "--save-every", "1")
    rows = verified_rows(tmp_path / "ckpt")
    rewards = {step: row["metrics"]["reward"] for step, row in rows.items()}
    ranked = sorted((row["top_k_rank"], step) for step, row in rows.items() if row["top_k_rank"])
    assert 4 in rows and len(ranked) == 2 and len(rows) <= 3
    assert rewards[ranked[0][1]] >= rewards[ranked[1][1]], "rank 1 holds the highest reward"
    assert f"highest-reward checkpoint: {tmp_path / 'ckpt' / f'step_{ranked[0][1]}'}" in output


@pytest.mark.slow
def test_fsdp_custom_loop_saves_at_world_size_2_and_resumes_at_1(tmp_path: Path) -> None:
    script = str(EXAMPLES / "fsdp_custom_loop.py")
    common = ["--output-dir", str(tmp_path), "--max-steps", "4", "--save-every", "2"]
    # --standalone: torchrun binds a free port itself (no race with other jobs for a port picked beforehand).
    run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *common, "--stop-at", "2")
    shards = sorted(p.name for p in (tmp_path / "step_2" / "model" / "sharded").iterdir() if p.suffix == ".safetensors")
    assert len(shards) == 2, shards  # one slice per rank
    output = run(sys.executable, script, *common)  # a plain `python` run: world size 1, no launcher
    assert f"resumed from {tmp_path / 'step_2'} (step 2)" in output
    rows = verified_rows(tmp_path)
    assert set(rows) == {2, 4}
    assert (tmp_path / "step_4" / "model" / "consolidated" / "model.safetensors").is_file()


def test_custom_loop(tmp_path: Path) -> None:
    example("custom_loop.py", "--output-dir", str(tmp_path), "--max-steps", "10", "--single-process")
    assert set(verified_rows(tmp_path)) == {5, 10}


def test_accelerate_train_single_process(tmp_path: Path) -> None:
    output = example("accelerate_train.py", "--cpu", "--output-dir", str(tmp_path), "--max-steps", "4", "--save-every", "2")
    assert "starting fresh" in output
    assert set(verified_rows(tmp_path)) == {2, 4}


def test_demo_main_job(tmp_path: Path) -> None:
    output = run(sys.executable, str(EXAMPLES / "demo.py"), "--output-dir", str(tmp_path))
    assert "resumed from" in output and "step 12" in output, output[-3000:]
    assert "3) serve the best checkpoint" in output and "done in" in output
    rows = verified_rows(tmp_path / "ckpt")
    assert 30 in rows and sorted(r["top_k_rank"] for r in rows.values() if r["top_k_rank"]) == [1, 2]
