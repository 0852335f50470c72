"""Save time under DeepSpeed ZeRO: `CheckpointCallback`'s checkpoint vs the Trainer's own DeepSpeed checkpoint.

    torchrun --nproc_per_node 2 benchmarks/deepspeed_save.py --stage 3 --hidden 512 --layers 8 --out benchmarks/out-deepspeed

Both in one run, on the same engine, after one real optimizer step (so the ZeRO optimizer
state exists), alternating which goes first in each repeat:

* **trainer** — `Trainer._save_checkpoint`: DeepSpeed's `engine.save_checkpoint` (every rank
  pickles its partitions into `global_stepN/`), the model files, scheduler, RNG and
  trainer state; then `os.sync()` on every rank, since neither the Trainer nor DeepSpeed
  fsyncs (without it this would time a copy into the page cache). Under ZeRO-3 the Trainer
  writes no consolidated weights unless `stage3_gather_16bit_weights_on_model_save` is set:
  serving it takes a `zero_to_fp32.py` run afterwards, not counted here.
* **ours** — `CheckpointManager.save` as the callback calls it: the ZeRO-3 parameters gathered
  module by module into a consolidated safetensors folder (deployable as is), every rank's
  optimizer partition as safetensors + JSON, sha256 of every file, fsync, atomic commit.

On CPU with gloo (DS_ACCELERATOR=cpu) the numbers say what the formats and the gather cost,
not what an NVMe-backed GPU node sees; rank 0 writes `results.json` with every sample, the
medians and the ratio ours / trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "hf_rl_ckpt-torch-extensions"))
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import PartialState  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from hf_rl_ckpt import CheckpointCallback, CheckpointConfig  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, n: int = 64, length: int = 64) -> None:
        self.data = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[index], "labels": self.data[index]}


def timed(action) -> float:
    dist.barrier()
    started = time.perf_counter()
    action()
    os.sync()
    dist.barrier()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=(2, 3), default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/out-deepspeed")
    args = parser.parse_args()
    PartialState(backend="gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    out = Path(args.out)
    work = out / "work"
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64), tie_word_embeddings=False)
    zero = {"stage": args.stage, **({"stage3_param_persistence_threshold": 0} if args.stage == 3 else {})}
    training = TrainingArguments(
        str(work / "trainer"), max_steps=1, per_device_train_batch_size=1, save_strategy="no", report_to="none", disable_tqdm=True,
        deepspeed={"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "train_batch_size": "auto", "bf16": {"enabled": False}, "fp16": {"enabled": False}},
        accelerator_config={"use_configured_state": True}, bf16=False,
    )
    model = LlamaForCausalLM(config)
    parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    callback = CheckpointCallback(CheckpointConfig(checkpoint_dir=str(work / "ours")))
    trainer = Trainer(model=model, args=training, train_dataset=RandomTokens(config.vocab_size), callbacks=[callback])
    trainer.train()  # one optimizer step: the ZeRO optimizer state exists
    manager, optimizer = callback.manager, getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    samples: dict[str, list[float]] = {"trainer": [], "ours": []}
    for repeat in range(args.repeats):
        trainer.state.global_step = 100 + repeat
        methods = {
            "trainer": lambda: trainer._save_checkpoint(trainer.model_wrapped, trial=None),
            "ours": lambda: manager.save(100 + repeat, model=trainer.model, optimizer=optimizer, scheduler=trainer.lr_scheduler),
        }
        for name in (list(methods) if repeat % 2 == 0 else list(reversed(methods))):
            samples[name].append(timed(methods[name]))
    manager.finalize()
    if dist.get_rank() == 0:
        medians = {name: statistics.median(values) for name, values in samples.items()}
        result = {
            "zero_stage": args.stage, "world_size": dist.get_world_size(), "parameters": parameters, "samples_s": samples,
            "median_s": medians, "ratio_ours_over_trainer": medians["ours"] / medians["trainer"],
            "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "deepspeed", "accelerate")},
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
