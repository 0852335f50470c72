"""The remote tier against a real S3 protocol server (moto) on 127.0.0.1: upload throughput and the stall it adds.

    python benchmarks/remote_upload.py --hidden 512 --layers 8 --repeats 3 --out benchmarks/out-remote

Both baselines are measured in the same run, on the same bytes:

* **upload** — `RemoteStore.upload` of a committed checkpoint (the files its manifest lists,
  then the marker) vs a plain `s3fs` `put` of the same folder (`fs.put(dir, url, recursive=True)`).
  Each repeat uploads to a fresh prefix; the order alternates. Goal: ours >= 0.8x the plain put's throughput.
* **stall** — what `CheckpointManager.save` costs the training loop with `remote_dir` vs
  without it (a local save only), median over the saves of a short loop that saves every
  step; the upload runs on the background worker meanwhile. Goal: no stall beyond a local save.

moto is a local, in-process object store: the numbers say what our protocol (listing,
marker, one batched put) costs over a raw put, not what a WAN link to AWS does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import S3Server  # noqa: E402  (the tests' moto server)

from hf_rl_ckpt import CheckpointConfig, CheckpointManager  # noqa: E402
from hf_rl_ckpt.remote import RemoteStore  # noqa: E402


def build(hidden: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    config = LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64))
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step(model, optimizer)
    return model, optimizer


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    batch = torch.randint(0, model.config.vocab_size, (2, 32))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--saves", type=int, default=4, help="saves per loop in the stall measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out-remote"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = S3Server()
    try:
        os.environ.update(server.env)
        bucket = server.bucket()
        model, optimizer = build(args.hidden, args.layers)
        with tempfile.TemporaryDirectory() as work:
            work = Path(work)
            local = CheckpointManager(CheckpointConfig(checkpoint_dir=str(work / "local")))
            checkpoint = local.save(1, model=model, optimizer=optimizer)
            local.finalize()
            nbytes = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
            store = RemoteStore(f"s3://{bucket}/ours")
            samples: dict[str, list[float]] = {"ours": [], "plain_put": []}
            for repeat in range(args.repeats):
                runs = [("ours", lambda: store.upload(checkpoint, f"r{repeat}")),
                        ("plain_put", lambda: store.fs.put(str(checkpoint), f"{bucket}/plain/r{repeat}", recursive=True))]
                for name, run in runs if repeat % 2 == 0 else runs[::-1]:
                    samples[name].append(timed(run))
            upload = {name: statistics.median(values) for name, values in samples.items()}

            stall: dict[str, list[float]] = {"local_only": [], "with_remote": []}
            for name, remote in (("local_only", None), ("with_remote", f"s3://{bucket}/stall")):
                manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(work / name), remote_dir=remote, keep_top_k=2, metric_name="step"))
                for index in range(1, args.saves + 1):
                    step(model, optimizer)
                    stall[name].append(timed(lambda: manager.save(index, model=model, optimizer=optimizer)))
                drained = timed(manager.finalize)
                if remote:
                    stall["finalize_wait_with_remote"] = [drained]
        stall_median = {name: statistics.median(values) for name, values in stall.items()}
    finally:
        server.stop()
    results = {
        "checkpoint_mb": nbytes / 1e6,
        "upload_seconds": samples, "upload_median": upload,
        "throughput_mb_s": {name: nbytes / 1e6 / value for name, value in upload.items()},
        "throughput_ratio_ours_over_plain": upload["plain_put"] / upload["ours"],
        "save_seconds": stall, "save_median": stall_median,
        "stall_ratio_with_remote_over_local": stall_median["with_remote"] / stall_median["local_only"],
        "command": " ".join(sys.argv),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({key: value for key, value in results.items() if key not in ("upload_seconds", "save_seconds")}, indent=2))


if __name__ == "__main__":
    main()
