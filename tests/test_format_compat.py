"""Checkpoints written before the core redesign (format 1 as of commit 11b40b9) still resume exactly.

The fixtures in tests/fixtures/format_v1 were written by the old code; see their README.md.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ResumableDataLoader
from hf_rl_ckpt.testing.tiny import build_model
from hf_rl_ckpt.verify import verify_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=1, num_key_value_heads=1, head_dim=32, num_hidden_layers=1)


def training_objects(kind: str):
    """The objects the fixture run trained, freshly built (different from the saved state until resumed)."""
    torch.manual_seed(0)  # the data below is the run's own; the model starts from other weights
    model = build_model("llama", seed=1, **SMALL)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    data = [torch.randint(0, 512, (8,)) for _ in range(12)]
    loader = ResumableDataLoader(DataLoader(data, batch_size=2, shuffle=True))
    return model, optimizer, scheduler, loader


@pytest.mark.parametrize("kind", ["plain", "peft"])
def test_a_format_1_checkpoint_resumes_exactly(tmp_path: Path, kind: str) -> None:
    run = tmp_path / kind
    shutil.copytree(FIXTURES / kind, run)
    model, optimizer, scheduler, loader = training_objects(kind)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(run), keep_top_k=2, metric_name="loss", higher_is_better=False))
    state = manager.resume(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)

    assert state is not None and state.step == 2 and state.extra == {"kind": kind}
    assert [row.step for row in manager.checkpoints()] == [1, 2]
    with safe_open(str(FIXTURES / f"{kind}_expected.safetensors"), "pt") as expected:
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        for name, param in trainable:
            torch.testing.assert_close(param.detach(), expected.get_tensor(f"param.{name}"), rtol=0, atol=0)
            for key, value in optimizer.state[param].items():
                want = expected.get_tensor(f"optim.{name}.{key}")
                torch.testing.assert_close(value.reshape(want.shape), want, rtol=0, atol=0)
        assert scheduler.get_last_lr() == json.loads(expected.metadata()["lr"])
        torch.testing.assert_close(next(iter(loader)), expected.get_tensor("next_batch"), rtol=0, atol=0)
        torch.testing.assert_close(torch.rand(4), expected.get_tensor("rand_after"), rtol=0, atol=0)
    manager.finalize()


def test_a_format_1_checkpoint_serves_and_continues(tmp_path: Path) -> None:
    """Its deployable folder loads in transformers, and a new save lands next to the old ones under the same retention."""
    run = tmp_path / "plain"
    shutil.copytree(FIXTURES / "plain", run)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(run), keep_top_k=2, metric_name="loss", higher_is_better=False))
    served = AutoModelForCausalLM.from_pretrained(manager.consolidated_path())
    model, optimizer, scheduler, loader = training_objects("plain")
    manager.resume(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
    for name, tensor in served.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0)
    manager.save(3, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader, metrics={"loss": 0.0})
    assert manager.latest() == run / "step_3" and len(manager.checkpoints()) == 2
    manager.finalize()


SHA256_FIXTURE = Path(__file__).parent / "fixtures" / "format_v1_sha256"
VOLATILE = {"format_version", "created_at", "save_seconds", "versions", "manifest"}  # when and by what it was written


def _without_transformers_version(data: bytes) -> bytes:
    return re.sub(rb'\n  "transformers_version": "[^"]*",?', b"", data)


def _tensors(path: Path) -> tuple[dict[str, str] | None, dict[str, tuple[str, list[int], bytes]]]:
    """A safetensors file's metadata and every tensor's dtype, shape and bytes, whatever order the file lays them out in."""
    with safe_open(path, framework="pt") as reader:
        tensors = {}
        for name in reader.keys():
            tensor = reader.get_tensor(name)
            tensors[name] = (str(tensor.dtype), list(tensor.shape), tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return reader.metadata(), tensors


def test_a_sha256_manifest_checkpoint_verifies_resumes_and_resaves_to_the_same_bytes(tmp_path: Path) -> None:
    """The last format-1 checkpoint (sha256 manifest) still verifies and resumes; saving the resumed state
    writes the same bytes in every file (the same tensors in a safetensors file, which since issue 28 orders them
    as `safetensors.torch.save_file` does), and a training_info.json that differs only in the digests it records."""
    old = tmp_path / "run"
    shutil.copytree(SHA256_FIXTURE / "run", old)
    old_info = verify_checkpoint(old / "step_2")
    assert all(set(entry) == {"size", "sha256"} for entry in old_info["manifest"].values())

    model, optimizer, scheduler, loader = training_objects("plain")
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(old), keep_top_k=2, metric_name="loss", higher_is_better=False))
    state = manager.resume(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
    assert state is not None and state.step == 2 and state.policy_version == 1
    assert state.rollout_state["cursor"] == 5 and torch.equal(state.rollout_state["logprobs"], torch.arange(6.0).reshape(2, 3))
    manager.finalize()

    new = Path("/tmp/fx/run")  # the fixture's own checkpoint_dir, which its README.md and config.yaml name
    shutil.rmtree(new, ignore_errors=True)
    try:
        resaver = CheckpointManager(CheckpointConfig(checkpoint_dir=str(new), keep_top_k=2, metric_name="loss", higher_is_better=False))
        resaver.save(2, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader, metrics=old_info["metrics"],
                     rollout_state=state.rollout_state, policy_version=state.policy_version)
        resaver.finalize()
        new_info = verify_checkpoint(new / "step_2")
        assert new_info["format_version"] == 2
        assert {k: v for k, v in new_info.items() if k not in VOLATILE} == {k: v for k, v in old_info.items() if k not in VOLATILE}
        assert sorted(new_info["manifest"]) == sorted(old_info["manifest"])
        for rel, entry in old_info["manifest"].items():
            written, fixture = (new / "step_2" / rel).read_bytes(), (old / "step_2" / rel).read_bytes()
            if rel.endswith("config.json"):  # transformers records its own version there
                written, fixture = (_without_transformers_version(data) for data in (written, fixture))
            if rel in ("config.yaml", "README.md"):  # the same setting, spelled as since issue 19 (`true` reads as `every`)
                fixture = fixture.replace(b"save_consolidated: true", b"save_consolidated: every")
            if rel.endswith(".safetensors"):  # since issue 28 tensors are laid out as the safetensors library lays them out
                written, fixture = (_tensors(root / "step_2" / rel) for root in (new, old))
            assert written == fixture, rel
            assert set(new_info["manifest"][rel]) == {"size", "xxh3_128"}, rel
    finally:
        shutil.rmtree(new, ignore_errors=True)
