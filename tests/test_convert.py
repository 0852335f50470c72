"""Converters: a foreign checkpoint, converted, resumes with the same next-step losses as its own framework's resume.

Each test produces the original with the real framework (a `transformers.Trainer` run, an
`accelerator.save_state`, NeMo-RL's DCP + torch.save layout), resumes it the framework's
way and records the next two steps (inputs and losses), then resumes the converted
checkpoint through our manager into fresh objects and replays the same inputs. Two steps:
the first loss checks the weights, the second the optimizer moments and the LR schedule.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from hf_rl_ckpt import CheckpointConfig, CheckpointError, CheckpointManager, ResumableDataLoader
from hf_rl_ckpt.convert import convert_checkpoint, detect_format
from hf_rl_ckpt.state.pickled import UntrustedPickleError
from hf_rl_ckpt.testing.families import build_family
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, toy_lm_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _manager(tmp_path: Path, **resume) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "run"), resume=resume or {"mode": "disable"}))


def _replay(model, optimizer, scheduler, batches) -> list[float]:
    """Our loop: forward, backward, step, for each recorded batch; the losses before each step."""
    losses = []
    model.train()
    for inputs, extra in batches:
        loss = model(**inputs, **extra).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return losses


# ------------------------------------------------------------------ HF Trainer
class RecordingTrainer(Trainer):
    """Records what each training step saw: its batch, the loss normaliser and the loss."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.seen = getattr(self, "seen", []) + [({k: v.clone() for k, v in inputs.items()}, num_items_in_batch, loss.item())]
        return loss


def _trainer_args(out: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=1,
        save_strategy="steps", save_steps=2, logging_steps=1, report_to="none", use_cpu=True, seed=0,
        max_grad_norm=0.0, disable_tqdm=True,
    )


def _trainer_run(out: Path, build, *, reference: str = "trainer resume") -> tuple[Path, object, list]:
    """A real Trainer run's `checkpoint-2` of the model `build(seed)` makes, and the two steps after it: of the Trainer's own
    resume from it (`reference="trainer resume"`), or of the uninterrupted run."""
    tok = build_tokenizer()
    data = toy_lm_dataset(tok, n=24, seq_len=16)
    first = RecordingTrainer(model=build(seed=0), args=_trainer_args(out), train_dataset=data, processing_class=tok)
    first.train()
    if reference != "trainer resume":
        return out / "checkpoint-2", data, first.seen[2:]
    resumed = RecordingTrainer(model=build(seed=0), args=_trainer_args(out / "again"), train_dataset=data, processing_class=tok)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    return out / "checkpoint-2", data, resumed.seen


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    return _trainer_run(tmp_path_factory.mktemp("trainer"), lambda seed: build_model("llama", seed=seed))


def _assert_converts_and_resumes_like_the_trainer(tmp_path: Path, trainer_checkpoint, build) -> None:
    original, data, trainer_steps = trainer_checkpoint
    assert detect_format(original) == "hf_trainer"
    converted = convert_checkpoint(original, tmp_path / "converted", trust_pickle=True)
    assert (converted / "trainer_state.json").read_bytes() == (original / "trainer_state.json").read_bytes()
    assert not any(p.suffix in (".pt", ".pth", ".bin") for p in converted.rglob("*")), "the result needs no pickle"

    model = build(seed=7)
    helper = Trainer(model=model, args=_trainer_args(tmp_path / "helper"), train_dataset=data)
    helper.create_optimizer_and_scheduler(num_training_steps=4)  # the Trainer's own param groups and schedule
    state = _manager(tmp_path).load(converted, model=model, optimizer=helper.optimizer, scheduler=helper.lr_scheduler)
    assert state.step == 2 and state.epoch == pytest.approx(1 / 3) and "loss" in state.metrics

    ours = _replay(model, helper.optimizer, helper.lr_scheduler, [(inputs, {"num_items_in_batch": n}) for inputs, n, _ in trainer_steps])
    assert ours == [loss for _, _, loss in trainer_steps]


def test_hf_trainer_checkpoint_converts_and_resumes_like_the_trainer(tmp_path, trainer_checkpoint):
    _assert_converts_and_resumes_like_the_trainer(tmp_path, trainer_checkpoint, lambda seed: build_model("llama", seed=seed))


def test_hf_trainer_checkpoint_of_an_moe_model_converts_and_resumes_exactly(tmp_path):
    """The Trainer saves an MoE model as save_pretrained does, one tensor per expert; the converter reads that form back.

    The reference is the uninterrupted run: transformers' own Trainer resume loads that folder with
    `load_state_dict(strict=False)` (transformers 5.25), which skips the per-expert tensors of a fused model, so its next losses
    are not the run's."""
    build = lambda seed: build_family("mixtral", seed=seed)  # noqa: E731
    _assert_converts_and_resumes_like_the_trainer(tmp_path, _trainer_run(tmp_path / "trainer", build, reference="uninterrupted"), build)


def test_hf_trainer_pickles_need_the_trust_flag(tmp_path, trainer_checkpoint):
    original, _, _ = trainer_checkpoint
    with pytest.raises(UntrustedPickleError, match=r"optimizer\.pt.*scheduler\.pt.*rng_state\.pth.*--trust-pickle") as err:
        convert_checkpoint(original, tmp_path / "out")
    assert not (tmp_path / "out").exists() and len(err.value.paths) == 3
    weights = convert_checkpoint(original, tmp_path / "weights", weights_only=True)  # safetensors only: no trust needed
    info = json.loads((weights / "training_info.json").read_text())
    assert not any(name.startswith("optim/") for name in info["manifest"])


def test_foreign_resume_path_converts_on_the_fly(tmp_path, trainer_checkpoint):
    original, _, trainer_steps = trainer_checkpoint
    refused = _manager(tmp_path, mode="from_path", resume_path=str(original))
    with pytest.raises(UntrustedPickleError, match="resume.trust_pickle"):
        refused.resume(model=build_model("llama", seed=7))
    model = build_model("llama", seed=7)
    state = _manager(tmp_path, mode="from_path", resume_path=str(original), trust_pickle=True, load_weight_only=True).resume(model=model)
    assert state.path == original and state.weights_only and state.step == 2
    assert not any((tmp_path / "run" / ".incomplete").iterdir()), "the converted copy is removed after loading"
    inputs, n, loss = trainer_steps[0]
    assert model(**inputs, num_items_in_batch=n).loss.item() == loss


# ------------------------------------------------------------------ HF Trainer, LoRA run
def _lora_model(base: Path, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # LoRA A matrices come from the global RNG
        torch.manual_seed(seed)
        return get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)


@pytest.fixture(scope="module")
def lora_trainer_checkpoint(tmp_path_factory):
    """A real Trainer LoRA run's own `checkpoint-2` (save_strategy="steps"), and the next two steps of the Trainer's resume from it."""
    out = tmp_path_factory.mktemp("lora_trainer")
    base = out / "base"
    build_model("llama", seed=0).save_pretrained(base)  # loaded by path, so adapter_config.json names it as the base
    tok = build_tokenizer()
    data = toy_lm_dataset(tok, n=24, seq_len=16)
    RecordingTrainer(model=_lora_model(base, seed=0), args=_trainer_args(out), train_dataset=data, processing_class=tok).train()
    resumed = RecordingTrainer(model=_lora_model(base, seed=5), args=_trainer_args(out / "again"), train_dataset=data, processing_class=tok)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    return out / "checkpoint-2", base, data, resumed.seen


def test_hf_trainer_lora_checkpoint_converts_to_an_adapter_checkpoint_and_resumes(tmp_path, lora_trainer_checkpoint):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    original, base, data, trainer_steps = lora_trainer_checkpoint
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= {p.name for p in original.iterdir()}
    assert not (original / "model.safetensors").exists()
    assert detect_format(original) == "hf_trainer"
    converted = convert_checkpoint(original, tmp_path / "converted", trust_pickle=True)
    adapter = converted / "model" / "adapter"
    assert not (converted / "model" / "consolidated").exists() and (adapter / "tokenizer.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    saved = load_file(original / "adapter_model.safetensors")
    assert load_file(adapter / "adapter_model.safetensors").keys() == saved.keys()
    assert any(p.name.startswith("optim") for p in converted.iterdir()), "the optimizer state came along (trusted)"

    model = _lora_model(base, seed=7)  # another LoRA init: everything must come from the checkpoint
    helper = Trainer(model=model, args=_trainer_args(tmp_path / "helper"), train_dataset=data)
    helper.create_optimizer_and_scheduler(num_training_steps=4)  # the Trainer's own param groups (LoRA parameters only)
    state = _manager(tmp_path).load(converted, model=model, optimizer=helper.optimizer, scheduler=helper.lr_scheduler)
    assert state.step == 2
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved), "adapter weights equal the Trainer's"

    ours = _replay(model, helper.optimizer, helper.lr_scheduler, [(inputs, {"num_items_in_batch": n}) for inputs, n, _ in trainer_steps])
    assert ours == [loss for _, _, loss in trainer_steps], "the next steps match the Trainer's own resume (optimizer and schedule too)"


def test_hf_trainer_lora_checkpoint_resumes_through_resume_path(tmp_path, lora_trainer_checkpoint):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    original, base, _, trainer_steps = lora_trainer_checkpoint
    model = _lora_model(base, seed=7)
    state = _manager(tmp_path, mode="from_path", resume_path=str(original), trust_pickle=True, load_weight_only=True).resume(model=model)
    assert state.step == 2 and state.weights_only
    saved = load_file(original / "adapter_model.safetensors")
    assert all(torch.equal(get_peft_model_state_dict(model)[k], saved[k]) for k in saved)
    inputs, n, loss = trainer_steps[0]
    assert model(**inputs, num_items_in_batch=n).loss.item() == loss


def test_hf_trainer_lora_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path, lora_trainer_checkpoint):
    original, base, _, _ = lora_trainer_checkpoint
    src = tmp_path / "checkpoint-2"
    shutil.copytree(original, src)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json names no base_model_name_or_path.*--base-model"):
        convert_checkpoint(src, tmp_path / "out", weights_only=True)
    (src / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors do not fit .*adapter_config\.json.*shape mismatch"):
        convert_checkpoint(src, tmp_path / "out", weights_only=True)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ Accelerate
def _batches(seed: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (4, 16), generator=generator) for _ in range(count)]


def _plain_objects(seed: int):
    model = build_model("llama", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler


def test_accelerate_save_state_converts_and_resumes_like_load_state(tmp_path):
    from accelerate import Accelerator

    batches = [({"input_ids": b, "labels": b}, {}) for b in _batches(0, 4)]
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(*_plain_objects(0))
    for inputs, _ in batches[:2]:
        accelerator.backward(model(**inputs).loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    accelerator.save_state(str(tmp_path / "checkpoint_2"))
    base = tmp_path / "base"
    accelerator.unwrap_model(model).save_pretrained(base)  # what the run started from: its config.json

    fresh = Accelerator(cpu=True)
    reference = fresh.prepare(*_plain_objects(5))
    fresh.load_state(str(tmp_path / "checkpoint_2"))
    expected = _replay(*reference, batches[2:])

    with pytest.raises(Exception, match="--base-model"):
        convert_checkpoint(tmp_path / "checkpoint_2", tmp_path / "x", trust_pickle=True)
    converted = convert_checkpoint(tmp_path / "checkpoint_2", tmp_path / "converted", trust_pickle=True, base_model=str(base))
    ours = _plain_objects(9)
    assert _manager(tmp_path).load(converted, model=ours[0], optimizer=ours[1], scheduler=ours[2]).step == 2
    assert _replay(*ours, batches[2:]) == expected


# ------------------------------------------------------------------ NeMo-RL legacy layout
def _nemo_rl_step(root: Path, base: Path) -> tuple[Path, list]:
    """A NeMo-RL legacy `step_2` written the way nemo_rl.utils.native_checkpoint and the algorithm loop write it."""
    model, optimizer, scheduler = _plain_objects(0)
    data = torch.randint(0, 500, (24, 16), generator=torch.Generator().manual_seed(3))
    loader = ResumableDataLoader(DataLoader(data, batch_size=4, shuffle=True))
    batches = iter(loader)
    for _ in range(2):
        batch = next(batches)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    step_dir = root / "step_2"
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(step_dir / "policy" / "weights"))
    dcp.save({"optim": {"optim": get_optimizer_state_dict(model, optimizer), "sched": scheduler.state_dict()}},
             checkpoint_id=str(step_dir / "policy" / "optimizer"))
    build_tokenizer().save_pretrained(step_dir / "policy" / "tokenizer")
    torch.save(loader.state_dict(), step_dir / "train_dataloader.pt")
    (step_dir / "training_info.json").write_text(json.dumps({"step": 2, "val:accuracy": 0.25}))
    (step_dir / "config.yaml").write_text(yaml.safe_dump({"policy": {"model_name": str(base)}, "grpo": {"seed": 42}}))
    return step_dir, [next(batches) for _ in range(2)]


def test_nemo_rl_legacy_layout_resumes_like_nemo_rl(tmp_path):
    base = tmp_path / "base"
    build_model("llama", seed=0).save_pretrained(base)
    step_dir, next_batches = _nemo_rl_step(tmp_path / "nemo", base)
    assert detect_format(step_dir) == "nemo_rl"
    batches = [({"input_ids": b, "labels": b}, {}) for b in next_batches]

    reference = _plain_objects(5)  # NeMo-RL's own resume: dcp.load into Stateful wrappers
    weights = {"model": get_model_state_dict(reference[0])}
    dcp.load(weights, checkpoint_id=str(step_dir / "policy" / "weights"))
    set_model_state_dict(reference[0], weights["model"])
    optim = {"optim": {"optim": get_optimizer_state_dict(reference[0], reference[1]), "sched": reference[2].state_dict()}}
    dcp.load(optim, checkpoint_id=str(step_dir / "policy" / "optimizer"))
    set_optimizer_state_dict(reference[0], reference[1], optim["optim"]["optim"])
    reference[2].load_state_dict(optim["optim"]["sched"])
    expected = _replay(*reference, batches)

    ours = _plain_objects(9)
    loader = ResumableDataLoader(DataLoader(torch.zeros(24, 16), batch_size=4, shuffle=True))
    state = _manager(tmp_path, mode="from_path", resume_path=str(step_dir), trust_pickle=True).resume(
        model=ours[0], optimizer=ours[1], scheduler=ours[2], dataloader=loader
    )
    assert state.step == 2 and state.metrics == {"val:accuracy": 0.25}
    assert loader.state_dict()["batches_in_epoch"] == 2, "train_dataloader.pt became our dataloader state"
    assert _replay(*ours, batches) == expected


def test_dcp_metadata_is_read_without_a_general_unpickler(tmp_path):
    base = tmp_path / "base"
    build_model("llama", seed=0).save_pretrained(base)
    step_dir, _ = _nemo_rl_step(tmp_path / "nemo", base)
    with pytest.raises(UntrustedPickleError, match=r"policy/weights/\.metadata"):
        convert_checkpoint(step_dir, tmp_path / "out")
    marker = tmp_path / "pwned"
    metadata = step_dir / "policy" / "weights" / ".metadata"
    metadata.write_bytes(b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(Exception, match=r"\.metadata.*posix\.system is not part of DCP metadata"):
        convert_checkpoint(step_dir, tmp_path / "out", trust_pickle=True)
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ legacy torch_save format
def test_torch_save_format_writes_pytorch_model_bin(tmp_path):
    model, optimizer, scheduler = _plain_objects(0)
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "run"), model_save_format="torch_save")
    path = CheckpointManager(config).save(1, model=model, optimizer=optimizer, scheduler=scheduler)
    folder = path / "model" / "consolidated"
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    assert torch.equal(torch.load(folder / "pytorch_model.bin", weights_only=True)["lm_head.weight"], model.lm_head.weight)
    script = "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    assert subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True).returncode == 0

    with pytest.raises(UntrustedPickleError, match="pytorch_model.bin"):
        CheckpointManager(config).resume(model=build_model("llama", seed=3))
    trusted = CheckpointConfig(checkpoint_dir=str(tmp_path / "run"), model_save_format="torch_save", resume={"trust_pickle": True})
    fresh = build_model("llama", seed=3)
    assert CheckpointManager(trusted).resume(model=fresh).step == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
