"""Optimizer state through torch.distributed.checkpoint, in safetensors, without pickle.

The optimizer state dict is flattened by parameter name (`state.<fqn>.exp_avg`), which
makes it independent of parameter order and lets DCP reshard it across world sizes. Its
tensors go to `HuggingFaceStorageWriter` (safetensors shards whose DCP metadata lives in
the safetensors headers, so no pickled `.metadata` file); the non-tensor values (lr,
betas, flags) go to JSON, because that writer would silently pickle them into a file
named `.safetensors`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from .. import distributed
from ..atomic import atomic_write_bytes
from ..errors import CorruptCheckpointError, StateMismatchError
from . import jsoncodec

NON_TENSOR_STATE = "non_tensor_state.json"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _split(flat: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in flat.items() if k not in tensors}


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, out_dir: str | os.PathLike) -> None:
    """Write the optimizer state of `model`'s parameters to `out_dir` (collective across ranks)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, rest = _split(get_optimizer_state_dict(model, optimizer, options=_OPTIONS))
    with distributed.quiet_single_process_dcp():
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(out_dir), save_distributed=distributed.is_distributed()))
    if distributed.rank() == 0:
        atomic_write_bytes(out_dir / NON_TENSOR_STATE, jsoncodec.dumps(rest, "optimizer"))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, in_dir: str | os.PathLike) -> None:
    """Restore optimizer state saved by `save_optimizer`, resharding to this run's layout."""
    in_dir = Path(in_dir)
    try:
        rest = jsoncodec.loads((in_dir / NON_TENSOR_STATE).read_bytes())
    except FileNotFoundError as err:
        raise CorruptCheckpointError(in_dir / NON_TENSOR_STATE, "missing: the optimizer state is incomplete") from err
    except ValueError as err:
        raise CorruptCheckpointError(in_dir / NON_TENSOR_STATE, f"not valid JSON ({err})") from err
    template, template_rest = _split(get_optimizer_state_dict(model, optimizer, options=_OPTIONS))
    reader = HuggingFaceStorageReader(str(in_dir))
    saved = set(reader.read_metadata().state_dict_metadata)
    missing, unexpected = sorted(set(template) - saved), sorted(saved - set(template))
    if missing or unexpected or set(template_rest) != set(rest):
        names = (missing or unexpected or sorted(set(template_rest) ^ set(rest)))[:8]
        raise StateMismatchError(
            f"optimizer state in {in_dir} does not fit this model/optimizer (different parameters or optimizer type?); "
            f"first mismatching keys: {', '.join(names)}"
        )
    with distributed.quiet_single_process_dcp():
        dcp.load(template, storage_reader=reader)
    set_optimizer_state_dict(model, optimizer, {**template, **rest}, options=_OPTIONS)
