"""`CheckpointCallback` with a real `Trainer` under DeepSpeed ZeRO-2/3 (CPU, gloo), launched by tests/test_deepspeed.py.

    torchrun --nproc_per_node 2 deepspeed_trainer.py '[{"stage": 3, "ckpt_dir": ..., "out_dir": ...}, ...]'

Runs each spec in turn, as `tests/_trainer_run.py` does for one process: a tiny Llama (dropout
on, shuffled data) trained `max_steps` with `save_period: 2`; `base_dir: DIR` trains a LoRA
adapter on the base model saved there instead; `kill_after_save: N` ends every rank right after
the step-N checkpoint (so it must be the last spec); `expect_error: TEXT` expects `train()` to
raise an error saying TEXT (and prints it); `sync: true` also publishes the weights every step to
`out_dir/sync` (`sync_weight_path`); `trainer_saves: true` lets the Trainer write its own
DeepSpeed `checkpoint-N` folders too. Rank 0 writes `out_dir/result.json` (global step, steps this process ran, log history) and
`out_dir/final.safetensors` (the whole model, gathered by DeepSpeed itself, not by hf_rl_ckpt).

ZeRO-3 is configured with `stage3_param_persistence_threshold: 0`: a tiny model's parameters
would otherwise all stay whole on every rank, and nothing would be partitioned.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "hf_rl_ckpt-torch-extensions"))
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_rl_ckpt import CheckpointCallback, CheckpointConfig  # noqa: E402
from hf_rl_ckpt.testing import tiny  # noqa: E402


class KillAfterSave(TrainerCallback):
    """Ends the process right after the step-`step` checkpoint (written by CheckpointCallback's on_step_begin)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            sys.stdout.flush()
            os._exit(0)


class CountSteps(TrainerCallback):
    """How many optimizer steps this process ran (a resumed run runs only the steps after its checkpoint)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False}, "fp16": {"enabled": False},
    }


def build_model(spec: dict) -> torch.nn.Module:
    if "base_dir" not in spec:
        return tiny.build_model("llama", seed=1, dropout=0.1)
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(spec["base_dir"])  # under ZeRO-3: partitioned as it loads (zero.Init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def run(spec: dict) -> None:
    sync = {"sync_weight_path": str(Path(spec["out_dir"]) / "sync")} if spec.get("sync") else {}
    checkpointing = CheckpointConfig(
        checkpoint_dir=spec["ckpt_dir"], save_period=2, metric_name="loss", higher_is_better=False, keep_top_k=2, **sync,
    )
    counter = CountSteps()
    callbacks: list[TrainerCallback] = [CheckpointCallback(checkpointing), counter]
    if "kill_after_save" in spec:
        callbacks.append(KillAfterSave(spec["kill_after_save"]))
    args = TrainingArguments(
        str(Path(spec["out_dir"]) / "trainer"), max_steps=spec.get("max_steps", 6), per_device_train_batch_size=2,
        learning_rate=3e-3, warmup_steps=2, logging_steps=1, save_strategy="steps" if spec.get("trainer_saves") else "no", save_steps=2, report_to="none", seed=7, disable_tqdm=True,
        deepspeed=deepspeed_config(spec["stage"]), accelerator_config={"use_configured_state": True}, bf16=False,
    )
    tokenizer = tiny.build_tokenizer()
    trainer = Trainer(
        model=build_model(spec), args=args, processing_class=tokenizer, callbacks=callbacks,
        train_dataset=tiny.toy_lm_dataset(tokenizer, n=24, seq_len=16, seed=1),
    )
    try:
        trainer.train()
    except Exception as err:
        if "expect_error" not in spec or spec["expect_error"] not in str(err):
            raise
        print(f"rank {dist.get_rank()}: refused as expected: {type(err).__name__}: {err}", flush=True)
        return
    model = trainer.model
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        final = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    if dist.get_rank() == 0:
        out = Path(spec["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({
            "global_step": trainer.state.global_step, "steps_run": counter.steps, "log_history": trainer.state.log_history,
        }))
        save_file(final, str(out / "final.safetensors"))
    dist.barrier()


def main(specs: list[dict]) -> None:
    PartialState(backend="gloo")
    torch.set_num_threads(1)
    try:
        for spec in specs:
            AcceleratorState._reset_state()  # one DeepSpeed plugin per Accelerator state: each run starts its own (as accelerate's tests do)
            run(spec)
            print(f"rank {dist.get_rank()}: {spec['out_dir']} done", flush=True)
    finally:
        gc.collect()  # engines and their groups, freed while gloo is alive (see examples/fsdp_custom_loop.py)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
