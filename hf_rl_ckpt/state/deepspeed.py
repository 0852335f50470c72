"""DeepSpeed ZeRO: consolidated weights from partitioned parameters, and the ZeRO optimizer's partitions without pickle.

**Weights.** Under ZeRO-3 every rank holds a slice of each parameter (`param.ds_id`; the
tensor itself is empty). `gathered_state_dict` gathers the parameters on every rank in
buckets of `GATHER_BUCKET_BYTES` (`deepspeed.zero.GatheredParameters`, one coalesced
all-gather per bucket rather than one per module as DeepSpeed's own
`_zero3_consolidated_16bit_state_dict` does) and keeps CPU copies on rank 0 only, so no
rank ever holds more than a bucket of the model on its accelerator; rank 0 writes the usual
consolidated HF folder from them. `load_partitioned` is the reverse: rank 0 reads the
folder and each bucket is scattered from it (`modifier_rank=0`).

**Optimizer.** A ZeRO optimizer's state is per rank: the flat fp32 master partition(s) and
the base optimizer's state over them. DeepSpeed's own checkpoint pickles it
(`zero_pp_rank_*_optim_states.pt`, with a live `LossScaler` object inside). Here each rank
writes `optim/zero/rank_<r>.safetensors` (every tensor of its `state_dict()`, by path) and
`rank_<r>.json` (the rest of the structure, the loss scaler's numbers, the world size and
ZeRO stage), and loads them back through the optimizer's own `load_state_dict`, exactly
as `engine.load_checkpoint` does. The partitions belong to one data-parallel world size:
a resume at another one is refused with a clear error (use `resume.load_weight_only` to
start a new optimizer from the weights), rather than re-partitioned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open

from ..digest import Digests
from .. import distributed
from ..atomic import write_bytes
from ..errors import CorruptCheckpointError, StateMismatchError
from .pickled import load_pickled
from . import tensortree
from .safetensors_io import write_safetensors


ZERO_DIR = "zero"
LOSS_SCALER = "loss_scaler"  # deepspeed.checkpoint.constants.LOSS_SCALER: a live object, stored as its numbers
FP32_PARTITIONS = "single_partition_of_fp32_groups"  # ZeRO-1/2: this rank's fp32 master weights, padding removed


@dataclasses.dataclass
class ZeroPartitions:
    """Every rank's ZeRO optimizer `state_dict()` read from a DeepSpeed checkpoint (`hf-rl-ckpt convert`), written as ours."""

    states: list[dict[str, Any]]
    stage: int


class _SavedNumbers:
    """Built instead of DeepSpeed's loss scaler when its pickle is read weights-only: keeps the numbers, runs no code."""


@dataclasses.dataclass
class _FragmentAddress:
    """Built instead of DeepSpeed's `fragment_address` (ZeRO-1/2 parameter slice mappings): the same two fields."""

    numel: int = 0
    start: int = 0


def _stage_number(value: Any) -> int:
    return int(value)


#: What a DeepSpeed optimizer-states pickle holds besides tensors and plain data (see `pickled.load_pickled`).
DEEPSPEED_STAND_INS = (
    (_SavedNumbers, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_SavedNumbers, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_stage_number, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
)


def read_zero_checkpoint(tag_dir: Path, *, trust_pickle: bool) -> tuple[dict[str, torch.Tensor] | None, ZeroPartitions]:
    """A DeepSpeed checkpoint folder (`global_stepN/`): ZeRO-3's full fp32 weights (None for ZeRO-1/2) and every rank's partition.

    The weights are merged from the ranks' fp32 partitions as DeepSpeed's `zero_to_fp32.py`
    does, but every file is read with `torch.load(weights_only=True)` (behind `trust_pickle`).
    """
    def rank_of(path: Path) -> int:
        return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))

    optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of)
    if not optim_files:
        raise CorruptCheckpointError(tag_dir, "no zero_pp_rank_*_mp_rank_00_optim_states.pt: not a DeepSpeed ZeRO checkpoint folder")
    what = f"reading the DeepSpeed checkpoint {tag_dir}"
    states = [load_pickled(path, trust_pickle=trust_pickle, what=what, stand_ins=DEEPSPEED_STAND_INS)["optimizer_state_dict"] for path in optim_files]
    stage = int(states[0]["zero_stage"])
    if stage != 3:
        return None, ZeroPartitions(states, stage)
    model_states = load_pickled(optim_files[0].with_name(optim_files[0].name.replace("optim_states", "model_states")), trust_pickle=trust_pickle, what=what)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    flat = [torch.cat(list(state["fp32_flat_groups"]), 0) for state in states]
    world_size, offset, weights = len(states), 0, {}
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        per_rank = -(-numel // world_size)  # each rank holds ceil(numel / world_size), the last one padded
        weights[name] = torch.cat([part.narrow(0, offset, per_rank) for part in flat]).narrow(0, 0, numel).view(shape).clone()
        offset += per_rank
    for alias, source in (model_states.get("shared_params") or {}).items():
        weights.setdefault(alias, weights[source])
    for name in model_states.get("buffer_names") or []:
        weights[name] = model_states["module"][name]
    return weights, ZeroPartitions(states, stage)


def zero_optimizer(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO optimizer under `optimizer`'s wrappers (Accelerate's, the Trainer's), or None.

    `ZeroPartitions` (read from a DeepSpeed checkpoint by `hf-rl-ckpt convert`) count as one.
    """
    if isinstance(optimizer, ZeroPartitions):
        return optimizer
    if optimizer is None or "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    while optimizer is not None:
        if isinstance(optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def is_partitioned(module: torch.nn.Module) -> bool:
    """True when ZeRO-3 partitions the module's parameters (each rank holds a slice)."""
    return any(hasattr(param, "ds_id") for param in module.parameters())


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], *, from_rank0: bool = False) -> Iterator[None]:
    """`params` whole on every rank inside the block (every rank must enter it), then partitioned again.

    `from_rank0`: what rank 0 wrote into them inside the block is what every rank keeps.
    """
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if from_rank0 else None):
        yield


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a PEFT adapter checkpoint holds (the trainable ones), to gather around its save or load."""
    return [param for param in module.parameters() if param.requires_grad]


@contextlib.contextmanager
def whole_weights(module: torch.nn.Module, *, peft: bool) -> Iterator[dict[str, torch.Tensor] | None]:
    """Around writing a ZeRO-3 model's deployable weights; every rank must enter it.

    For a PEFT model the adapter's parameters are whole inside the block (yields None: the
    adapter is saved from the module as usual); otherwise yields the full state dict on
    rank 0 ({} on the others), to hand to `save_consolidated(..., state=...)`.
    """
    if peft:
        with gathered(trainable_parameters(module)):
            yield None
    else:
        yield gathered_state_dict(module)


#: Bytes of parameters gathered per collective: enough to spread an all-gather's latency over many small
#: tensors, small enough that no rank ever holds more than this (or the largest tensor) of the whole model.
GATHER_BUCKET_BYTES = 256 * 2**20


def _parameter_buckets(module: torch.nn.Module, limit: int = GATHER_BUCKET_BYTES) -> Iterator[list[torch.nn.Parameter]]:
    """The module's parameters (tied ones once), in order, in buckets of about `limit` bytes gathered together."""
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for param in module.parameters():
        nbytes = getattr(param, "ds_numel", param.numel()) * param.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(param)
        size += nbytes
    if bucket:
        yield bucket


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (CPU copies; tied weights share one tensor), {} on the others; every rank must call it."""
    rank0 = distributed.rank() == 0
    full: dict[int, torch.Tensor] = {}
    for params in _parameter_buckets(module):
        with gathered(params):
            if rank0:
                for param in params:
                    full.setdefault(id(param), param.detach().to("cpu", copy=True))
    if not rank0:
        return {}
    state = module.state_dict(keep_vars=True)
    return {name: full[id(value)] if id(value) in full else value.detach().to("cpu", copy=True) for name, value in state.items()}


def load_partitioned(module: torch.nn.Module, read: Mapping[str, torch.Tensor], where: Path) -> None:
    """Scatter rank 0's `read` (a consolidated state dict, tied weights stored once) into ZeRO-3 partitioned parameters.

    Raises:
        StateMismatchError: a parameter is missing from `read` or has another shape (on rank 0, before anything changed).
    """
    rank0 = distributed.rank() == 0
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)

    def source(param: torch.nn.Parameter) -> torch.Tensor:
        for name in names[id(param)]:
            if name in read:
                return read[name]
        raise StateMismatchError(f"checkpoint weights in {where} do not fit {type(module).__name__}: no tensor for {names[id(param)][0]}")

    def check() -> None:
        for param in module.parameters():
            tensor = source(param)
            if tuple(tensor.shape) != tuple(param.ds_shape):
                raise StateMismatchError(
                    f"checkpoint weights in {where} do not fit {type(module).__name__} (another architecture or config?): "
                    f"{names[id(param)][0]} is {tuple(tensor.shape)} in the checkpoint, {tuple(param.ds_shape)} in the model"
                )

    distributed.on_rank0(check)
    for params in _parameter_buckets(module):
        with gathered(params, from_rank0=True):
            if rank0:
                with torch.no_grad():
                    for param in params:
                        param.copy_(source(param))
    buffers = dict(module.named_buffers())
    # Persistent buffers are not partitioned, and only rank 0 read the folder: its values go to every rank.
    saved_buffers = distributed.broadcast_object({name: tensor for name, tensor in read.items() if name in buffers})
    with torch.no_grad():
        for name, tensor in saved_buffers.items():
            buffers[name].copy_(tensor)


# ---------------------------------------------------------------- optimizer partitions
def _plain(value: Any) -> Any:
    """The ZeRO state's enums and dataclasses (e.g. `ZeroStageEnum`, fragment addresses) as the values they hold."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _loss_scaler_numbers(scaler: Any) -> dict[str, Any]:
    return {name: value for name, value in vars(scaler).items() if value is None or isinstance(value, (int, float, bool, str))}


def zero_files(rank: int) -> tuple[str, str]:
    """The files of rank `rank` under the checkpoint's `optim/` folder."""
    return f"{ZERO_DIR}/rank_{rank}.safetensors", f"{ZERO_DIR}/rank_{rank}.json"


def write_zero_optimizer(optimizer: Any, out_dir: Path, rank: int, world_size: int) -> Digests:
    """This rank's ZeRO optimizer partition as safetensors + JSON under `out_dir` (the checkpoint's `optim/`).

    For `ZeroPartitions` (a conversion, in one process), every rank's partition.
    """
    if isinstance(optimizer, ZeroPartitions):
        digests: Digests = {}
        for index, state in enumerate(optimizer.states):
            digests.update(_write_partition(state, optimizer.stage, out_dir, index, len(optimizer.states)))
        return digests
    return _write_partition(optimizer.state_dict(), _stage_of(optimizer), out_dir, rank, world_size)


def _write_partition(state: Mapping[str, Any], stage: int, out_dir: Path, rank: int, world_size: int) -> Digests:
    state = dict(state)
    scaler = state.pop(LOSS_SCALER, None)
    structure, tensors = tensortree.split(
        state, "state", adapt=_plain, unsupported_hint="please report it with your DeepSpeed version",
    )
    document = {
        "format": "hf_rl_ckpt.deepspeed_zero", "version": 1, "world_size": world_size, "rank": rank, "zero_stage": stage,
        "loss_scaler": _loss_scaler_numbers(scaler) if scaler is not None else None, "state": structure,
    }
    tensor_file, json_file = zero_files(rank)
    (out_dir / ZERO_DIR).mkdir(parents=True, exist_ok=True)
    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    return {
        tensor_file: write_safetensors(out_dir / tensor_file, contiguous, {}),
        json_file: write_bytes(out_dir / json_file, json.dumps(document).encode()),
    }


def _stage_of(optimizer: Any) -> int:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return 3 if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) else int(optimizer.partition_gradients) + 1


def check_zero_fits(optimizer: Any, in_dir: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's saved partition document, after checking it fits `optimizer` (before anything is loaded).

    Raises:
        StateMismatchError: the checkpoint was saved by another number of ranks, or another ZeRO stage.
    """
    _, json_file = zero_files(rank)
    if not (in_dir / json_file).is_file():
        saved = sorted(in_dir.glob(f"{ZERO_DIR}/rank_*.json"))
        raise StateMismatchError(
            f"{in_dir} holds DeepSpeed ZeRO optimizer partitions of {len(saved)} rank(s), none for rank {rank} of this "
            f"{world_size}-rank job; resume with the world size that saved it, or set resume.load_weight_only: true "
            "to start a fresh optimizer from its weights"
        )
    document = json.loads((in_dir / json_file).read_text())
    stage = _stage_of(optimizer)
    if document["world_size"] != world_size or document["zero_stage"] != stage:
        raise StateMismatchError(
            f"{in_dir / json_file} is a ZeRO-{document['zero_stage']} partition of a {document['world_size']}-rank job; this job "
            f"runs ZeRO-{stage} on {world_size} rank(s). Resume with the settings that saved it, or set resume.load_weight_only: "
            "true to start a fresh optimizer from its weights"
        )
    return document


def load_zero_optimizer(optimizer: Any, in_dir: Path, rank: int, world_size: int) -> None:
    """Load this rank's partition from `in_dir` (a checkpoint's `optim/`) through the optimizer's own `load_state_dict`."""
    document = check_zero_fits(optimizer, in_dir, rank, world_size)
    stage = document["zero_stage"]
    tensor_file, _ = zero_files(rank)
    with safe_open(os.fspath(in_dir / tensor_file), framework="pt") as reader:
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    state = tensortree.join(document["state"], tensors)
    if document["loss_scaler"] is not None:
        for name, value in document["loss_scaler"].items():
            setattr(optimizer.loss_scaler, name, value)
    state[LOSS_SCALER] = optimizer.loss_scaler
    per_rank: list[Any] = [None] * world_size
    per_rank[rank] = state
    if stage == 3:
        optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
        return
    # ZeRO-1/2 rebuild the fp32 masters from every rank's partition (load_from_fp32_weights) or from the model's weights;
    # the world size is the same, so this rank's own saved partition is exactly its master weights.
    optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=False)
    with torch.no_grad():
        for master, saved in zip(optimizer.single_partition_of_fp32_groups, state[FP32_PARTITIONS]):
            master[: saved.numel()].copy_(saved)
