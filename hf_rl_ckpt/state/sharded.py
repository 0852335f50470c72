"""Models with sharded parameters (FSDP2 DTensors): per-rank shards through DCP; loading them at any world size.

Saving: every rank writes its own slice of each parameter with torch.distributed.checkpoint's
`HuggingFaceStorageWriter(save_distributed=True)` into `model/sharded/`. Those are plain
safetensors files whose headers record where each slice sits in the full tensor, so no rank
ever materialises the full model and nothing is pickled (DCP's default `.metadata` file is).
The deployable `model/consolidated/` folder is then assembled from the shards on disk by every
rank, each writing its share of the files (`state.consolidate`); on node-local disks, where
no rank sees the others' shards, the full tensors are gathered to rank 0 instead (`save_gathered`).

Loading: `HuggingFaceStorageReader` reads slice offsets from whatever safetensors files a
folder holds (shards written at any world size, or an ordinary HF folder), and DCP plans which
bytes each rank needs for its own sharding. That is what lets a checkpoint saved at world size
2 load at 1 or 4, into a sharded or a plain model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from .. import distributed
from ..digest import Digests
from ..errors import CorruptCheckpointError
from ..shims import WeightConversion
from .model import check_compatible, deduplicated_state_dict, read_header_shapes, runtime_groups, save_consolidated, weight_files


def is_sharded(model: torch.nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2 `fully_shard`, tensor parallel)."""
    return any(isinstance(param, DTensor) for param in model.parameters())


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as DCP addresses it (DTensors stay sharded), tied copies dropped as `save_pretrained` does."""
    return deduplicated_state_dict(model, get_model_state_dict(model))


def save_shards(state: dict[str, torch.Tensor], sharded_dir: Path) -> None:
    """Write every rank's slices of `state` (`hf_state_dict`) into `sharded_dir` (collective: every rank calls it).

    DCP's finish step gathers every rank's write results before any rank returns, so once
    this returns on a rank, every rank's shard files are complete on disk.
    """
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(os.fspath(sharded_dir), save_distributed=True))


def gathered_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full tensors of a sharded model in host memory on rank 0 ({} on the others); collective, every rank calls it.

    Peak memory on rank 0 is the model.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0 only keeps it
    return full if distributed.rank() == 0 else {}


def save_gathered(
    model: torch.nn.Module, consolidated_dir: Path, *, max_shard_size: int, tokenizer: Any | None = None, dtype: torch.dtype | None = None,
) -> Digests:
    """The consolidated folder from the full tensors gathered to rank 0 (collective; its digests on rank 0, {} elsewhere).

    For node-local disks, where no rank can read the other ranks' shards to consolidate them
    (`state.consolidate`), and for a model whose weight conversion the parallel consolidation cannot plan.
    """
    full = gathered_state(model)
    if distributed.rank() != 0:
        return {}
    return save_consolidated(model, consolidated_dir, max_shard_size=max_shard_size, tokenizer=tokenizer, state=full, dtype=dtype)


def load_sharded(model: torch.nn.Module, folder: Path) -> None:
    """Load weights from `folder` (DCP shards of any world size, or an HF folder) into `model`, resharding as needed.

    Collective when a process group is up. Names and global shapes are checked against the
    model before any tensor is read, so a mismatch leaves the model untouched.
    """
    reader = HuggingFaceStorageReader(os.fspath(folder))
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # safetensors raises its own error type for a malformed header
        raise CorruptCheckpointError(folder, f"not a readable safetensors folder ({err})") from err
    saved = {name: (tuple(meta.size), folder) for name, meta in metadata.state_dict_metadata.items()}
    conversion = check_compatible(model, saved, folder)
    if not conversion.identity:
        _load_saved_form(model, folder, conversion)
        return
    state = hf_state_dict(model)
    with distributed.quiet_single_process_dcp():  # a plain model in a single process loading shards is intended
        dcp.load(state, storage_reader=reader)
    # Tied targets are not in the checkpoint (transformers re-ties them), hence strict=False;
    # check_compatible has already refused a checkpoint that lacks any required tensor.
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


def _load_saved_form(model: torch.nn.Module, folder: Path, conversion: WeightConversion) -> None:
    """An HF folder under `save_pretrained`'s names (an MoE's experts one by one) into a sharded model: rank 0 reads it and
    converts it to the runtime form, every rank takes its slices (collective; peak memory on rank 0 is the model).

    DCP cannot plan this read: a fused runtime tensor has no counterpart in the folder.
    """
    state: dict[str, torch.Tensor] = {}
    if distributed.rank() == 0:
        saved = read_header_shapes(weight_files(folder))
        for group in runtime_groups(conversion, saved):
            state.update(group)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed.is_distributed(), strict=False)
    set_model_state_dict(model, state, options=options)
