"""Consolidating a sharded model: every rank assembles and writes its share of the HF safetensors files.

An FSDP2 save leaves per-rank DCP shards (`model/sharded/`: safetensors files whose
`DCP_SHARDING_INFO` metadata says where each slice sits in the full tensor). The deployable
folder (`model/consolidated/`) holds the same weights split at `max_shard_size` and named as
`save_pretrained` names them. Written by rank 0 alone, that is one process moving the whole
model twice (read the shards, write the files) through one node per save, while the shards
themselves shrink with the world size; so the work is shared:

- `plan_consolidation` decides, from the global shapes alone (no data moves: every rank
  computes it, and the writer compares the ranks' `fingerprint()`s before anyone writes),
  which tensors go in which file and which rank writes each file. The tensors are those
  `save_pretrained` writes (`state.model.saved_state`): an MoE layer's fused expert tensor
  becomes one tensor per expert, possibly in several files, so the plan also records which
  trained tensors each written one is made from.
  Files are handed out largest first to the least-loaded rank, spreading them over the nodes
  before doubling up on one; rank 0, which also writes the index, config and tokenizer, takes
  a file only while that keeps it within its fair share of the bytes.
- `write_rank_files` is one rank's share: each tensor of its files is assembled from the
  slices in the shard files (one full tensor in memory at a time), cast to the configured
  dtype, and streamed out hashed (`stream_safetensors`), so the manifest needs no second read.
  A fused tensor is assembled once per file that needs its pieces and converted with
  transformers' own reverse conversion (`shims.weight_conversion`).
  It runs no collective: under `async_save` it runs on the background thread, once the shards
  are on disk. Slices that do not cover a tensor (a rank cannot see another rank's shards)
  fail the save, naming the tensor.

torch's `consolidate_safetensors_files_on_every_rank` shares the work the same way; it
assigns files round robin by index, casts and hashes in later passes, and synchronises with
collectives, which the training thread would then have to run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open

from ..atomic import write_bytes
from ..digest import Digests, hexdigest
from ..errors import CheckpointSaveError
from ..shims import DCP_SHARDING_INFO_KEY, SAVED_OFFSETS_KEY, WeightConversion, weight_conversion
from .model import SAFE_INDEX, SAFE_WEIGHTS, cast_to, meta_state, split_weights, total_parameters, without_ignored_keys
from .safetensors_io import TensorSpec, file_order, stream_safetensors

logger = logging.getLogger("hf_rl_ckpt")

@dataclass(frozen=True)
class ConsolidatedFile:
    """One file of the consolidated folder: its name, its tensors in order, its size in bytes and the rank that writes it."""

    name: str
    tensors: tuple[str, ...]
    nbytes: int
    rank: int


@dataclass(frozen=True)
class ConsolidationPlan:
    """Which file holds each tensor (as written: dtype and full shape), which rank writes each file, and what each is made from."""

    specs: Mapping[str, TensorSpec]
    files: tuple[ConsolidatedFile, ...]
    sources: Mapping[str, tuple[str, ...]]  # written name -> the trained (runtime) tensors it is converted from
    runtime_shapes: Mapping[str, tuple[int, ...]]  # those trained tensors' full shapes, as the shards hold them
    conversion: WeightConversion
    metadata: Mapping[str, int]  # the index's metadata, as `save_pretrained` records it (total_parameters, total_size)

    def fingerprint(self) -> str:
        """Equal on two ranks exactly when their plans are: what the ranks compare before anyone writes."""
        described = [[file.name, file.rank, [[name, str(self.specs[name].dtype), self.specs[name].shape] for name in file.tensors]] for file in self.files]
        return hexdigest(json.dumps(described).encode())

    def files_of(self, rank: int) -> tuple[ConsolidatedFile, ...]:
        return tuple(file for file in self.files if file.rank == rank)

    def index(self) -> dict | None:
        """The `model.safetensors.index.json` document (as `save_pretrained` writes it); None for a single file."""
        if len(self.files) == 1:
            return None
        return {
            "metadata": dict(self.metadata),
            "weight_map": {name: file.name for file in self.files for name in file.tensors},
        }


def plan_consolidation(
    state: Mapping[str, torch.Tensor], *, max_shard_size: int, world_size: int, ranks_per_node: int | None = None,
    dtype: torch.dtype | None = None, model: torch.nn.Module | None = None,
) -> ConsolidationPlan | None:
    """The consolidated files of `state` (name -> tensor or DTensor, tied copies dropped; global shapes are used, never data) and their writers.

    `model`: the model `state` is of, whose `save_pretrained` names and shapes the files
    hold (without one, the tensors are written as named). `dtype`: floating-point tensors are
    written in it (`consolidated_dtype`), which is what the file split and the byte shares are
    computed from. `ranks_per_node` (default: all ranks on one node) orders the ranks so that
    files go to every node before a second rank of any node gets one. None when the model's
    weight conversion merges several trained tensors into one written tensor (no such model
    in transformers' mappings yet): such a folder is gathered on rank 0 instead.

    ```python
    >>> import torch
    >>> state = {f"layer{i}.weight": torch.empty(256, 256, device="meta") for i in range(4)}
    >>> plan = plan_consolidation(state, max_shard_size=2**18, world_size=2)
    >>> [(file.name, file.rank) for file in plan.files]
    [('model-00001-of-00004.safetensors', 0), ('model-00002-of-00004.safetensors', 1), ('model-00003-of-00004.safetensors', 0), ('model-00004-of-00004.safetensors', 1)]

    ```
    """
    conversion = weight_conversion(model)
    runtime = meta_state(without_ignored_keys(model, state) if model is not None else state, dtype=dtype)
    saved = conversion.to_saved(runtime)  # meta views where the conversion makes views, as of the trained tensors
    sources: dict[str, tuple[str, ...]] = {}
    for name, tensor in runtime.items():  # which trained tensor each written one comes from, one trained tensor at a time
        for written, piece in conversion.to_saved({name: tensor}).items():
            if written in saved and tuple(piece.shape) == tuple(saved[written].shape):
                sources[written] = (name,)
    if set(sources) != set(saved):
        logger.info("%s's weight conversion merges trained tensors: its consolidated folder is gathered on rank 0", type(model).__name__)
        return None
    specs = {name: TensorSpec(tensor.dtype, tuple(tensor.shape)) for name, tensor in saved.items()}
    split = split_weights(saved, max_shard_size, SAFE_WEIGHTS.replace(".", "{suffix}.", 1))
    names = sorted(split.filename_to_tensors)
    sizes = [sum(specs[tensor].nbytes for tensor in split.filename_to_tensors[name]) for name in names]
    owners = _assign(sizes, world_size, ranks_per_node or world_size)
    files = tuple(
        ConsolidatedFile(name, tuple(file_order({tensor: specs[tensor].dtype for tensor in split.filename_to_tensors[name]})), size, owner)
        for name, size, owner in zip(names, sizes, owners)
    )
    return ConsolidationPlan(
        specs=specs, files=files, sources=sources, runtime_shapes={name: tuple(tensor.shape) for name, tensor in runtime.items()},
        conversion=conversion, metadata={
            "total_parameters": total_parameters(model) if model is not None else sum(tensor.numel() for tensor in runtime.values()),
            **split.metadata,
        },
    )


def _assign(sizes: list[int], world_size: int, ranks_per_node: int) -> list[int]:
    """The rank that writes each file: largest file first to the least-loaded rank (rank 0 only within its fair share).

    Among equally loaded ranks, the first local rank of each node comes before the second of
    any, so a few files land on different nodes (disks, network links) rather than on one.
    """
    fair_share = sum(sizes) / world_size
    load = [0] * world_size
    owners = [0] * len(sizes)
    spread = sorted(range(world_size), key=lambda rank: (rank % ranks_per_node, rank // ranks_per_node))
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        eligible = [rank for rank in spread if rank != 0 or load[0] + sizes[i] <= fair_share or world_size == 1]
        owner = min(eligible, key=lambda rank: load[rank])  # min keeps the first of equals, in `spread` order
        owners[i] = owner
        load[owner] += sizes[i]
    return owners


def write_index(plan: ConsolidationPlan, out_dir: Path) -> Digests:
    """Rank 0: the index file, when the weights span several files."""
    index = plan.index()
    if index is None:
        return {}
    return {SAFE_INDEX: write_bytes(out_dir / SAFE_INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())}


def write_rank_files(plan: ConsolidationPlan, sharded_dir: Path, out_dir: Path, rank: int) -> Digests:
    """Write `rank`'s files of `plan` into `out_dir`, assembled from the DCP shards in `sharded_dir`; return their digests.

    Raises:
        CheckpointSaveError: the shards this rank can see do not cover one of its tensors.
    """
    mine = plan.files_of(rank)
    if not mine:
        return {}
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _ShardReader(sharded_dir) as shards:
        digests = {
            file.name: stream_safetensors(
                out_dir / file.name, {name: plan.specs[name] for name in file.tensors},
                (cast_to(tensor, plan.specs[name].dtype) for name, tensor in _written_tensors(plan, file, shards)),
                {"format": "pt"},
            )
            for file in mine
        }
    logger.info(
        "rank %d consolidated %d of %d files (%.1f MB) in %.2fs", rank, len(mine), len(plan.files),
        sum(file.nbytes for file in mine) / 1e6, time.perf_counter() - started,
    )
    return digests


def _written_tensors(plan: ConsolidationPlan, file: ConsolidatedFile, shards: "_ShardReader") -> Iterator[tuple[str, torch.Tensor]]:
    """`file`'s tensors in order, each converted from the full trained tensors it comes from (one fused tensor's pieces kept until written)."""
    pending: dict[str, torch.Tensor] = {}
    wanted = set(file.tensors)
    for name in file.tensors:
        if name not in pending:
            trained = {source: shards.full_tensor(source, plan.runtime_shapes[source]) for source in plan.sources[name]}
            pending.update((written, tensor) for written, tensor in plan.conversion.to_saved(trained).items() if written in wanted)
        yield name, pending.pop(name)


@dataclass(frozen=True)
class _Slice:
    handle: object  # an open `safe_open` handle of the shard file holding the slice
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


class _ShardReader:
    """Where every slice of every tensor is among a folder's DCP shard files (headers only), and reading them back."""

    def __init__(self, sharded_dir: Path) -> None:
        self.folder = sharded_dir
        self._open = contextlib.ExitStack()
        self._slices: dict[str, list[_Slice]] = {}

    def __enter__(self) -> "_ShardReader":
        with self._open as opened:
            for path in sorted(self.folder.glob("*.safetensors")):
                handle = opened.enter_context(safe_open(os.fspath(path), framework="pt"))
                sharding = json.loads((handle.metadata() or {}).get(DCP_SHARDING_INFO_KEY, "{}"))
                for name in handle.keys():
                    shape = tuple(handle.get_slice(name).get_shape())
                    offsets = tuple(sharding.get(name, {}).get(SAVED_OFFSETS_KEY, [0] * len(shape)))
                    self._slices.setdefault(name, []).append(_Slice(handle, offsets, shape))
            self._open = opened.pop_all()  # kept open until __exit__; closed here only if a header could not be read
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.close()

    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """`name` whole, as trained, assembled from its slices (each stored once: DCP writes a replicated tensor once)."""
        pieces = {(piece.offsets, piece.shape): piece for piece in self._slices.get(name, [])}
        if len(pieces) == 1 and next(iter(pieces.values())).shape == shape:
            return next(iter(pieces.values())).handle.get_tensor(name)
        full, covered = None, 0
        for piece in pieces.values():
            data = piece.handle.get_tensor(name)
            if full is None:
                full = torch.empty(shape, dtype=data.dtype)
            full[tuple(slice(offset, offset + size) for offset, size in zip(piece.offsets, piece.shape))] = data
            covered += data.numel()
        if full is None or covered != full.numel():
            raise CheckpointSaveError(
                f"consolidating {name} {shape} from the shards in {self.folder}: its slices cover {covered} of "
                f"{math.prod(shape)} elements, so this rank does not see every rank's shards; put checkpoint_dir on a "
                "shared filesystem or set remote_dir"
            )
        return full

