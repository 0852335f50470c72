"""Optimizer state through torch.distributed.checkpoint, in safetensors, without pickle.

The optimizer state dict is flattened by parameter name (`state.<fqn>.exp_avg`), which
makes it independent of parameter order and lets DCP reshard it across world sizes. Its
tensors are safetensors files whose DCP metadata lives in the headers (no pickled
`.metadata` file), so `HuggingFaceStorageReader` reads and reshards them; the non-tensor
values (lr, betas, flags) go to JSON, because DCP's writer would silently pickle them into
a file named `.safetensors`.

Who writes the tensors: when every tensor is a plain (unsharded) tensor, as in a single
process or a DDP run whose ranks agree they hold the same state, rank 0 streams them with
our own writer into the file DCP would name, with the same header metadata
(`write_optimizer_tensors`): hashed while written, fsynced, and never a second copy in
memory (DCP's `HuggingFaceStorageWriter` serialises each whole file into one bytes object
first). Sharded state (DTensors, e.g. FSDP) goes through DCP's collective writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.futures import Future

from ..digest import Digests, FileDigest
from .. import distributed
from ..atomic import atomic_write_bytes, write_bytes
from ..errors import CorruptCheckpointError, StateMismatchError
from ..shims import DCP_FORMAT_METADATA, DCP_SHARDING_INFO_KEY, DCP_VERSION_KEY, HF_DCP_VERSION, SAVED_OFFSETS_KEY, dcp_file_name
from . import jsoncodec
from .safetensors_io import write_safetensors

NON_TENSOR_STATE = "non_tensor_state.json"
#: The index name DCP's `HuggingFaceStorageWriter` gives a rank-0 (non-distributed) save.
TENSORS_INDEX = "model.safetensors.index.json"
#: Largest optimizer tensor file written by `write_optimizer_tensors` (several files are written and hashed in parallel).
OPTIM_FILE_SIZE = 512 << 20
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
#: Prefix of a flattened state's per-parameter group options: `param_groups.<parameter name>.<option>`.
_PARAM_GROUPS = "param_groups."


def _split(flat: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in flat.items() if k not in tensors}


@contextlib.contextmanager
def _without_empty_groups(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Hide parameter groups that hold no parameters while DCP reads or writes the state.

    The flattened state names a group by its parameters, so an empty group (e.g. the
    Trainer's no-weight-decay group of a LoRA model) vanishes on save and breaks loading.
    It has no state to keep, and its learning rate follows the scheduler.
    """
    groups = optimizer.param_groups
    optimizer.param_groups = [group for group in groups if group["params"]]
    try:
        yield
    finally:
        # Loading replaces the group dicts: put the current ones back in place, between the empty groups.
        current = iter(optimizer.param_groups)
        optimizer.param_groups = [next(current) if group["params"] else group for group in groups]


@dataclass
class OptimizerSnapshot:
    """The optimizer state as of `capture_optimizer`: tensors by flattened name (live references,
    not copies) and the non-tensor values already serialised to JSON."""

    tensors: dict[str, torch.Tensor]
    rest: bytes

    @property
    def plain(self) -> bool:
        """True when no tensor is sharded (DTensor), so one process holds the whole state."""
        return not any(isinstance(t, DTensor) for t in self.tensors.values())

    def signature(self) -> str:
        """Names, shapes and dtypes of the state (and its JSON values): equal on ranks that hold the same replicated state."""
        sha = hashlib.sha256(self.rest)
        for name, tensor in sorted(self.tensors.items()):
            sha.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        return sha.hexdigest()


def _foreign_parameter(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The first parameter of `optimizer` that is not one of `model`'s, described; None when all are.

    DCP names optimizer state by the model's parameter names, and fails on such a parameter
    with a bare `KeyError` (its index in the optimizer).
    """
    own = {id(param) for param in model.parameters()}
    for group_index, group in enumerate(optimizer.param_groups):
        for index, param in enumerate(group["params"]):
            if id(param) not in own:
                return (
                    f"optimizer parameter group {group_index} parameter {index} (shape {list(param.shape)}) is not a parameter of "
                    f"{type(model).__name__}: the optimizer was built for another model, or another instance of it"
                )
    return None


def capture_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerSnapshot:
    """The flattened state of `optimizer` over `model`'s parameters (tensors referenced, not copied)."""
    foreign = _foreign_parameter(model, optimizer)
    if foreign is not None:
        raise StateMismatchError(f"{foreign}; build the optimizer over the parameters of the model you save")
    with _without_empty_groups(optimizer):
        tensors, rest = _split(get_optimizer_state_dict(model, optimizer, options=_OPTIONS))
    return OptimizerSnapshot(tensors, jsoncodec.dumps(rest, "optimizer"))


def split_by_size(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of `tensors` of at most `max_bytes` each (a bigger tensor gets a group of its own)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    return groups


def write_optimizer_tensors(
    tensors: Mapping[str, torch.Tensor], rest: bytes, out_dir: str | os.PathLike, *, max_file_size: int = OPTIM_FILE_SIZE
) -> Digests:
    """Write whole (unsharded) optimizer state from one process; return digests by file name.

    The tensors go through the streaming safetensors writer (hashed while written, fsynced,
    no in-memory copy of the file) into the files DCP's `HuggingFaceStorageWriter` would
    write for a non-distributed save with an `fqn_to_index_mapping` (`model-0000i-of-0000n`,
    at most `max_file_size` each), with the same header metadata (every tensor a single
    chunk at offset 0) and index, so `load_optimizer` reads and reshards them exactly as a
    DCP save. Several files are written concurrently, and a resume hashes them in parallel.
    The tensor files are fsynced; the two small JSON files are not: inside a checkpoint's
    staging directory the commit fsyncs the tree (`save_optimizer` does it for its folder).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = split_by_size(tensors, max_file_size)
    names = [dcp_file_name(index, len(groups)) for index in range(1, len(groups) + 1)]

    def write(name: str, group: Mapping[str, torch.Tensor]) -> FileDigest:
        sharding = {fqn: {SAVED_OFFSETS_KEY: [0] * tensor.dim()} for fqn, tensor in group.items()}
        metadata = {DCP_SHARDING_INFO_KEY: json.dumps(sharding), DCP_VERSION_KEY: HF_DCP_VERSION, **DCP_FORMAT_METADATA}
        return write_safetensors(out_dir / name, group, metadata)

    with ThreadPoolExecutor(min(len(groups), os.cpu_count() or 1, 4), thread_name_prefix="hf_rl_ckpt-optim") as pool:
        futures = {name: pool.submit(write, name, group) for name, group in zip(names, groups)}
        digests = {name: future.result() for name, future in futures.items()}
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {fqn: name for name, group in zip(names, groups) for fqn in group},
    }
    digests[TENSORS_INDEX] = write_bytes(out_dir / TENSORS_INDEX, json.dumps(index, indent=2).encode())
    digests[NON_TENSOR_STATE] = write_bytes(out_dir / NON_TENSOR_STATE, rest)
    return digests


def write_optimizer_dcp(snapshot: OptimizerSnapshot, out_dir: str | os.PathLike) -> Digests:
    """Write the state through DCP's collective `HuggingFaceStorageWriter` (every rank calls it); digests of rank 0's JSON."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with distributed.quiet_single_process_dcp():
        dcp.save(snapshot.tensors, storage_writer=HuggingFaceStorageWriter(str(out_dir), save_distributed=distributed.is_distributed()))
    if distributed.rank() == 0:
        return {NON_TENSOR_STATE: atomic_write_bytes(out_dir / NON_TENSOR_STATE, snapshot.rest)}
    return {}


class _PreloadedReader(HuggingFaceStorageReader):
    """`HuggingFaceStorageReader` that takes tensors from files already read (and hash-checked) into memory.

    Files not in `preloaded` are read from disk as usual; planning and resharding are DCP's.
    """

    def __init__(self, path: str, preloaded: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        super().__init__(path)
        self._preloaded = {os.path.realpath(name): tensors for name, tensors in preloaded.items()}
        self._file = functools.lru_cache(maxsize=None)(os.path.realpath)  # hundreds of tensors share a few files

    def read_data(self, plan, planner) -> Future[None]:
        from_memory, from_disk = [], []
        files = {item.storage_index: self._file(self.storage_data[item.storage_index].relative_path) for item in plan.items}
        for item in plan.items:
            (from_memory if files[item.storage_index] in self._preloaded else from_disk).append(item)
        if from_disk:
            super().read_data(dataclasses.replace(plan, items=from_disk), planner).wait()
        for item in from_memory:
            tensors = self._preloaded[files[item.storage_index]]
            slices = tuple(slice(offset, offset + length) for offset, length in zip(item.storage_offsets, item.lengths))
            source = tensors[item.storage_index.fqn][slices]
            target = planner.resolve_tensor(item).detach()
            if target.size() != source.size():
                raise CorruptCheckpointError(self.path, f"optimizer tensor {item.storage_index.fqn}: stored {list(source.size())}, expected {list(target.size())}")
            target.copy_(source)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done


def _names(label: str, names: list[str]) -> str:
    return f"{label}: {', '.join(names[:8])}" + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")


def _parameter_names(flat_rest: Mapping[str, Any]) -> set[str]:
    """The parameter names of a flattened optimizer state, from its `param_groups.<name>.<option>` entries."""
    return {key.removeprefix(_PARAM_GROUPS).rpartition(".")[0] for key in flat_rest if key.startswith(_PARAM_GROUPS)}


def _difference(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, template: Mapping[str, torch.Tensor], template_rest: Mapping[str, Any],
    saved_shapes: Mapping[str, tuple[int, ...]], saved_rest: Mapping[str, Any],
) -> str | None:
    """What differs between this optimizer's flattened state and the saved one, first difference first; None when they fit."""
    mine, saved = _parameter_names(template_rest), _parameter_names(saved_rest)
    if mine != saved:
        sizes = ", ".join(f"group {index}: {len(group['params'])}" for index, group in enumerate(optimizer.param_groups))
        return "; ".join([
            f"this optimizer holds {len(mine)} parameters ({sizes}), the checkpoint's {len(saved)}",
            *[_names(label, sorted(names)) for label, names in (("not in this optimizer", saved - mine), ("not in the checkpoint", mine - saved)) if names],
        ])
    # Loading takes each group's options from its first parameter: a group must not join parameters saved with different options.
    names = {param: name for name, param in model.named_parameters()}
    for index, group in enumerate(optimizer.param_groups):
        members = [names[param] for param in group["params"] if param in names]
        for option in (option for option in group if option != "params"):
            values = [(name, saved_rest.get(f"{_PARAM_GROUPS}{name}.{option}")) for name in members]
            other = next(((name, value) for name, value in values if value != values[0][1]), None)
            if other is not None:
                return (
                    f"group {index} mixes parameters of different groups in the checkpoint: {values[0][0]} has {option}={values[0][1]!r}, "
                    f"{other[0]} {option}={other[1]!r}"
                )
    only_saved, only_mine = sorted(set(saved_shapes) - set(template)), sorted(set(template) - set(saved_shapes))
    if only_saved or only_mine:
        parts = [_names(label, names) for label, names in (("in the checkpoint only", only_saved), ("in this optimizer only", only_mine)) if names]
        return "its state differs (another optimizer type?): " + "; ".join(parts)
    only_saved, only_mine = sorted(set(saved_rest) - set(template_rest)), sorted(set(template_rest) - set(saved_rest))
    if only_saved or only_mine:
        parts = [_names(label, names) for label, names in (("in the checkpoint only", only_saved), ("in this optimizer only", only_mine)) if names]
        return "its settings differ (another optimizer type, its options, or a scheduler not created yet?): " + "; ".join(parts)
    wrong = [
        f"{name}: checkpoint {list(saved_shapes[name])}, this optimizer {list(tensor.shape)}"
        for name, tensor in template.items() if tuple(tensor.shape) != saved_shapes[name]
    ]
    if wrong:
        return f"{len(wrong)} tensor(s) differ in shape (a model of another size?); first shape mismatch: {wrong[0]}"
    return None


def _fitting_template(model: torch.nn.Module, optimizer: torch.optim.Optimizer, in_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This optimizer's flattened tensors (to load into) and the saved non-tensor state, once checked to fit `in_dir`.

    Reads only the JSON state and the tensor files' headers. A mismatch raises naming the
    first difference, with `optimizer` as it was: DCP gives a fresh optimizer state to build
    the template (a step with zero gradients and learning rate), which is dropped again.
    """
    try:
        rest = jsoncodec.loads((in_dir / NON_TENSOR_STATE).read_bytes())
    except FileNotFoundError as err:
        raise CorruptCheckpointError(in_dir / NON_TENSOR_STATE, "missing: the optimizer state is incomplete") from err
    except ValueError as err:
        raise CorruptCheckpointError(in_dir / NON_TENSOR_STATE, f"not valid JSON ({err})") from err
    saved_shapes = {name: tuple(entry.size) for name, entry in HuggingFaceStorageReader(str(in_dir)).read_metadata().state_dict_metadata.items()}
    template: dict[str, torch.Tensor] = {}
    problem = _foreign_parameter(model, optimizer)
    if problem is None:
        fresh = not optimizer.state
        with _without_empty_groups(optimizer):
            template, template_rest = _split(get_optimizer_state_dict(model, optimizer, options=_OPTIONS))
        problem = _difference(model, optimizer, template, template_rest, saved_shapes, rest)
        if problem is not None and fresh:
            optimizer.state.clear()
    if problem is not None:
        raise StateMismatchError(
            f"optimizer state in {in_dir} does not fit this optimizer over {type(model).__name__}: {problem}. Build the same model and "
            "optimizer (parameters, parameter groups, optimizer type) as the run that saved it, or pass optimizer=None / set "
            "resume.load_weight_only: true to start with a fresh optimizer"
        )
    return template, rest


def check_optimizer_fits(model: torch.nn.Module, optimizer: torch.optim.Optimizer, in_dir: str | os.PathLike) -> None:
    """Raise `StateMismatchError` naming how `optimizer` over `model` differs from the state saved in `in_dir`.

    Changes nothing: run it before loading anything else, so a mismatch leaves the model and
    the optimizer as they were (`load_optimizer` checks the same again).
    """
    _fitting_template(model, optimizer, Path(in_dir))


def load_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    in_dir: str | os.PathLike,
    *,
    preloaded: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Restore optimizer state saved by `save_optimizer`, resharding to this run's layout.

    A state that does not fit `optimizer` is refused before anything is loaded (see
    `check_optimizer_fits`). `preloaded` maps file paths to their tensors already in memory
    (read once while their digest was checked); those files are not read again.
    """
    in_dir = Path(in_dir)
    template, rest = _fitting_template(model, optimizer, in_dir)
    reader = _PreloadedReader(str(in_dir), preloaded) if preloaded else HuggingFaceStorageReader(str(in_dir))
    with distributed.quiet_single_process_dcp():
        dcp.load(template, storage_reader=reader)
    with _without_empty_groups(optimizer):
        set_optimizer_state_dict(model, optimizer, {**template, **rest}, options=_OPTIONS)
