"""Save / resume benchmark: HF Trainer vs Accelerate vs hf_rl_ckpt (sync and async), in one run.

For each model size a random-init Llama-style model is built (AdamW state initialised by
one optimizer step) and, alternating the order of the methods on every repeat, measures:

* ``trainer``    `Trainer._save_checkpoint` of a real `transformers.Trainer`, then `os.sync()`;
                 resume = `_load_from_checkpoint` + `_load_optimizer_and_scheduler`.
* ``accelerate`` `Accelerator.save_state`, then `os.sync()`; resume = `load_state`.
* ``ours_sync``  `CheckpointManager.save` (every file fsynced, sha256 while writing, atomic
                 commit); resume = `CheckpointManager.load` (sha256-verified, `verify_on_resume`,
                 the default); also timed with `verify_on_resume: false` (sizes and headers
                 only, closer to what the Trainer checks, which is nothing) for reference.
* ``ours_async`` the same with `async_save=True`: the *stall* (time `save()` blocks the
                 training loop, plus the time the next optimizer step waits for the optimizer
                 state to be staged; a real training step follows every save) and the *total*
                 time until the checkpoint is committed. Its files are byte-identical to
                 ``ours_sync``'s, so its resume is not timed again.

Peak RSS during each save is the kernel's high-water mark (`VmHWM`, reset through
`/proc/self/clear_refs` before the save; a 2 ms sampling thread where that is not allowed)
minus the RSS just before the save. Resumes run with a cold page cache for the checkpoint's
files (`posix_fadvise(DONTNEED)` after `os.sync()`; `--warm-resume` keeps the cache), as
after a restart. Every timed operation starts after an `os.sync()` so that earlier dirty
data is not charged to it. The disk's own speed, measured in the same run, is the physical
limit: `--disk-gb` GB written sequentially in 64 MiB blocks and fsynced.

Prints a table of medians and ratios ours/Trainer, writes `results.json` and
`save_load.png` (stall and total save time, and resume time, vs model size) under `--out`.

    python benchmarks/save_load.py --sizes 25M,110M,350M --repeats 3 --out benchmarks/out
    python benchmarks/save_load.py --sizes 1B --device cuda --dtype bf16 --out benchmarks/out-gpu
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("trainer", "accelerate", "ours_sync", "ours_async")
#: name -> (hidden, intermediate, layers, heads); vocabulary 32000, untied embeddings (Llama's default).
PRESETS = {
    "TINY": (64, 128, 2, 2),  # ~4M, mostly embeddings: for trying the script out
    "25M": (256, 768, 10, 4),
    "110M": (768, 2048, 9, 12),
    "350M": (1024, 2816, 22, 16),
    "1B": (2048, 5632, 18, 16),
    "3B": (2560, 6912, 32, 20),
}
VOCAB = 32000
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------ helpers
def parse_size(text: str) -> tuple[str, tuple[int, int, int, int]]:
    """A preset name, or any '<N>M'/'<N>B': layers chosen to reach about N parameters."""
    key = text.strip().upper()
    if key in PRESETS:
        return key, PRESETS[key]
    scale = {"M": 1e6, "B": 1e9}[key[-1]]
    target = float(key[:-1]) * scale
    hidden, inter, heads = (512, 1408, 8) if target < 80e6 else (1024, 2816, 16) if target < 600e6 else (2048, 5632, 16) if target < 2e9 else (4096, 11008, 32)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target - 2 * VOCAB * hidden) / per_layer))
    return key, (hidden, inter, layers, heads)


def llama(spec: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads = spec
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def first_step(model: torch.nn.Module, device: str) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW + a linear schedule, state initialised by one real optimizer step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    ids = torch.randint(0, VOCAB, (1, 16), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer, scheduler


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return params + moments


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_cache(path: Path) -> None:
    """Evict `path`'s files from the page cache (they are clean after os.sync), as after a restart."""
    os.sync()
    for file in (p for p in path.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory over a block: VmHWM after resetting it, else a 2 ms sampling thread."""

    def __init__(self) -> None:
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _hwm() -> int | None:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def start(self) -> "PeakRSS":
        gc.collect()
        self.before = rss()
        self.exact = False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.exact = self._hwm() is not None
        except OSError:
            pass
        if not self.exact:
            self.peak = self.before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def read(self) -> int:
        """Peak so far minus the RSS before `start`, in bytes (measuring goes on)."""
        self.peak = (self._hwm() or rss()) if self.exact else max(self.peak, rss())
        return max(0, self.peak - self.before)

    def stop(self) -> int:
        """Peak minus the RSS before `start`, in bytes."""
        if not self.exact and self._thread is not None:
            self._stop.set()
            self._thread.join()
        return self.read()


def sync_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def timed(device: str, out: dict[str, float], key: str) -> Iterator[None]:
    sync_device(device)
    started = time.perf_counter()
    yield
    sync_device(device)
    out[key] = time.perf_counter() - started


def disk_speed(folder: Path, gigabytes: float) -> float:
    """MB/s of a sequential write of `gigabytes` GB in 64 MiB blocks, fsynced (the disk's own limit)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "disk_probe.bin"
    block = os.urandom(64 << 20)
    blocks = max(1, int(gigabytes * 1e9) // len(block))
    os.sync()
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(blocks):
            fh.write(block)
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return blocks * len(block) / seconds / 1e6


# ------------------------------------------------------------------ the methods
class Bench:
    """One model size: the objects, the four methods, and their measurements."""

    def __init__(self, name: str, spec, args, work: Path) -> None:
        from accelerate import Accelerator
        from transformers import Trainer, TrainingArguments

        from hf_rl_ckpt import CheckpointConfig, CheckpointManager

        self.name, self.args, self.device, self.work = name, args, args.device, work / name
        self.work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.model = llama(spec, DTYPES[args.dtype], args.device)
        self.optimizer, self.scheduler = first_step(self.model, args.device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.state_bytes = state_bytes(self.model, self.optimizer)
        print(f"[{name}] {self.params / 1e6:.1f}M parameters, model+AdamW state {self.state_bytes / 1e9:.2f} GB "
              f"({args.dtype}, {args.device}); built in {time.perf_counter() - started:.1f}s", flush=True)
        self.trainer = Trainer(
            model=self.model,
            args=TrainingArguments(output_dir=str(self.work / "trainer"), report_to=[], use_cpu=args.device == "cpu",
                                   save_total_limit=None, logging_strategy="no", disable_tqdm=True),
            optimizers=(self.optimizer, self.scheduler),
        )
        self.accelerator = Accelerator(cpu=args.device == "cpu")
        self.acc_model, self.acc_optimizer, self.acc_scheduler = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        self.CheckpointConfig, self.CheckpointManager = CheckpointConfig, CheckpointManager
        self.async_manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(self.work / "ours_async"), async_save=True))
        self.async_manager.save(0, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)  # allocates the staging buffer once
        self.async_manager.finalize(terminate=False)
        shutil.rmtree(self.work / "ours_async" / "step_0")
        self.samples: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
        self.ckpt_bytes: dict[str, int] = {}

    def record(self, method: str, **values: float) -> None:
        for key, value in values.items():
            self.samples[method].setdefault(key, []).append(value)

    def run(self, method: str, step: int) -> None:
        getattr(self, f"_{method}")(step)
        gc.collect()

    def _trainer(self, step: int) -> None:
        self.trainer.state.global_step = step
        folder = Path(self.trainer.args.output_dir) / f"checkpoint-{step}"
        t: dict[str, float] = {}
        os.sync()
        peak = PeakRSS().start()
        with timed(self.device, t, "save"):
            self.trainer._save_checkpoint(self.model, trial=None)
            os.sync()
        t["rss"] = peak.stop()
        self.ckpt_bytes["trainer"] = tree_bytes(folder)
        self._cold(folder)
        with timed(self.device, t, "resume"):
            self.trainer._load_from_checkpoint(str(folder))
            self.trainer._load_optimizer_and_scheduler(str(folder))
        self.record("trainer", **t)
        shutil.rmtree(folder)

    def _accelerate(self, step: int) -> None:
        folder = self.work / "accelerate" / f"checkpoint_{step}"
        t: dict[str, float] = {}
        os.sync()
        peak = PeakRSS().start()
        with timed(self.device, t, "save"):
            self.accelerator.save_state(str(folder))
            os.sync()
        t["rss"] = peak.stop()
        self.ckpt_bytes["accelerate"] = tree_bytes(folder)
        self._cold(folder)
        with timed(self.device, t, "resume"):
            self.accelerator.load_state(str(folder))
        self.record("accelerate", **t)
        shutil.rmtree(folder)

    def _ours_sync(self, step: int) -> None:
        root = self.work / f"ours_sync_{step}"
        manager = self.CheckpointManager(self.CheckpointConfig(checkpoint_dir=str(root)))
        t: dict[str, float] = {}
        os.sync()
        peak = PeakRSS().start()
        with timed(self.device, t, "save"):
            path = manager.save(step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        t["rss"] = peak.stop()
        self.ckpt_bytes["ours"] = tree_bytes(path)
        self._cold(path)
        with timed(self.device, t, "resume"):
            manager.load(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        manager.finalize()
        # The Trainer verifies nothing on resume; for reference, ours with sizes and headers checked but no sha256:
        unverified = self.CheckpointManager(self.CheckpointConfig(checkpoint_dir=str(root), verify_on_resume=False))
        self._cold(path)
        with timed(self.device, t, "resume_no_sha256"):
            unverified.load(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        unverified.finalize()
        self.record("ours_sync", **t)
        shutil.rmtree(root)

    def _train_step(self) -> float:
        """One training step (tiny batch); returns its seconds."""
        sync_device(self.device)
        started = time.perf_counter()
        ids = torch.randint(0, VOCAB, (1, 16), device=self.device)
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync_device(self.device)
        return time.perf_counter() - started

    def _ours_async(self, step: int) -> None:
        """Stall = time in save() + time the next optimizer step waited for the optimizer state to be staged.

        As in a training loop, a training step follows the save (the optimizer state is copied
        by the writer thread while that step's forward/backward run; its step() waits for the
        copy if needed). `step_slowdown` is that step's time minus a step's time without a save
        in flight (CPU and memory bandwidth shared with the writer thread).
        """
        manager = self.async_manager
        t: dict[str, float] = {}
        baseline = self._train_step()
        os.sync()
        peak = PeakRSS().start()
        with timed(self.device, t, "stall_in_save"):
            path = manager.save(step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        stall_rss = peak.read()
        started = time.perf_counter() - t["stall_in_save"]
        t["step_slowdown"] = self._train_step() - baseline
        t["step_wait"] = manager._writer.background.step_waited
        t["stall"] = t["stall_in_save"] + t["step_wait"]
        manager.finalize(terminate=False)  # waits until the background write is committed
        t["save"] = time.perf_counter() - started
        t["rss"] = max(stall_rss, peak.stop())
        t["rss_stall"] = stall_rss
        assert path.is_dir()
        self.record("ours_async", **t)
        shutil.rmtree(path)

    def _cold(self, folder: Path) -> None:
        if not self.args.warm_resume:
            drop_cache(folder)
        else:
            os.sync()

    def close(self) -> None:
        self.async_manager.finalize()
        self.accelerator.free_memory()
        shutil.rmtree(self.work, ignore_errors=True)


# ------------------------------------------------------------------ report
def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def summarize(bench: Bench, disk_mbps: float) -> dict[str, Any]:
    med = {method: {key: median(vals) for key, vals in bench.samples[method].items()} for method in METHODS}
    trainer_save, trainer_resume = med["trainer"]["save"], med["trainer"]["resume"]
    ours_bytes = bench.ckpt_bytes.get("ours", 0)
    ratios = {
        "async_stall_vs_trainer_save": med["ours_async"]["stall"] / trainer_save,
        "async_total_vs_trainer_save": med["ours_async"]["save"] / trainer_save,
        "sync_save_vs_trainer_save": med["ours_sync"]["save"] / trainer_save,
        "resume_vs_trainer_resume": med["ours_sync"]["resume"] / trainer_resume,
        "resume_no_sha256_vs_trainer_resume": med["ours_sync"]["resume_no_sha256"] / trainer_resume,
        "sync_throughput_vs_disk": ours_bytes / med["ours_sync"]["save"] / 1e6 / disk_mbps,
        "sync_peak_rss_vs_state": med["ours_sync"]["rss"] / bench.state_bytes,
    }
    return {
        "params": bench.params, "state_bytes": bench.state_bytes, "checkpoint_bytes": bench.ckpt_bytes,
        "samples": bench.samples, "median": med, "ratios": ratios,
    }


TARGETS = {  # ratio name -> (comparison, bound, sizes it applies to (None: all))
    "async_stall_vs_trainer_save": ("<=", 0.10, ("110M", "350M")),
    "sync_save_vs_trainer_save": ("<=", 1.0, None),
    "resume_vs_trainer_resume": ("<=", 1.0, None),
    "sync_throughput_vs_disk": (">=", 0.7, None),
    "sync_peak_rss_vs_state": ("<=", 1.15, None),
}


def table(results: dict[str, Any], disk_mbps: float) -> str:
    lines = [f"disk: fsynced sequential write {disk_mbps:.0f} MB/s (physical limit)", ""]
    head = f"{'size':>5} {'method':<11} {'save s':>8} {'xTrainer':>8} {'stall s':>8} {'xTrainer':>8} {'resume s':>9} {'xTrainer':>8} {'peak RSS MB':>11} {'xstate':>6} {'MB/s':>7} {'xdisk':>6}"
    lines += [head, "-" * len(head)]
    for size, res in results.items():
        med, ckpt = res["median"], res["checkpoint_bytes"]
        tr = med["trainer"]
        for method in METHODS:
            m = med[method]
            nbytes = ckpt.get("ours" if method.startswith("ours") else method, 0)
            save, stall, resume = m.get("save"), m.get("stall"), m.get("resume")
            fmt = lambda v, spec: format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))  # noqa: E731
            lines.append(
                f"{size:>5} {method:<11} {fmt(save, '8.2f')} {fmt(save / tr['save'] if save else None, '8.2f')} "
                f"{fmt(stall, '8.3f')} {fmt(stall / tr['save'] if stall else None, '8.3f')} {fmt(resume, '9.2f')} "
                f"{fmt(resume / tr['resume'] if resume else None, '8.2f')} {fmt(m['rss'] / 1e6, '11.0f')} "
                f"{fmt(m['rss'] / res['state_bytes'], '6.2f')} {fmt(nbytes / save / 1e6 if save else None, '7.0f')} "
                f"{fmt(nbytes / save / 1e6 / disk_mbps if save else None, '6.2f')}"
            )
            if method == "ours_async" and m.get("stall_in_save") is not None:
                lines.append(f"{'':>5} {'':<11} stall = {m['stall_in_save']:.3f}s in save() + {m['step_wait']:.3f}s next step() waiting; "
                             f"next training step {m['step_slowdown']:+.3f}s vs. one without a save in flight")
            if method == "ours_sync" and m.get("resume_no_sha256") is not None:
                nosha = m["resume_no_sha256"]
                lines.append(f"{size:>5} {'(no sha256)':<11} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {nosha:9.2f} {nosha / tr['resume']:8.2f}")
        lines.append(f"{'':>5} params {res['params'] / 1e6:.1f}M, state {res['state_bytes'] / 1e9:.2f} GB, checkpoint bytes: "
                     + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in ckpt.items()))
    lines += ["", "targets (ratios of medians):"]
    for name, (op, bound, sizes) in TARGETS.items():
        for size, res in results.items():
            if sizes is not None and size not in sizes:
                continue
            value = res["ratios"][name]
            ok = value <= bound if op == "<=" else value >= bound
            lines.append(f"  {'PASS' if ok else 'MISS'} {size:>5} {name} = {value:.3f} (target {op} {bound})")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    sizes = list(results)
    x = [results[s]["params"] / 1e6 for s in sizes]
    fig, (ax_save, ax_resume) = plt.subplots(1, 2, figsize=(12, 4.8))
    series = [
        ("Trainer _save_checkpoint + os.sync", "trainer", "save", "tab:red", "-"),
        ("Accelerate save_state + os.sync", "accelerate", "save", "tab:orange", "-"),
        ("hf_rl_ckpt sync (fsync + sha256)", "ours_sync", "save", "tab:blue", "-"),
        ("hf_rl_ckpt async: total until committed", "ours_async", "save", "tab:green", "--"),
        ("hf_rl_ckpt async: training stall", "ours_async", "stall", "tab:green", "-"),
    ]
    for label, method, key, color, style in series:
        ax_save.plot(x, [results[s]["median"][method][key] for s in sizes], style, marker="o", color=color, label=label)
    for label, method, key, color, style in (
        ("Trainer", "trainer", "resume", "tab:red", "-"),
        ("Accelerate", "accelerate", "resume", "tab:orange", "-"),
        ("hf_rl_ckpt (sha256-verified, default)", "ours_sync", "resume", "tab:blue", "-"),
        ("hf_rl_ckpt, verify_on_resume: false", "ours_sync", "resume_no_sha256", "tab:blue", "--"),
    ):
        ax_resume.plot(x, [results[s]["median"][method][key] for s in sizes], style, marker="o", color=color, label=label)
    for ax, what in ((ax_save, "save"), (ax_resume, "resume (cold page cache)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("seconds (median)")
        ax.set_title(what)
        ax.set_xticks(x, [f"{v:.0f}M" for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="25M,110M,350M", help="comma-separated: presets %s, or e.g. 200M" % ",".join(PRESETS))
    parser.add_argument("--repeats", type=int, default=3, help="repeats per method and size (>= 3 for medians); methods alternate order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--out", default="benchmarks/out", help="results.json, save_load.png and the run log go here")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: <out>/work); same disk as the probe")
    parser.add_argument("--disk-gb", type=float, default=1.0, help="GB written by the disk-speed probe (fsynced)")
    parser.add_argument("--warm-resume", action="store_true", help="resume from the page cache instead of a cold cache")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    began = time.perf_counter()

    disk = [disk_speed(work, args.disk_gb)]
    print(f"disk probe: {disk[0]:.0f} MB/s fsynced sequential write ({args.disk_gb:g} GB)", flush=True)
    results: dict[str, Any] = {}
    for text in args.sizes.split(","):
        name, spec = parse_size(text)
        bench = Bench(name, spec, args, work)
        size_began = time.perf_counter()
        for repeat in range(args.repeats):
            order = METHODS[repeat % len(METHODS):] + METHODS[: repeat % len(METHODS)]
            for method in order:
                bench.run(method, step=repeat + 1)
            print(f"[{name}] repeat {repeat + 1}/{args.repeats} done ({', '.join(order)}) at {time.perf_counter() - size_began:.0f}s", flush=True)
        disk.append(disk_speed(work, args.disk_gb))
        results[name] = summarize(bench, statistics.median(disk))
        bench.close()
        del bench
        gc.collect()
    disk_mbps = statistics.median(disk)
    for name in results:  # the same disk figure for every size
        results[name]["ratios"]["sync_throughput_vs_disk"] = (
            results[name]["checkpoint_bytes"]["ours"] / results[name]["median"]["ours_sync"]["save"] / 1e6 / disk_mbps
        )
    report = table(results, disk_mbps)
    print("\n" + report)
    meta = {
        "command": command, "argv": sys.argv[1:], "device": args.device, "dtype": args.dtype, "repeats": args.repeats,
        "disk_MBps_samples": disk, "disk_MBps": disk_mbps, "cold_resume": not args.warm_resume,
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "accelerate", "safetensors")},
        "wall_seconds": time.perf_counter() - began,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "table.txt").write_text(f"$ {command}\n\n{report}\n")
    chart(results, out / "save_load.png", f"{args.device} {args.dtype}, disk {disk_mbps:.0f} MB/s, median of {args.repeats}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'save_load.png'} in {meta['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
