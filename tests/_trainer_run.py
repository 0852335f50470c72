"""Training runs with `CheckpointCallback` for the Trainer/PEFT/TRL tests, in-process or as a real process.

Exact-resume tests must stop a run by ending its process, so this file is also a script:

    python tests/_trainer_run.py '[{"kind": "causal", "ckpt_dir": ..., "out_dir": ..., "kill_after_save": 4}, ...]'

runs each spec in turn and exits (`kill_after_save: N` ends the process at once after the
step-N checkpoint, or once it is uploaded too with `kill_after_upload: true`; `sigterm_during: N` sends it a SIGTERM during step N). Every run writes `out_dir/result.json` (global step, steps trained in this process and
log history) and `out_dir/final.safetensors` (the model's state dict at the end), which the
tests compare against an uninterrupted run.

Kinds (all tiny, CPU, dropout on, shuffled data):
- `causal`: `Trainer`, gradient accumulation 2, evaluation every 3 steps, top-2 by eval_loss.
- `peft`: the same with a LoRA adapter (base loaded from a local folder, as in real use).
- `sft`: TRL `SFTTrainer` on text rows, gradient accumulation 2.
- `grpo`: TRL `GRPOTrainer` with a toy length reward, top-2 by `reward` (`grpo_args`: more `GRPOConfig`
  settings, e.g. `steps_per_generation` and `num_iterations`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_rl_ckpt import CheckpointCallback, CheckpointConfig
from hf_rl_ckpt.testing import tiny

DROPOUT = 0.1
COMMON_ARGS = dict(
    per_device_train_batch_size=2,
    learning_rate=3e-3,
    warmup_steps=2,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    seed=7,
    disable_tqdm=True,
    **tiny.exact_cpu_args(),
)


class KillAfterSave(TrainerCallback):
    """Ends the process the moment the step-`step` checkpoint is committed, like a preemption would.

    Placed after `CheckpointCallback`, whose `on_step_begin` has just written the checkpoint.
    With `uploaded`, the node dies once that callback's remote uploads are done.
    """

    def __init__(self, step: int, uploaded: CheckpointCallback | None = None) -> None:
        self.step, self.uploaded = step, uploaded

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if self.uploaded is not None:
                self.uploaded.manager.events.drain()
            os._exit(0)


class SignalDuring(TrainerCallback):
    """Sends this process a real SIGTERM during step `step` (as a scheduler or the kubelet would), before its end."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


class CountSteps(TrainerCallback):
    """Counts the optimizer steps this process trained (a resumed run trains fewer than it reports in global_step)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class StopAt(TrainerCallback):
    """Stops training after step `step` the way a scheduler's time limit would: cleanly, through on_train_end."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A toy GRPO reward that differs from step to step (an untrained tiny model never gets the arithmetic right)."""
    return [len(text) / 10 for text in completions]


def base_model_dir(work: Path) -> Path:
    """A local base model folder for the LoRA runs (written once; every run loads it like a Hub model)."""
    folder = work / "base"
    if not (folder / "config.json").is_file():
        tmp = work / f".base-{os.getpid()}"
        tiny.build_model("llama", seed=3, dropout=DROPOUT).save_pretrained(tmp)
        tiny.build_tokenizer().save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


def lora_model(work: Path) -> Any:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_model_dir(work))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=DROPOUT, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # LoRA A matrices are drawn from the global RNG: same init in every process
        torch.manual_seed(0)
        return get_peft_model(base, lora)


def build_trainer(spec: dict[str, Any]) -> Trainer:
    """The trainer a spec describes (see the module docstring for the kinds)."""
    kind = spec["kind"]
    ckpt_config = CheckpointConfig.from_dict(
        {"checkpoint_dir": spec["ckpt_dir"], **DEFAULT_CHECKPOINTING[kind], **spec.get("checkpointing", {})}
    )
    callbacks: list[TrainerCallback] = [CheckpointCallback(ckpt_config)]
    if "kill_after_save" in spec:
        callbacks.append(KillAfterSave(spec["kill_after_save"], callbacks[0] if spec.get("kill_after_upload") else None))
    if "sigterm_during" in spec:
        callbacks.append(SignalDuring(spec["sigterm_during"]))
    if "stop_at" in spec:
        callbacks.append(StopAt(spec["stop_at"]))
    out = str(Path(spec["out_dir"]) / "trainer")
    tok = tiny.build_tokenizer()
    if kind in ("causal", "peft"):
        model = lora_model(Path(spec["work_dir"])) if kind == "peft" else tiny.build_model("llama", seed=1, dropout=DROPOUT)
        args = TrainingArguments(
            out, max_steps=spec.get("max_steps", 10), gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=3,
            per_device_eval_batch_size=4, **COMMON_ARGS,
        )
        return Trainer(
            model=model, args=args, processing_class=tok, callbacks=callbacks,
            train_dataset=tiny.toy_lm_dataset(tok, n=24, seq_len=16, seed=1), eval_dataset=tiny.toy_lm_dataset(tok, n=8, seq_len=16, seed=2),
        )
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            out, max_steps=spec.get("max_steps", 6), gradient_accumulation_steps=2, max_length=24,
            **COMMON_ARGS,
        )
        return SFTTrainer(
            model=tiny.build_model("qwen2", seed=2, dropout=DROPOUT), args=args, processing_class=tok, callbacks=callbacks,
            train_dataset=tiny.toy_text_dataset(n=16, seed=3),
        )
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            out, max_steps=spec.get("max_steps", 4), num_generations=2, max_completion_length=6,
            **{**COMMON_ARGS, **spec.get("grpo_args", {})},
        )
        return GRPOTrainer(
            model=tiny.build_model("llama", seed=4), args=args, processing_class=tok, callbacks=callbacks,
            reward_funcs=length_reward, train_dataset=tiny.toy_prompt_dataset(n=16, seed=5),
        )
    raise ValueError(f"unknown kind {kind!r}")


DEFAULT_CHECKPOINTING: dict[str, dict[str, Any]] = {
    "causal": {"save_period": 2, "metric_name": "eval_loss", "higher_is_better": False, "keep_top_k": 2},
    "peft": {"save_period": 2, "metric_name": "eval_loss", "higher_is_better": False, "keep_top_k": 2},
    "sft": {"save_period": 2},
    "grpo": {"save_period": 1, "metric_name": "reward", "keep_top_k": 2},
}


def run(spec: dict[str, Any]) -> Trainer:
    """Train per `spec` and write its result files; returns the trainer (for in-process use)."""
    torch.set_num_threads(1)  # bitwise-reproducible CPU math in every process, and polite on a shared machine
    trainer = build_trainer(spec)
    counted = CountSteps()
    trainer.add_callback(counted)
    trainer.train(**spec.get("train_kwargs", {}))
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(
        {"global_step": trainer.state.global_step, "steps_trained_here": counted.steps, "log_history": trainer.state.log_history}
    ))
    save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}, out / "final.safetensors")
    return trainer


def start(specs: list[dict[str, Any]]) -> subprocess.Popen:
    """Run `specs` in a new Python process, started now so the caller can work meanwhile; see `finish`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, __file__, json.dumps(specs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def finish(process: subprocess.Popen) -> str:
    """Wait for a `start`ed process; fail with the tail of its output unless it exited cleanly."""
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, f"training process failed (exit {process.returncode}):\n{output[-4000:]}"
    return output


def result(out_dir: str | Path) -> dict[str, Any]:
    """What `run` wrote: global step, log history, and the final weights under "weights"."""
    out_dir = Path(out_dir)
    data = json.loads((out_dir / "result.json").read_text())
    data["weights"] = load_file(out_dir / "final.safetensors")
    return data


def losses(log_history: list[dict[str, Any]]) -> list[tuple[int, str, float]]:
    """Every training and evaluation loss with its step, in logging order."""
    return [(entry["step"], key, entry[key]) for entry in log_history for key in ("loss", "eval_loss") if key in entry]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


if __name__ == "__main__":
    for one in json.loads(sys.argv[1]):
        run(one)
