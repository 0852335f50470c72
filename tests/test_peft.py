"""PEFT (LoRA) runs under `CheckpointCallback`: adapter-only checkpoints, exact resume, loading
with peft, and `export` (copy, or merge into the base)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import _trainer_run as R
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, StateMismatchError
from hf_rl_ckpt.cli import main as cli
from hf_rl_ckpt.export import export_checkpoint
from hf_rl_ckpt.layout import CheckpointLayout
from hf_rl_ckpt.testing import tiny

INPUT_IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 8]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """An uninterrupted 10-step LoRA run, and the same run stopped after step 5 and resumed in a new process."""
    work = tmp_path_factory.mktemp("lora")
    base = R.base_model_dir(work)  # written once, before two processes would race to write it
    spec = {"kind": "peft", "work_dir": str(work)}
    stopped = R.start([{**spec, "ckpt_dir": str(work / "ckpt"), "out_dir": str(work / "stopped"), "stop_at": 5}])
    reference = R.run({**spec, "ckpt_dir": str(work / "ref_ckpt"), "out_dir": str(work / "ref")})
    R.finish(stopped)
    committed_at_stop = sorted(CheckpointLayout(work / "ckpt").committed_steps())
    R.finish(R.start([{**spec, "ckpt_dir": str(work / "ckpt"), "out_dir": str(work / "resumed")}]))
    latest = CheckpointManager(CheckpointConfig(checkpoint_dir=str(work / "ref_ckpt"))).latest()
    return SimpleNamespace(
        work=work, base=base, trainer=reference, latest=latest, committed_at_stop=committed_at_stop,
        reference=R.result(work / "ref"), stopped=R.result(work / "stopped"), resumed=R.result(work / "resumed"),
    )


def test_lora_run_resumes_exactly(lora):
    assert lora.stopped["global_step"] == 5 and lora.committed_at_stop[-1] == 5
    assert lora.resumed["global_step"] == 10
    assert R.losses(lora.resumed["log_history"]) == R.losses(lora.reference["log_history"])
    R.assert_same_weights(lora.resumed["weights"], lora.reference["weights"])


def test_checkpoint_holds_the_adapter_only(lora):
    adapter = lora.latest / "model" / "adapter"
    assert not (lora.latest / "model" / "consolidated").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lora.base) and config["r"] == 16
    # Size: the adapter folder's weight-bearing files (all but the tokenizer files saved for serving) vs the tensors' bytes.
    tensor_bytes = sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(lora.trainer.model).values())
    tokenizer_files = set(tiny.build_tokenizer().save_pretrained(str(lora.work / "tok")))
    folder_bytes = sum(p.stat().st_size for p in adapter.iterdir() if str(lora.work / "tok" / p.name) not in tokenizer_files)
    assert folder_bytes <= 1.1 * tensor_bytes, (folder_bytes, tensor_bytes)
    # No base weight anywhere: every tensor of every safetensors file is LoRA (weights and optimizer state) or RNG state.
    for path in lora.latest.rglob("*.safetensors"):
        with safe_open(path, framework="pt") as fh:
            names = list(fh.keys())
        if path.parent.name != "rng":
            assert names and all("lora_" in name for name in names), (path, [n for n in names if "lora_" not in n][:3])
    base_bytes = (lora.base / "model.safetensors").stat().st_size
    assert sum(p.stat().st_size for p in lora.latest.rglob("*") if p.is_file()) < base_bytes / 2


def test_adapter_loads_with_peft_bit_exact(lora):
    base = AutoModelForCausalLM.from_pretrained(lora.base)
    loaded = PeftModel.from_pretrained(base, lora.latest / "model" / "adapter")
    assert (logits(loaded) - logits(lora.trainer.model)).abs().max().item() == 0.0


def test_export_copies_the_adapter_or_merges_it(lora, tmp_path):
    assert cli(["export", str(lora.latest), str(tmp_path / "adapter")]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(p.name for p in (lora.latest / "model" / "adapter").iterdir())
    merged = export_checkpoint(lora.latest, tmp_path / "merged", merge_lora=True)
    with safe_open(merged / "model.safetensors", framework="pt") as fh:
        assert not [name for name in fh.keys() if "lora" in name]
    loaded = AutoModelForCausalLM.from_pretrained(merged)
    torch.testing.assert_close(logits(loaded), logits(lora.trainer.model), rtol=0, atol=1e-4)
    assert (merged / "tokenizer.json").is_file()


def test_export_errors_are_clear(lora, tmp_path, capsys):
    assert cli(["export", str(lora.latest), str(tmp_path / "out"), "--merge-lora", "--base", str(tmp_path / "missing")]) == 2
    assert "cannot load the base model" in capsys.readouterr().err and not (tmp_path / "out").exists()
    plain = CheckpointManager(CheckpointConfig(checkpoint_dir=str(lora.work / "plain")))
    step = plain.save(1, model=tiny.build_model("llama", seed=0))
    assert cli(["export", str(step), str(tmp_path / "out"), "--merge-lora"]) == 2
    assert "no adapter" in capsys.readouterr().err


def test_plain_model_cannot_load_an_adapter_checkpoint(lora):
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(lora.work / "ref_ckpt")))
    with pytest.raises(StateMismatchError, match="holds model/adapter/"):
        manager.load(lora.latest, model=tiny.build_model("llama", seed=0), weights_only=True)
