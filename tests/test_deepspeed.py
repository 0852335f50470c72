"""`CheckpointCallback` under DeepSpeed ZeRO-2 and ZeRO-3 with a real `Trainer`, 2 ranks on gloo (tests/dist/deepspeed_trainer.py).

Every run is a tiny Llama trained 6 steps (dropout, shuffled data), checkpointing every 2
steps. For each of ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-3 + LoRA: an uninterrupted run, and a run killed
right after its step-4 checkpoint and resumed by a new torchrun.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_rl_ckpt import verify_checkpoint
from hf_rl_ckpt.testing import tiny

pytest.importorskip("deepspeed", reason="DeepSpeed is a test dependency (pip install -e '.[test]'); these tests need it")
sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dist_helpers import pickle_files, torchrun  # noqa: E402

SCRIPT = Path(__file__).parent / "dist" / "deepspeed_trainer.py"
KINDS = {"zero1": {"stage": 1}, "zero2": {"stage": 2}, "zero3": {"stage": 3}, "zero3-lora": {"stage": 3}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("deepspeed")
    base = work / "base"
    tiny.build_model("llama", seed=1, dropout=0.1).save_pretrained(base)
    tiny.build_tokenizer().save_pretrained(base)

    def spec(kind: str, name: str, ckpt: str, **extra) -> dict:
        lora = {"base_dir": str(base)} if kind == "zero3-lora" else {}
        return {**KINDS[kind], **lora, "ckpt_dir": str(work / kind / ckpt), "out_dir": str(work / kind / name), **extra}

    def launch(nproc: int, *specs: dict) -> str:
        return torchrun(SCRIPT, nproc, json.dumps(list(specs)), timeout=600)

    references = [spec(kind, "reference", "reference-ckpt", trainer_saves=kind != "zero3-lora", sync=True) for kind in KINDS]
    launch(2, *references, spec("zero2", "killed", "ckpt", kill_after_save=4))
    launch(2, spec("zero2", "resumed", "ckpt"), spec("zero3", "killed", "ckpt", kill_after_save=4))
    launch(2, spec("zero3", "resumed", "ckpt"), spec("zero3-lora", "killed", "ckpt", kill_after_save=4))
    launch(2, spec("zero3-lora", "resumed", "ckpt"), spec("zero1", "killed", "ckpt", kill_after_save=4))
    launch(2, spec("zero1", "resumed", "ckpt"))
    one_rank = launch(1, spec("zero3", "one-rank", "ckpt", expect_error="2-rank job"))
    return SimpleNamespace(work=work, base=base, one_rank=one_rank)


def _result(folder: Path) -> dict:
    result = json.loads((folder / "result.json").read_text())
    result["losses"] = [(entry["step"], entry["loss"]) for entry in result["log_history"] if "loss" in entry]
    result["weights"] = load_file(str(folder / "final.safetensors"))
    return result


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_run_killed_after_a_checkpoint_resumes_with_identical_losses_and_weights(runs, kind):
    reference, resumed = _result(runs.work / kind / "reference"), _result(runs.work / kind / "resumed")
    assert reference["steps_run"] == 6 and resumed["steps_run"] == 2, "the resumed process ran only the steps after step 4"
    assert resumed["losses"] == reference["losses"] and len(reference["losses"]) == 6
    different = [name for name, tensor in reference["weights"].items() if not torch.equal(tensor, resumed["weights"][name])]
    assert not different, f"{kind}: {len(different)} tensors differ after resume, e.g. {different[:3]}"
    info = verify_checkpoint(runs.work / kind / "ckpt" / "step_6")  # written by the resumed run (step_4 may be evicted: top-2 by loss)
    assert info["contents"]["optimizer"] == "zero" and {f"optim/zero/rank_{r}.safetensors" for r in (0, 1)} <= set(info["manifest"])
    assert pickle_files(runs.work / kind / "ckpt") == [] and pickle_files(runs.work / kind / "reference-ckpt") == []


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_the_consolidated_folder_loads_with_from_pretrained_and_equals_the_gathered_model(runs, kind):
    folder = runs.work / kind / "reference-ckpt" / "step_6" / "model" / "consolidated"
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    gathered = _result(runs.work / kind / "reference")["weights"]  # gathered by DeepSpeed's GatheredParameters, in the run
    assert loaded.keys() == gathered.keys()
    assert all(torch.equal(loaded[name], gathered[name]) for name in gathered)
    assert loaded["lm_head.weight"].dtype == torch.float32


@pytest.mark.parametrize("kind", list(KINDS))
def test_sync_weight_path_publishes_the_gathered_weights(runs, kind):
    """sync_weight_path under ZeRO: the published folder (step 6) holds the trained weights, not ZeRO-3's empty slices."""
    published = (runs.work / kind / "reference" / "sync").resolve()
    gathered = _result(runs.work / kind / "reference")["weights"]
    if kind == "zero3-lora":
        saved = load_file(str(published / "adapter_model.safetensors"))
        gathered = {name.replace(".default", ""): tensor for name, tensor in gathered.items() if "lora_" in name}
    else:
        saved = load_file(str(published / "model.safetensors"))
    assert published.name.endswith("6") and saved.keys() == gathered.keys()
    assert all(torch.equal(saved[name], gathered[name]) for name in saved)


def test_zero3_lora_adapter_holds_every_trained_tensor_and_loads_with_auto_peft(runs):
    from peft import AutoPeftModelForCausalLM

    adapter = runs.work / "zero3-lora" / "reference-ckpt" / "step_6" / "model" / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    gathered = {name.replace(".default", ""): tensor for name, tensor in _result(runs.work / "zero3-lora" / "reference")["weights"].items() if "lora_" in name}
    assert sorted(saved) == sorted(gathered) and len(saved) == 2 * 2 * 2, "lora_A and lora_B of q_proj and v_proj in both layers"
    assert all(torch.equal(saved[name], gathered[name]) for name in saved)
    assert all(saved[name].abs().sum() > 0 for name in saved if "lora_B" in name), "trained (lora_B starts at zero)"
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    state = {name.replace(".default", ""): tensor for name, tensor in model.state_dict().items() if "lora_" in name}
    assert all(torch.equal(state[name], saved[name]) for name in saved)


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_convert_turns_the_trainers_own_deepspeed_checkpoint_into_ours_bit_for_bit(runs, kind, tmp_path):
    """`hf-rl-ckpt convert` of the Trainer's checkpoint-6 (global_step6/, latest, rng_state_<r>.pth) equals our step_6."""
    from hf_rl_ckpt.convert import convert_checkpoint
    from hf_rl_ckpt.errors import UntrustedPickleError

    theirs, ours = runs.work / kind / "reference" / "trainer" / "checkpoint-6", runs.work / kind / "reference-ckpt" / "step_6"
    assert (theirs / "latest").read_text().strip() == "global_step6"
    with pytest.raises(UntrustedPickleError, match="global_step6"):
        convert_checkpoint(theirs, tmp_path / "refused")
    converted = convert_checkpoint(theirs, tmp_path / "converted", trust_pickle=True)
    info = verify_checkpoint(converted)
    assert info["step"] == 6 and info["contents"]["optimizer"] == "zero"
    for name in ["model/consolidated/model.safetensors", *(f"optim/zero/rank_{r}.safetensors" for r in (0, 1)), "rng/rank_0.safetensors", "rng/rank_1.safetensors"]:
        got, expected = load_file(str(converted / name)), load_file(str(ours / name))
        assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in got), name
    assert pickle_files(converted) == []


def test_resuming_zero_partitions_at_another_world_size_is_refused_with_a_clear_error(runs):
    assert "refused as expected: StateMismatchError" in runs.one_rank
    assert "ZeRO-3 partition of a 2-rank job; this job runs ZeRO-3 on 1 rank(s)" in runs.one_rank
    assert "resume.load_weight_only: true" in runs.one_rank


def _steps(log: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, log.read_text().splitlines())]


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_save_state_under_zero_resumes_exactly(tmp_path, stage):
    """`register_checkpointing` on an Accelerator with a DeepSpeed plugin (examples/accelerate_train.py --zero-stage)."""
    example = Path(__file__).parents[1] / "examples" / "accelerate_train.py"
    common = ["--cpu", "--zero-stage", str(stage), "--max-steps", "6", "--save-every", "3"]
    torchrun(example, 2, *common, "--output-dir", str(tmp_path / "straight"), "--log-file", str(tmp_path / "straight.jsonl"), timeout=300)
    resumed = ["--output-dir", str(tmp_path / "resumed"), "--log-file", str(tmp_path / "resumed.jsonl")]
    torchrun(example, 2, *common, *resumed, "--stop-at", "4", timeout=300)
    assert "resumed from step 4" in torchrun(example, 2, *common, *resumed, timeout=300)
    assert _steps(tmp_path / "resumed.jsonl") == _steps(tmp_path / "straight.jsonl") and len(_steps(tmp_path / "straight.jsonl")) == 6
    final = [load_file(str(tmp_path / run / "step_6" / "model" / "consolidated" / "model.safetensors")) for run in ("straight", "resumed")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][name], final[1][name]) for name in final[0])
    assert verify_checkpoint(tmp_path / "resumed" / "step_4")["contents"]["optimizer"] == "zero"
    assert pickle_files(tmp_path / "straight") == [] and pickle_files(tmp_path / "resumed") == []
