"""A cost model for saving FSDP2 models as per-rank shards and consolidating them into an HF folder, calibrated on this box.

Three phases, each a small pure function of bytes and rates (the same functions serve the
calibration and the cluster table):

* **sharded save**: `torch.distributed.checkpoint.save` with
  `HuggingFaceStorageWriter(save_distributed=True)`: every rank writes its slice of every
  tensor into its own safetensors file (fsynced).
* **rank-0 consolidation** (today): rank 0 alone reads every rank's shards and writes every
  consolidated file (`consolidate_safetensors_files` of torch's `_consolidate_hf_safetensors`).
* **parallel consolidation** (`hf_rl_ckpt.state.consolidate`): the consolidated files (split at
  `max_shard_size`) are handed to ranks by bytes, each rank assembles and writes its own files.

Usage::

    # probes, then torchrun at 1, 2, 4 and 8 ranks; fit on 1 rank, predict the others (about 7 min on 2 cores)
    python benchmarks/scale_model.py calibrate --ranks 1,2,4,8 --out benchmarks/out/scale
    # the model's predictions for a cluster (8B and 70B, bf16, N = 8, 64, 512), assumptions as options
    python benchmarks/scale_model.py table     # or --calibration benchmarks/out/scale/calibration.json for a new run
    # fit and predict again from an earlier run's measurements (no measuring)
    python benchmarks/scale_model.py calibrate --refit benchmarks/out/scale/measurements.json --out /tmp/refit

calibrate
    Probes, once, first: sequential write (buffered, fsynced) and cold read (the file's pages
    dropped with `posix_fadvise(DONTNEED)` first) by 1 and by 4 concurrent processes; copying into
    fresh memory by 1 and by 4 processes; the fixed cost of one small tensor read through
    safetensors. Then for each N one `torchrun --nproc_per_node N` (gloo; killed after
    `--run-timeout`) of this file's `worker`: a random-init Llama (hidden 1024, head_dim 64,
    fp32, untied embeddings) built on the meta device, `fully_shard`ed, `to_empty`, then each
    phase `--repeats` times, between barriers. The shard files are evicted from the page cache
    (`os.sync` + `posix_fadvise(DONTNEED)` on every one) before each consolidation, so they are
    read from the disk as on a cluster, where other nodes wrote them. DCP's consolidation does
    not fsync its files; they are fsynced inside its timing (the parallel writer fsyncs its own).
    Each rank records per phase: wall time, CPU time, bytes read and written (its logical bytes
    and /proc/self/io), peak RSS (VmHWM reset through /proc/self/clear_refs) and a sampled peak
    RssAnon. Every folder is deleted after its repeat. A phase's time is the slowest rank's; of
    the repeats the fastest is kept, and of the probes the best rate: other tenants of this VM's
    host only ever slow the disk and memory down, by up to 2x over tens of seconds. Writes
    `OUT/measurements.json` (every sample), `OUT/calibration.json` (what `table` reads) and
    `OUT/calibration_table.md`.

The model
    Per rank r of a phase: R_r bytes read, W_r written, C_r copied by the CPU, S_r slices read.

    ========================  ==========  ==========  ==========  ============================
    phase                     R_r         W_r         C_r         S_r
    ========================  ==========  ==========  ==========  ============================
    sharded save              0           M/N         M/N         0
    rank-0 consolidation      M (rank 0)  M (rank 0)  M (rank 0)  T*N (rank 0); others idle
    parallel consolidation    L_r         L_r         L_r         T_r*N
    ========================  ==========  ==========  ==========  ============================

    M the model's bytes, T its tensors, L_r and T_r the bytes and tensors of rank r's
    consolidated files (the library's `plan_consolidation`: at most one rank per file, so
    min(N, files) ranks work and the largest file bounds the time). Then::

        rank path_r = R_r/read_stream + W_r/write_stream + p*C_r/copy_stream + S_r*s
        io          = max(sum_node(R)/read_node + sum_node(W)/write_node,   (reads and writes share a node's disk)
                          sum(R)/read_global + sum(W)/write_global)         (a shared filesystem's cap)
        copy        = p*sum_node(C)/copy_node
        slices      = s*sum_node(S)/cores_per_node
        time        = max(max_r rank path_r, io + copy + slices)

    One rank reads, copies and writes in turn, so its own terms add up. Concurrent ranks share
    each resource, and as they start together after a barrier and take the same steps, they
    use one resource at a time together: the shared times add up as well (with one rank the
    two sums agree). *_stream: what one process gets, *_node: what a node's processes get
    together (max over nodes); s: the fixed cost per slice read. p, the method's copy
    passes, is the one fitted number per method: what the 1-rank run's time leaves after the
    probed disk and slice terms, in copies of its bytes at the probed copy rate (serialising
    into a bytes object, assembling slices, hashing, kernel copies through the page cache;
    never below 0). Parallel consolidation adds one pass when N > 1 (slices are copied into a
    whole tensor; with one rank the slice is the tensor). Upload: max over nodes of the bytes
    its ranks upload / the node's uplink. Memory (per rank, on top of the model): save 2x its
    share (safetensors builds the file in one buffer, then copies it into a Python bytes);
    rank-0 consolidation the largest tensor and one slice of it; parallel consolidation the
    largest whole tensor it assembles and 32 MiB of write buffers, plus the shard pages it reads
    through mmap (they count in RSS; reclaimable page cache); plus a base fitted on 1 rank.

Assumptions and limits
    Only the probes and the 1-rank run are used to fit; the 2-, 4- and 8-rank runs only check
    the predictions. This box (a 2-vCPU VM) has memory that the host reclaims when freed and a
    shared disk, both noisy; on it the probed disk time alone accounts for the 1-rank
    consolidations: their CPU work hides under the disk's, so their fitted passes are about 0.
    `table --passes cpu` counts all of a method's measured CPU time instead, for storage fast
    enough that nothing hides. Not modelled: DCP's planning collectives (they grow with N x T),
    process start-up, page-cache write-back outside a phase, network filesystems' metadata
    costs beyond `--read-latency-ms` per slice read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB_BOX = 32000  # the calibration model's vocabulary (Llama 2's)
GB = 1e9
MiB = 1 << 20
PHASES = ("save", "rank0", "parallel")
PHASE_TITLES = {"save": "sharded save", "rank0": "rank-0 consolidation", "parallel": "parallel consolidation"}


# ====================================================================== the cost model
@dataclass(frozen=True)
class Machine:
    """What the model knows of the hardware. Rates are bytes/s.

    A *stream* is what one rank gets alone, a *node* what all ranks of one node share, *global*
    what all nodes share (a shared filesystem's aggregate cap). Ranks r are on node
    r // ranks_per_node.
    """

    write_stream: float
    write_node: float
    read_stream: float
    read_node: float
    copy_stream: float  # host memcpy into freshly allocated memory (page faults included), one process
    copy_node: float  # the same, all processes of a node at once
    cores_per_node: int
    ranks_per_node: int
    per_read_s: float  # fixed cost of reading one tensor slice: syscalls and lookups, plus the filesystem's round trip
    write_global: float = math.inf
    read_global: float = math.inf
    upload_node: float = math.inf


@dataclass(frozen=True)
class MethodCosts:
    """What calibration finds of each method (phase): its CPU work in memcpy passes, and a memory base.

    `copy_passes[phase]`: the phase copies `passes * bytes` at the copy rates: serialising,
    copying slices into whole tensors, kernel copies to and from the page cache, hashing, all
    memory-bound, so counted as copies of its bytes into fresh memory; whatever of that work
    overlaps the disk's does not count. `memory_base[phase]`: peak memory beyond the
    structural terms of `memory_terms` (headers, buffers, allocator slack), bytes.
    `cpu_passes[phase]`: all the CPU time the phase took (user + system), in the same units:
    the copy passes it would cost if none of its CPU work overlapped the disk's (an upper bound).
    """

    copy_passes: Mapping[str, float]
    memory_base: Mapping[str, float]
    cpu_passes: Mapping[str, float]


@dataclass(frozen=True)
class RankWork:
    """What one rank does in a phase: bytes it reads from and writes to the disk or filesystem, slices it reads, bytes
    its CPU copies (once per pass), and the largest whole tensor it assembles (what bounds a consolidation's memory)."""

    read: float = 0.0
    written: float = 0.0
    slices: int = 0
    copied: float = 0.0
    largest: float = 0.0


def node_totals(amounts: Sequence[float], ranks_per_node: int) -> list[float]:
    """Sum of `amounts` over the ranks of each node (rank r is on node r // ranks_per_node)."""
    totals = [0.0] * math.ceil(len(amounts) / ranks_per_node)
    for rank, amount in enumerate(amounts):
        totals[rank // ranks_per_node] += amount
    return totals


def phase_time(works: Sequence[RankWork], machine: Machine, copy_passes: float) -> dict[str, float]:
    """Seconds of one phase (all ranks together, until the last one finishes), and its terms.

    One rank reads, copies and writes in turn (blocking I/O), so its own time is the sum of
    its terms at the rates one process gets: the *rank path*. Concurrent ranks share each
    resource: a node's disk (reads and writes take turns on it) under the filesystem's
    aggregate limit (`io`), its memory bandwidth (`copy`), its cores (`slices`: the fixed cost
    per slice read). They start together after a barrier and do the same steps, so they use a
    resource at the same time, one resource after another: the shared times add up too. The
    phase takes the longer of the slowest rank path and that sum (with one rank they agree).
    """
    m = machine
    paths = [
        w.read / m.read_stream + w.written / m.write_stream + copy_passes * w.copied / m.copy_stream + w.slices * m.per_read_s
        for w in works
    ]
    reads = node_totals([w.read for w in works], m.ranks_per_node)
    writes = node_totals([w.written for w in works], m.ranks_per_node)
    disk = max(r / m.read_node + w / m.write_node for r, w in zip(reads, writes))
    filesystem = sum(reads) / m.read_global + sum(writes) / m.write_global
    shared = {
        "io": max(disk, filesystem),
        "copy": max(node_totals([copy_passes * w.copied for w in works], m.ranks_per_node)) / m.copy_node,
        "slices": max(node_totals([w.slices * m.per_read_s for w in works], m.ranks_per_node)) / m.cores_per_node,
    }
    rank_path = max(paths)
    if rank_path >= sum(shared.values()):
        bound = "rank path"
    else:
        bound = ("filesystem" if filesystem > disk else "node disk") if shared["io"] >= max(shared.values()) else max(shared, key=shared.get)
    return shared | {"rank_path": rank_path, "total": max(rank_path, sum(shared.values())), "bound": bound}


def save_work(model_bytes: float, world_size: int) -> list[RankWork]:
    """Sharded save: every rank serialises and writes its 1/N of every tensor (FSDP2 shards each one on dim 0)."""
    share = model_bytes / world_size
    return [RankWork(written=share, copied=share) for _ in range(world_size)]


def rank0_work(model_bytes: float, tensors: int, largest: float, world_size: int) -> list[RankWork]:
    """Rank-0 consolidation: rank 0 reads every slice of every tensor (N per tensor) and writes the whole model."""
    lead = RankWork(read=model_bytes, written=model_bytes, slices=tensors * world_size, copied=model_bytes, largest=largest)
    return [lead] + [RankWork() for _ in range(world_size - 1)]


@dataclass(frozen=True)
class FileShare:
    """One consolidated file as the model needs it: bytes, tensor count, largest tensor, and the rank that writes it."""

    nbytes: float
    tensors: int
    largest: float
    rank: int


def parallel_work(files: Sequence[FileShare], world_size: int) -> list[RankWork]:
    """Parallel consolidation: each rank reads the N slices of its files' tensors and writes its files."""
    works = [RankWork() for _ in range(world_size)]
    for file in files:
        mine = works[file.rank]
        works[file.rank] = RankWork(
            read=mine.read + file.nbytes, written=mine.written + file.nbytes, slices=mine.slices + file.tensors * world_size,
            copied=mine.copied + file.nbytes, largest=max(mine.largest, file.largest),
        )
    return works


def parallel_copy_passes(base_passes: float, world_size: int) -> float:
    """The calibrated passes of a 1-rank run, plus the copy of every slice into its whole tensor that N > 1 adds.

    With one rank each tensor is one slice, handed straight from the shard file to the writer;
    with several, the slices are copied into a freshly allocated whole tensor first.
    """
    return base_passes + (1.0 if world_size > 1 else 0.0)


def passes_at(costs: MethodCosts, phase: str, world_size: int) -> float:
    """The copy passes of `phase` at `world_size` ranks."""
    base = costs.copy_passes[phase]
    return parallel_copy_passes(base, world_size) if phase == "parallel" else base


def upload_time(per_rank: Sequence[float], machine: Machine) -> float:
    """Seconds to upload `per_rank[r]` bytes from every rank at once: each node's uplink is shared by its ranks."""
    return max(node_totals(per_rank, machine.ranks_per_node)) / machine.upload_node


STREAM_BUFFERS = 2 * 16 * MiB  # the parallel writer's two chunk buffers (hf_rl_ckpt.atomic.StreamingFileWriter)


def memory_terms(phase: str, work: RankWork, world_size: int) -> tuple[float, float]:
    """Peak memory of one rank in `phase` from the methods' structure: (allocated bytes, shard-file bytes mapped), before the base.

    save: safetensors serialises the rank's share into one buffer, then copies it into a
    Python bytes object: 2x the share. rank0 (DCP): the whole tensor being filled and the
    slice just read (1/N of it). parallel: the whole tensor being assembled (none with one
    rank: the slice is the tensor) and the writer's chunk buffers; the shard files are
    mmapped (safetensors), so the pages it reads stay in its RSS until the files are closed:
    reclaimable page cache, not allocations.
    """
    if phase == "save":
        return 2.0 * work.written, 0.0
    if not work.read:
        return 0.0, 0.0
    if phase == "rank0":
        return work.largest * (1.0 + 1.0 / world_size), 0.0
    return (work.largest if world_size > 1 else 0.0) + STREAM_BUFFERS, work.read


def peak_memory(phase: str, works: Sequence[RankWork], costs: MethodCosts, world_size: int) -> tuple[float, float]:
    """(allocated, allocated + mapped) peak bytes of the busiest rank; the second is what VmHWM shows."""
    terms = [memory_terms(phase, work, world_size) for work in works]
    base = costs.memory_base[phase]
    return max(a for a, _ in terms) + base, max(a + m for a, m in terms) + base


# ====================================================================== the synthetic model
@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, max_position_embeddings=2048, tie_word_embeddings=False,
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of the state dict, from a model built on the meta device (no memory)."""
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(self.config())
        return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


#: Llama 3 shapes for the cluster table.
CLUSTER_MODELS = {
    "8B": LlamaShape(4096, 14336, 32, 32, 8, 128256),
    "70B": LlamaShape(8192, 28672, 80, 64, 8, 128256),
}


def parse_count(text: str) -> int:
    """'400M' -> 400_000_000; '1.5B' -> 1_500_000_000."""
    scale = {"M": 1e6, "B": 1e9}[text.strip().upper()[-1]]
    return int(float(text.strip()[:-1]) * scale)


def box_shape(params: int) -> LlamaShape:
    """A Llama of about `params` parameters for this box: hidden 1024, head_dim 64, layers chosen to reach the count."""
    hidden, intermediate = 1024, 2816
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    layers = max(1, round((params - 2 * VOCAB_BOX * hidden) / per_layer))
    return LlamaShape(hidden, intermediate, layers, 16, 16, VOCAB_BOX)


def shapes_bytes(shapes: Mapping[str, tuple[int, ...]], itemsize: int) -> tuple[int, int]:
    """Total bytes and the largest tensor's bytes."""
    sizes = [math.prod(shape) * itemsize for shape in shapes.values()]
    return sum(sizes), max(sizes)


# ====================================================================== measuring helpers
def drop_cache(paths: Sequence[Path]) -> None:
    """Evict the files' pages from the page cache (clean after os.sync), so the next read comes from the disk."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_files(paths: Sequence[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def proc_io() -> dict[str, int]:
    """This process's I/O counters: read_bytes/write_bytes reach the block device, rchar/wchar pass through read/write calls."""
    with open("/proc/self/io") as fh:
        return {key: int(value) for key, value in (line.split(": ") for line in fh)}


def status_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


class PeakMemory:
    """Peak extra memory over a block: VmHWM (reset through clear_refs) and a sampled RssAnon.

    VmHWM counts file pages mapped into the process (safetensors mmaps the files it reads) as
    well as allocated memory; RssAnon, sampled every 10 ms, is allocated memory only.
    """

    def __init__(self) -> None:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        self.rss_before = status_kib("VmRSS")
        self.anon_before = status_kib("RssAnon")
        self.anon_peak = self.anon_before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.anon_peak = max(self.anon_peak, status_kib("RssAnon"))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self.anon_peak = max(self.anon_peak, status_kib("RssAnon"))
        return {"peak_rss": status_kib("VmHWM") - self.rss_before, "peak_anon": self.anon_peak - self.anon_before}


# ====================================================================== probes
def _write_probe_file(path: Path, nbytes: int) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "wb", buffering=0) as fh:
        for _ in range(max(1, nbytes // len(block))):
            fh.write(block)
        os.fsync(fh.fileno())


def _read_probe_file(path: Path) -> None:
    buffer = bytearray(16 * MiB)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buffer):
            pass


def _concurrently(targets: Sequence[Callable[[], None]]) -> float:
    """Seconds for one process per target running them all at once (processes, not threads: as ranks are)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=target) for target in targets]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise RuntimeError(f"probe process failed with exit code {worker.exitcode}")
    return time.perf_counter() - started


def disk_rates(folder: Path, nbytes: int, streams: int, repeats: int) -> dict[str, float]:
    """Sequential write (buffered, fsynced) and cold read (posix_fadvise DONTNEED first) rates, bytes/s.

    `*_stream`: one process moving `nbytes`; `*_node`: `streams` processes moving `nbytes`
    between them at once. The best of `repeats` (other tenants of the host only ever slow the
    disk down); the files are deleted after each repeat.
    """
    folder.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[float]] = {"write_stream": [], "read_stream": [], "write_node": [], "read_node": []}
    for _ in range(repeats):
        for kind, count in (("stream", 1), ("node", streams)):
            paths = [folder / f"probe-{i}.bin" for i in range(count)]
            per_process = nbytes // count
            os.sync()
            seconds = _concurrently([lambda path=path: _write_probe_file(path, per_process) for path in paths])
            samples[f"write_{kind}"].append(count * per_process / seconds)
            drop_cache(paths)
            seconds = _concurrently([lambda path=path: _read_probe_file(path) for path in paths])
            samples[f"read_{kind}"].append(count * per_process / seconds)
            for path in paths:
                path.unlink()
    return {key: max(values) for key, values in samples.items()} | {"disk_samples": samples}


def _copy_into_fresh_memory(nbytes: int, source: torch.Tensor) -> None:
    kept = [torch.empty_like(source).copy_(source) for _ in range(max(1, nbytes // source.numel()))]  # kept: no page is reused
    del kept


def copy_rates(nbytes: int, streams: int, repeats: int) -> dict[str, float]:
    """Bytes/s of copying into freshly allocated memory (what serialising, reading and assembling do), 1 and `streams` processes.

    The memory is allocated anew and touched for the first time by the copy, as a
    checkpoint's buffers and page-cache pages are; the pause before each repeat lets memory
    freed earlier go back to the hypervisor first, as it does between the phases of a run
    (on this VM, virtio-balloon free page reporting: touching such memory again costs the
    host's page faults too, which do not scale with the processes).
    """
    torch.set_num_threads(1)
    source = torch.randint(0, 255, (64 * MiB,), dtype=torch.uint8)
    samples: dict[str, list[float]] = {"copy_stream": [], "copy_node": []}
    for _ in range(repeats):
        for kind, count in (("stream", 1), ("node", streams)):
            time.sleep(3)
            seconds = _concurrently([lambda: _copy_into_fresh_memory(nbytes // count, source)] * count)
            samples[f"copy_{kind}"].append(nbytes / seconds)
    return {key: max(values) for key, values in samples.items()} | {"copy_samples": samples}


def per_read_cost(folder: Path, slices: int = 4096, slice_bytes: int = 4096) -> float:
    """Seconds per 4 KiB tensor read through safetensors from a cold file: the fixed cost of a slice, as its bytes take next to no time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "slices.safetensors"
    save_file({f"t{i}": torch.zeros(slice_bytes // 4) for i in range(slices)}, os.fspath(path))
    drop_cache([path])
    started = time.perf_counter()
    with safe_open(os.fspath(path), framework="pt") as handle:
        for name in handle.keys():
            handle.get_tensor(name)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds / slices


def run_probes(folder: Path, args: argparse.Namespace) -> dict:
    print(f"probes: disk {args.probe_gb:g} GB x {args.probe_repeats} (1 and {args.probe_streams} processes), memcpy, small reads ...", flush=True)
    started = time.perf_counter()
    disk = disk_rates(folder, int(args.probe_gb * GB), args.probe_streams, args.probe_repeats)
    probes = {
        **disk,
        **copy_rates(int(args.probe_gb * GB), args.probe_streams, args.probe_repeats),
        "per_read_s": per_read_cost(folder),
        "cores": os.cpu_count() or 1,
        "streams": args.probe_streams,
    }
    probes["seconds"] = time.perf_counter() - started
    print(
        f"  write {probes['write_stream'] / 1e6:.0f} MB/s (1 process) {probes['write_node'] / 1e6:.0f} MB/s ({args.probe_streams}); "
        f"cold read {probes['read_stream'] / 1e6:.0f} / {probes['read_node'] / 1e6:.0f} MB/s; "
        f"fresh memcpy {probes['copy_stream'] / 1e9:.2f} / {probes['copy_node'] / 1e9:.2f} GB/s; "
        f"per slice read {probes['per_read_s'] * 1e6:.0f} us; {probes['seconds']:.0f} s",
        flush=True,
    )
    return probes


# ====================================================================== the worker (one rank under torchrun)
def build_sharded_model(shape: LlamaShape) -> torch.nn.Module:
    """The Llama on the meta device, `fully_shard`ed per decoder layer and at the root, then given this rank's memory only."""
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(shape.config())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(int(os.environ["RANK"]))
    with torch.no_grad():
        for param in model.parameters():
            param.to_local().uniform_(-0.05, 0.05, generator=generator)  # random bytes: nothing compresses or dedups
    return model


def consolidation_files(plan) -> tuple[dict[str, int], list[str]]:
    """The plan's file split as DCP's consolidation wants it (tensor -> 1-based file index), and the file names in order."""
    names = sorted(file.name for file in plan.files)
    index = {name: i for i, name in enumerate(names, start=1)}
    return {tensor: index[file.name] for file in plan.files for tensor in file.tensors}, names


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files  # today's method
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from hf_rl_ckpt.state.consolidate import plan_consolidation, write_index, write_rank_files

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    work = Path(args.workdir)
    sharded, rank0_out, parallel_out = work / "sharded", work / "consolidated_rank0", work / "consolidated_parallel"
    shape = box_shape(parse_count(args.size))
    model = build_sharded_model(shape)
    state = get_model_state_dict(model)
    plan = plan_consolidation(state, max_shard_size=args.max_shard_size, world_size=world_size)
    fqn_to_index, file_names = consolidation_files(plan)
    record: dict = {"rank": rank, "world_size": world_size, "phases": {phase: [] for phase in PHASES}}

    def timed(phase: str, body: Callable[[], dict[str, int]]) -> None:
        """Run `body` between two barriers; record this rank's own seconds, the phase's (barrier to barrier), CPU, I/O and memory."""
        dist.barrier()
        io_before, memory, cpu_before = proc_io(), PeakMemory(), resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        logical = body()
        own = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        dist.barrier()
        wall = time.perf_counter() - started
        io_after = proc_io()
        record["phases"][phase].append({
            "own_s": own, "wall_s": wall, **logical, **memory.stop(),
            "user_s": cpu_after.ru_utime - cpu_before.ru_utime, "sys_s": cpu_after.ru_stime - cpu_before.ru_stime,
            **{key: io_after[key] - io_before[key] for key in ("read_bytes", "write_bytes", "rchar", "wchar")},
        })

    def sharded_save() -> dict[str, int]:
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(os.fspath(sharded), save_distributed=True))
        mine = sum(p.stat().st_size for p in sharded.glob(f"shard-{rank + 1:05d}-*.safetensors"))
        return {"logical_written": mine, "logical_read": 0}

    def uncache_shards() -> None:
        if rank == 0:
            drop_cache(sorted(sharded.glob("*.safetensors")))
        dist.barrier()

    def rank0_consolidation() -> dict[str, int]:
        if rank != 0:
            return {"logical_written": 0, "logical_read": 0}
        rank0_out.mkdir(parents=True, exist_ok=True)
        consolidate_safetensors_files(os.fspath(sharded), os.fspath(rank0_out), fqn_to_index_mapping=fqn_to_index)
        written = [rank0_out / name for name in file_names]
        fsync_files(written)  # DCP's consolidation does not fsync; a checkpoint is only saved once it is on the disk
        total = sum(p.stat().st_size for p in written)
        return {"logical_written": total, "logical_read": total}

    def parallel_consolidation() -> dict[str, int]:
        digests = write_rank_files(plan, sharded, parallel_out, rank)  # fsyncs its files itself
        if rank == 0:
            write_index(plan, parallel_out)
        mine = sum(file.nbytes for file in plan.files_of(rank))
        return {"logical_written": sum(d.size for d in digests.values()), "logical_read": mine}

    def remove_outputs() -> None:
        if rank == 0:
            for folder in (sharded, rank0_out, parallel_out):
                shutil.rmtree(folder)
            os.sync()
        dist.barrier()

    for _ in range(args.repeats):
        timed("save", sharded_save)
        uncache_shards()
        timed("rank0", rank0_consolidation)
        uncache_shards()
        timed("parallel", parallel_consolidation)
        remove_outputs()

    sizes = [math.prod(t.shape) * t.element_size() for t in state.values()]
    record["model"] = {"params": sum(math.prod(t.shape) for t in state.values()), "bytes": sum(sizes), "largest_tensor": max(sizes),
                       "tensors": len(state), "shape": asdict(shape)}
    record["plan"] = [
        {"name": f.name, "nbytes": f.nbytes, "tensors": len(f.tensors), "largest": max(plan.specs[t].nbytes for t in f.tensors), "rank": f.rank}
        for f in plan.files
    ]
    (work / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


# ====================================================================== calibrate: probes, runs, fit, predictions
def launch(world_size: int, args: argparse.Namespace, workdir: Path, max_shard_size: int) -> list[dict]:
    """One torchrun of the worker at `world_size`; the ranks' records. Killed (its whole process group) after `--run-timeout` s."""
    workdir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}", __file__, "worker",
        "--size", args.size, "--workdir", os.fspath(workdir), "--max-shard-size", str(max_shard_size), "--repeats", str(args.repeats),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        code = process.wait(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise RuntimeError(f"torchrun with {world_size} ranks ran past --run-timeout {args.run_timeout} s and was killed")
    if code != 0:
        raise RuntimeError(f"torchrun with {world_size} ranks failed (exit code {code})")
    return [json.loads((workdir / f"rank{rank}.json").read_text()) for rank in range(world_size)]



def box_machine(probes: Mapping, world_size: int) -> Machine:
    """This box as the model sees it: one node of `cores` cores running every rank, the probed rates.

    A node's rate is at least one process's: the concurrent probe can come out lower (the
    processes get in each other's way), but one rank alone on the node still gets its stream rate.
    """
    def node(kind: str) -> float:
        return max(probes[f"{kind}_stream"], probes[f"{kind}_node"])

    return Machine(
        write_stream=probes["write_stream"], write_node=node("write"), read_stream=probes["read_stream"], read_node=node("read"),
        copy_stream=probes["copy_stream"], copy_node=node("copy"), cores_per_node=probes["cores"], ranks_per_node=world_size, per_read_s=probes["per_read_s"],
    )


def run_works(run: Mapping, phase: str) -> list[RankWork]:
    """The model's work per rank for one measured run (its model size and its consolidation plan)."""
    model, world_size = run["model"], run["world_size"]
    if phase == "save":
        return save_work(model["bytes"], world_size)
    if phase == "rank0":
        return rank0_work(model["bytes"], model["tensors"], model["largest_tensor"], world_size)
    files = [FileShare(f["nbytes"], f["tensors"], f["largest"], f["rank"]) for f in run["plan"]]
    return parallel_work(files, world_size)


def fit(run1: Mapping, probes: Mapping) -> MethodCosts:
    """The methods' copy passes and memory bases from the 1-rank run: what its measurements leave after the probed terms.

    The time left after the disk and slice terms, in copies of the phase's bytes at the probed
    copy rate (none if the probed terms already account for it all); the peak RSS left after
    the structural memory terms.
    """
    machine = box_machine(probes, 1)
    passes, memory_base, cpu_passes = {}, {}, {}
    for phase in PHASES:
        (work,) = run_works(run1, phase)
        measured = run1["measured"][phase]
        without_copies = phase_time([work], machine, copy_passes=0.0)["total"]
        passes[phase] = max(0.0, (measured["seconds"] - without_copies) * machine.copy_stream / work.copied)
        memory_base[phase] = measured["peak_rss"] - sum(memory_terms(phase, work, 1))
        cpu_passes[phase] = measured["cpu_s"] * machine.copy_stream / work.copied
    return MethodCosts(passes, memory_base, cpu_passes)


def predict(run: Mapping, probes: Mapping, costs: MethodCosts) -> dict[str, dict[str, float]]:
    machine = box_machine(probes, run["world_size"])
    predictions = {}
    for phase in PHASES:
        works = run_works(run, phase)
        terms = phase_time(works, machine, passes_at(costs, phase, run["world_size"]))
        terms["peak_rss"] = peak_memory(phase, works, costs, run["world_size"])[1]
        predictions[phase] = terms
    return predictions


def summarize_run(records: list[dict]) -> dict:
    """One run: the model and plan (same on every rank), per-rank records, and per phase the measured seconds and peaks.

    Per repeat, a phase's seconds are the slowest rank's (barrier to barrier: all ranks), its
    peaks and byte counts the busiest rank's. Over the repeats, the fastest time is kept (other
    tenants of the host only ever slow a phase down, as they do the probes, of which the best
    rates are kept) and the median of the rest.
    """
    first = records[0]

    def samples(phase: str, key: str) -> list[float]:
        return [max(r["phases"][phase][i][key] for r in records) for i in range(len(first["phases"][phase]))]

    def busiest(phase: str, key: str) -> float:
        return statistics.median(samples(phase, key))

    measured = {
        phase: {
            "seconds": min(samples(phase, "wall_s")), "seconds_samples": samples(phase, "wall_s"),
            "peak_rss": busiest(phase, "peak_rss"), "peak_anon": busiest(phase, "peak_anon"),
            "read_bytes_max": busiest(phase, "read_bytes"), "write_bytes_max": busiest(phase, "write_bytes"),
            "cpu_s": statistics.median(
                max(r["phases"][phase][i]["user_s"] + r["phases"][phase][i]["sys_s"] for r in records) for i in range(len(first["phases"][phase]))
            ),
        }
        for phase in PHASES
    }
    return {"world_size": first["world_size"], "model": first["model"], "plan": first["plan"], "measured": measured, "ranks": records}


def error_pct(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured


def calibration_table(runs: Sequence[Mapping], probes: Mapping, costs: MethodCosts) -> tuple[str, list[dict]]:
    """The predictions beside the measurements, as a markdown table and as rows for the JSON file."""
    lines = [
        "| N | phase | measured s | repeats s | predicted s | error % | bound | rank path s | io s | copy s | slices s | peak RSS MB meas. / pred. |",
        "|---:|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for run in runs:
        predictions = predict(run, probes, costs)
        for phase in PHASES:
            measured, predicted = run["measured"][phase], predictions[phase]
            calibrated = run["world_size"] == 1
            row = {
                "world_size": run["world_size"], "phase": phase, "measured_s": measured["seconds"], "predicted_s": predicted["total"],
                "error_pct": error_pct(predicted["total"], measured["seconds"]), "calibration_run": calibrated,
                "terms": predicted, "peak_rss_measured": measured["peak_rss"], "peak_rss_predicted": predicted["peak_rss"],
            }
            rows.append(row)
            error = "(fit)" if calibrated else f"{row['error_pct']:+.1f}"
            repeats = " / ".join(f"{t:.1f}" for t in measured["seconds_samples"])
            lines.append(
                f"| {run['world_size']} | {PHASE_TITLES[phase]} | {measured['seconds']:.2f} | {repeats} | {predicted['total']:.2f} | {error} | "
                f"{predicted['bound']} | {predicted['rank_path']:.2f} | {predicted['io']:.2f} | {predicted['copy']:.2f} | {predicted['slices']:.2f} | "
                f"{measured['peak_rss'] / 1e6:.0f} / {predicted['peak_rss'] / 1e6:.0f} |"
            )
    return "\n".join(lines), rows


def measure(args: argparse.Namespace, work: Path) -> tuple[dict, list[dict]]:
    """The probes, then one torchrun per world size; every written folder deleted after its run."""
    ranks = [int(n) for n in args.ranks.split(",")]
    if ranks[0] != 1:
        sys.exit("--ranks must start with 1: the model is calibrated on the 1-rank run")
    shutil.rmtree(work, ignore_errors=True)
    shape = box_shape(parse_count(args.size))
    model_bytes, _ = shapes_bytes(shape.tensor_shapes(), 4)
    max_shard_size = model_bytes // args.files
    probes = run_probes(work / "probe", args)
    print("shard files are evicted from the page cache before each consolidation (read from the disk, as on a cluster); "
          "DCP's consolidated files are fsynced inside its timing", flush=True)
    runs = []
    for world_size in ranks:
        launched = time.perf_counter()
        print(f"run: {world_size} rank(s), {args.size} fp32 ({model_bytes / 1e9:.2f} GB), max_shard_size {max_shard_size / 1e6:.0f} MB ...", flush=True)
        run = summarize_run(launch(world_size, args, work / f"ranks-{world_size}", max_shard_size))
        shutil.rmtree(work / f"ranks-{world_size}")
        run["run_seconds"] = time.perf_counter() - launched
        print("  " + ", ".join(f"{PHASE_TITLES[p]} " + "/".join(f"{t:.2f}" for t in run["measured"][p]["seconds_samples"]) + " s" for p in PHASES)
              + f" ({run['run_seconds']:.0f} s)", flush=True)
        runs.append(run)
    shutil.rmtree(work, ignore_errors=True)
    return probes, runs


def calibrate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    if args.refit:
        earlier = json.loads(Path(args.refit).read_text())
        probes, command, seconds = earlier["calibration"]["probes"], earlier["command"], earlier["seconds"]
        runs = [summarize_run(run["ranks"]) for run in earlier["runs"]]
        print(f"refitting the measurements of {args.refit} ({command})")
    else:
        probes, runs = measure(args, out / "work")
        command, seconds = " ".join([os.path.basename(sys.executable)] + sys.argv), time.perf_counter() - started
    if len(runs[0]["plan"]) < 8:
        print(f"warning: only {len(runs[0]['plan'])} consolidated files (fewer than 8): raise --files")
    costs = fit(runs[0], probes)
    table, rows = calibration_table(runs, probes, costs)
    calibration = {"probes": probes, "costs": asdict(costs), "model": runs[0]["model"], "files": len(runs[0]["plan"])}
    results = {
        "command": command, "calibration": calibration, "runs": runs, "predictions": rows,
        "seconds": seconds, "torch": torch.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(calibration, indent=2))
    (out / "measurements.json").write_text(json.dumps(results, indent=2))
    (out / "calibration_table.md").write_text(table + "\n")
    print()
    print("calibrated on the 1-rank run: copy passes " + ", ".join(f"{PHASE_TITLES[p]} {costs.copy_passes[p]:.2f}" for p in PHASES)
          + " (all CPU time as passes: " + ", ".join(f"{costs.cpu_passes[p]:.2f}" for p in PHASES) + ")")
    print(table)
    worst = max((abs(r["error_pct"]) for r in rows if not r["calibration_run"]), default=0.0)
    print(f"\nworst prediction error {worst:.1f}% (goal: 30%); measuring took {seconds:.0f} s; {out}/measurements.json")
    return 0


# ====================================================================== table: the model's predictions for a cluster
def cluster_machine(args: argparse.Namespace) -> Machine:
    """A cluster node as the table's options describe it; the NIC caps what a node reads, writes and uploads."""
    nic = args.nic_gbps * GB
    return Machine(
        write_stream=min(args.write_gbps * GB, nic), write_node=min(args.write_gbps * GB, nic),
        read_stream=min(args.read_gbps * GB, nic), read_node=min(args.read_gbps * GB, nic),
        copy_stream=args.memcpy_gbps * GB, copy_node=args.memcpy_gbps * GB * args.ranks_per_node,
        cores_per_node=args.ranks_per_node, ranks_per_node=args.ranks_per_node, per_read_s=args.read_latency_ms / 1e3,
        write_global=args.fs_gbps * GB, read_global=args.fs_gbps * GB, upload_node=min(args.upload_gbps * GB, nic),
    )


def cluster_files(shapes: Mapping[str, tuple[int, ...]], world_size: int, args: argparse.Namespace) -> list[FileShare]:
    """The consolidated files and their writers, as `plan_consolidation` (the library's) assigns them."""
    from hf_rl_ckpt.state.consolidate import plan_consolidation

    state = {name: torch.empty(shape, dtype=torch.bfloat16, device="meta") for name, shape in shapes.items()}
    plan = plan_consolidation(state, max_shard_size=int(args.max_shard_gb * GB), world_size=world_size, ranks_per_node=args.ranks_per_node)
    return [FileShare(f.nbytes, len(f.tensors), max(plan.specs[t].nbytes for t in f.tensors), f.rank) for f in plan.files]


def busy(works: Sequence[RankWork], ranks_per_node: int) -> str:
    """'ranks/nodes' that have any work."""
    ranks = [r for r, w in enumerate(works) if w.read or w.written]
    return f"{len(ranks)}/{len({r // ranks_per_node for r in ranks})}"


def cluster_rows(name: str, shape: LlamaShape, world_size: int, costs: MethodCosts, args: argparse.Namespace) -> tuple[list[str], dict]:
    """The table's rows for one model and world size, and the end-to-end totals."""
    machine = cluster_machine(args)
    shapes = shape.tensor_shapes()
    model_bytes, largest = shapes_bytes(shapes, 2)
    files = cluster_files(shapes, world_size, args)
    works = {
        "save": save_work(model_bytes, world_size),
        "rank0": rank0_work(model_bytes, len(shapes), largest, world_size),
        "parallel": parallel_work(files, world_size),
    }
    times = {phase: phase_time(works[phase], machine, passes_at(costs, phase, world_size)) for phase in PHASES}
    memory = {phase: peak_memory(phase, works[phase], costs, world_size) for phase in PHASES}
    share = model_bytes / world_size
    staging = share / machine.copy_stream  # async: the training loop waits only for the copy into host staging memory
    uploads = {
        "shards": [share] * world_size,
        "rank0": [work.written for work in works["rank0"]],
        "parallel": [work.written for work in works["parallel"]],
    }

    def row(method: str, phase_works: Sequence[RankWork], moved: float, sync: str, async_: str, background: float, bound: str, mem: str) -> str:
        return (f"| {name} | {world_size} | {method} | {busy(phase_works, machine.ranks_per_node)} | {moved / GB:.2f} | {sync} | {async_} | "
                f"{background:.1f} | {bound} | {mem} |")

    def gb(nbytes: float) -> str:
        return f"{nbytes / GB:.2f}"

    def moved(phase: str) -> float:
        return max(w.read + w.written for w in works[phase])

    rows = [
        row("sharded save", works["save"], moved("save"), f"{times['save']['total']:.1f}", f"{staging:.2f}", times["save"]["total"],
            times["save"]["bound"], f"{gb(memory['save'][0])} (async {gb(memory['save'][0] + share)})"),
    ]
    for phase in ("rank0", "parallel"):
        allocated, with_mapped = memory[phase]
        mem = gb(allocated) + (f" (+{gb(with_mapped - allocated)} mapped)" if with_mapped > allocated else "")
        rows.append(row(PHASE_TITLES[phase], works[phase], moved(phase), f"{times[phase]['total']:.1f}", "0", times[phase]["total"],
                        times[phase]["bound"], mem))
    upload_seconds = {kind: upload_time(per_rank, machine) for kind, per_rank in uploads.items()}
    for kind, title in (("shards", "upload shards"), ("rank0", "upload consolidated (rank 0)"), ("parallel", "upload consolidated (writers)")):
        upload_works = [RankWork(written=amount) for amount in uploads[kind]]
        rows.append(row(title, upload_works, max(uploads[kind]), "-", "0", upload_seconds[kind], "node uplink", "-"))
    totals = {
        "files": len(files), "largest_file": max(f.nbytes for f in files), "save": times["save"]["total"],
        "rank0_path": times["rank0"]["total"] + upload_seconds["rank0"],
        "parallel_path": times["parallel"]["total"] + upload_seconds["parallel"],
        "shards_upload": upload_seconds["shards"],
    }
    return rows, totals


def table(args: argparse.Namespace) -> int:
    path = Path(args.calibration)
    if not path.is_file():
        sys.exit(f"{path} not found: run `python benchmarks/scale_model.py calibrate` first, or pass --calibration")
    calibration = json.loads(path.read_text())
    costs = MethodCosts(**calibration["costs"])
    if args.passes == "cpu":
        costs = MethodCosts(costs.cpu_passes, costs.memory_base, costs.cpu_passes)
    world_sizes = [int(n) for n in args.world_sizes.split(",")]
    print("## Checkpoint cost model: predictions for a cluster\n")
    print("Assumptions (options of `table`):\n")
    for line in (
        f"- weights only, bf16 (2 bytes/parameter), Llama 3 shapes; {args.ranks_per_node} ranks per node, one core each for checkpoint work",
        f"- per-node shared-filesystem client: write {args.write_gbps:g} GB/s, read {args.read_gbps:g} GB/s; NIC {args.nic_gbps:g} GB/s; "
        f"filesystem aggregate cap {args.fs_gbps:g} GB/s (reads and writes each)",
        f"- per slice read: {args.read_latency_ms:g} ms (a filesystem round trip plus lookups); host memcpy {args.memcpy_gbps:g} GB/s per core; "
        f"max_shard_size {args.max_shard_gb:g} GB; object-store upload {args.upload_gbps:g} GB/s per node",
        f"- CPU work per method in memcpy passes over its bytes, from `{path}` ({args.passes}: "
        + ("the copies not hidden under the disk on the calibration box" if args.passes == "exposed" else "all its CPU time there")
        + "): " + ", ".join(f"{PHASE_TITLES[p]} {costs.copy_passes[p]:.2f}" for p in PHASES) + " (+1 for parallel consolidation when N > 1)",
        "- consolidation starts once every shard is on the filesystem and reads it cold; sync stall: the training loop waits for the "
        "whole phase; async stall: the copy into host staging memory (save) or nothing (consolidation and upload run in the background)",
    ):
        print(line)
    print()
    print("| model | N | method | ranks/nodes busy | GB moved (max rank) | sync stall s | async stall s | background s | bound | peak host GB/rank |")
    print("|---|---:|---|---|---:|---:|---:|---:|---|---|")
    summary = []
    for name, shape in CLUSTER_MODELS.items():
        for world_size in world_sizes:
            rows, totals = cluster_rows(name, shape, world_size, costs, args)
            print("\n".join(rows))
            summary.append((name, world_size, totals))
    print("\nTime from the start of a save to a deployable HF folder in the object store (save + consolidation + upload of the "
          "consolidated files), s:\n")
    print("| model | N | files | largest file GB | sharded save | rank-0 path | parallel path | speed-up | shards uploaded (save + upload) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, world_size, t in summary:
        rank0_total, parallel_total = t["save"] + t["rank0_path"], t["save"] + t["parallel_path"]
        print(f"| {name} | {world_size} | {t['files']} | {t['largest_file'] / GB:.2f} | {t['save']:.1f} | {rank0_total:.1f} | {parallel_total:.1f} | "
              f"{rank0_total / parallel_total:.1f}x | {t['save'] + t['shards_upload']:.1f} |")
    print(STRUCTURAL_NOTES)
    return 0


STRUCTURAL_NOTES = """
Structural limits the model shows:

- Rank-0 consolidation moves 2x the model (read every shard, write every file) through one
  process on one node: its time does not shrink with N, while the sharded save's does; and it
  reads every tensor as N slices, so its per-slice cost grows with N (tensors x N reads).
- Parallel consolidation uses min(N, number of consolidated files) ranks (files are never
  split), one per node first; once N reaches the file count its time stops shrinking and is
  bounded by the largest file (read + assemble + write 5 GB). Each of its ranks still reads
  every one of its tensors as N slices, so at large N the per-slice round trips dominate.
- Uploading what the writers wrote spreads the upload over as many nodes as wrote files;
  rank 0 alone uploads the whole model through one node's uplink.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    cal = commands.add_parser("calibrate", help="measure this box, fit the model on 1 rank, predict and check the others")
    cal.add_argument("--ranks", default="1,2,4,8", help="world sizes to run, the first must be 1 (default 1,2,4,8)")
    cal.add_argument("--size", default="200M", help="parameters of the fp32 Llama (default %(default)s: 0.78 GB, 7 min in all)")
    cal.add_argument("--repeats", type=int, default=4, help="repeats of the three phases in every run; the fastest is kept (default %(default)s)")
    cal.add_argument("--files", type=int, default=12, help="max_shard_size = model bytes / FILES (default 12; at least 8 files result)")
    cal.add_argument("--out", default="benchmarks/out/scale", help="where the JSON results go (work files under OUT/work, deleted)")
    cal.add_argument("--probe-gb", type=float, default=1.0, help="bytes of each disk and memory probe, GB (default %(default)s)")
    cal.add_argument("--probe-streams", type=int, default=4, help="processes of the concurrent probes (default %(default)s)")
    cal.add_argument("--probe-repeats", type=int, default=3, help="repeats of the disk and memory probes; the best rates are kept (default %(default)s)")
    cal.add_argument("--refit", metavar="MEASUREMENTS_JSON", help="fit and predict from an earlier run's measurements.json instead of measuring")
    cal.add_argument("--run-timeout", type=int, default=420, help="seconds before a torchrun is killed (default %(default)s)")

    tab = commands.add_parser("table", help="print the model's predictions for a cluster (markdown)")
    tab.add_argument("--calibration", default="benchmarks/results_scale_cpu.json", help="written by calibrate (default: %(default)s, the run of record)")
    tab.add_argument("--world-sizes", default="8,64,512", help="default %(default)s")
    tab.add_argument("--ranks-per-node", type=int, default=8, help="default %(default)s")
    tab.add_argument("--write-gbps", type=float, default=2.0, help="per-node filesystem write bandwidth, GB/s (default %(default)s)")
    tab.add_argument("--read-gbps", type=float, default=4.0, help="per-node filesystem read bandwidth, GB/s (default %(default)s)")
    tab.add_argument("--nic-gbps", type=float, default=25.0, help="per-node NIC, GB/s (default %(default)s: 200 Gb/s)")
    tab.add_argument("--fs-gbps", type=float, default=100.0, help="shared filesystem aggregate cap, GB/s (default %(default)s)")
    tab.add_argument("--memcpy-gbps", type=float, default=10.0, help="host memcpy per core, GB/s (default %(default)s)")
    tab.add_argument("--max-shard-gb", type=float, default=5.0, help="max_shard_size of the consolidated files, GB (default %(default)s)")
    tab.add_argument("--upload-gbps", type=float, default=1.5, help="object-store upload per node, GB/s (default %(default)s)")
    tab.add_argument("--passes", choices=("exposed", "cpu"), default="exposed",
                     help="CPU work per method: the calibrated copy passes (default), or all the CPU time of the 1-rank run, "
                          "for storage fast enough that no copy hides under it")
    tab.add_argument("--read-latency-ms", type=float, default=0.5, help="fixed cost of one slice read on the filesystem, ms (default %(default)s)")

    wrk = commands.add_parser("worker", help="one rank (torchrun runs it)")
    wrk.add_argument("--size", required=True)
    wrk.add_argument("--workdir", required=True)
    wrk.add_argument("--max-shard-size", type=int, required=True)
    wrk.add_argument("--repeats", type=int, required=True)

    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args)
        return 0
    return table(args) if args.command == "table" else calibrate(args)


if __name__ == "__main__":
    sys.exit(main())
