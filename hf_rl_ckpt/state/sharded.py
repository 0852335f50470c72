"""Models with sharded parameters (FSDP2 DTensors): per-rank shards through DCP plus a consolidated HF folder.

Saving: every rank writes its own slice of each parameter with torch.distributed.checkpoint's
`HuggingFaceStorageWriter(save_distributed=True)` into `model/sharded/`. Those are plain
safetensors files whose headers record where each slice sits in the full tensor, so no rank
ever materialises the full model and nothing is pickled (DCP's default `.metadata` file is).
The deployable `model/consolidated/` folder is then assembled from the shards on disk by DCP's
`consolidate_safetensors_files`, which copies one tensor at a time: peak extra memory is one
full tensor, not the model (on node-local disks, where rank 0 cannot read the other ranks'
shards, the full tensors are gathered to rank 0 instead). It runs on rank 0 only and outside any collective, so a failure
there reaches the other ranks through the manager's collective error check instead of leaving
them blocked in a collective that rank 0 never joins.

Loading: `HuggingFaceStorageReader` reads slice offsets from whatever safetensors files a
folder holds (shards written at any world size, or an ordinary HF folder), and DCP plans which
bytes each rank needs for its own sharding. That is what lets a checkpoint saved at world size
2 load at 1 or 4, into a sharded or a plain model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from huggingface_hub import split_torch_state_dict_into_shards
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from .. import distributed
from ..errors import CheckpointSaveError, CorruptCheckpointError
from ..shims import consolidate_safetensors_files
from .model import SAFE_INDEX, SAFE_WEIGHTS, cast_to, check_compatible, deduplicated_state_dict, save_consolidated, save_hf_metadata
from .safetensors_io import write_safetensors


def is_sharded(model: torch.nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2 `fully_shard`, tensor parallel)."""
    return any(isinstance(param, DTensor) for param in model.parameters())


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as DCP addresses it (DTensors stay sharded), tied copies dropped as `save_pretrained` does."""
    return deduplicated_state_dict(model, get_model_state_dict(model))


def consolidated_file_plan(state: dict[str, torch.Tensor], max_shard_size: int, dtype: torch.dtype | None = None) -> tuple[dict[str, int], bool]:
    """Which consolidated file (1-based index) each tensor goes to, split as `save_pretrained` splits at `max_shard_size`.

    Sizes come from the global shapes (and `dtype`, the one floating-point weights are written
    in, if not their own), so the plan is the same on every rank and needs no data.
    Returns the mapping and whether more than one file results.
    """
    shapes = {
        name: torch.empty(tensor.shape, dtype=dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype, device="meta")
        for name, tensor in state.items()
    }
    split = split_torch_state_dict_into_shards(shapes, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors")
    index = {filename: i for i, filename in enumerate(sorted(split.filename_to_tensors), start=1)}
    return {name: index[filename] for name, filename in split.tensor_to_filename.items()}, split.is_sharded


def save_sharded(
    model: torch.nn.Module, sharded_dir: Path, consolidated_dir: Path | None, *, max_shard_size: int, tokenizer: Any | None = None,
    shards_visible: bool = True, dtype: torch.dtype | None = None,
) -> None:
    """Write `model`'s shards into `sharded_dir` (collective: every rank calls it) and, unless
    `consolidated_dir` is None, the HF folder assembled from them (on rank 0).

    `shards_visible=False` (node-local disks: rank 0 cannot read the other ranks' shards):
    the consolidated folder is written from the full tensors gathered to rank 0 instead
    (a collective; peak memory on rank 0 is the model). `dtype`: the consolidated folder's
    floating-point weights are written in it (the shards stay as trained). Files are hashed
    afterwards by the manifest builder; nothing is returned.
    """
    state = hf_state_dict(model)
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(os.fspath(sharded_dir), save_distributed=True))
    if consolidated_dir is None:
        return
    if not shards_visible:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0 only keeps it
        if distributed.rank() == 0:
            save_consolidated(model, consolidated_dir, max_shard_size=max_shard_size, tokenizer=tokenizer, state=full, dtype=dtype)
        return
    if distributed.rank() != 0:
        return
    consolidated_dir.mkdir(parents=True, exist_ok=True)
    plan, multi_file = consolidated_file_plan(state, max_shard_size, dtype)
    consolidate_safetensors_files(os.fspath(sharded_dir), os.fspath(consolidated_dir), fqn_to_index_mapping=plan)
    if not multi_file:
        # DCP names even a single file `model-00001-of-00001.safetensors` with an index; use
        # `save_pretrained`'s single-file name so every checkpoint's folder looks the same.
        os.replace(consolidated_dir / "model-00001-of-00001.safetensors", consolidated_dir / SAFE_WEIGHTS)
        (consolidated_dir / SAFE_INDEX).unlink()
    if dtype is not None:
        _cast_files(consolidated_dir, dtype)
    _check_whole(consolidated_dir, {name: tuple(tensor.shape) for name, tensor in state.items()})
    save_hf_metadata(model, consolidated_dir, tokenizer, dtype=dtype)


def _cast_files(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite the safetensors files of `folder` with floating-point tensors in `dtype`, one file at a time; fix the index's total size."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(os.fspath(path), framework="pt") as reader:
            tensors = {name: cast_to(reader.get_tensor(name), dtype) for name in reader.keys()}
        staging = path.with_name(f".{path.name}.cast")
        write_safetensors(staging, tensors, {"format": "pt"})
        os.replace(staging, path)
        total += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    index = folder / SAFE_INDEX
    if index.is_file():
        document = json.loads(index.read_text())
        document.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def _check_whole(consolidated_dir: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a consolidated folder whose tensors are not the model's full shapes (shards of some rank were not on this disk)."""
    written: dict[str, tuple[int, ...]] = {}
    for path in consolidated_dir.glob("*.safetensors"):
        with safe_open(os.fspath(path), framework="pt") as handle:
            written.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    wrong = [f"{name} {written.get(name)} (full: {shape})" for name, shape in shapes.items() if written.get(name) != shape]
    if wrong:
        raise CheckpointSaveError(
            f"consolidating {consolidated_dir} from the shards found {len(wrong)} tensor(s) incomplete, e.g. {', '.join(wrong[:3])}: "
            "rank 0 does not see every rank's shards; put checkpoint_dir on a shared filesystem or set remote_dir"
        )


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
    check_compatible(model, saved, folder)
    state = hf_state_dict(model)
    with distributed.quiet_single_process_dcp():  # a plain model in a single process loading shards is intended
        dcp.load(state, storage_reader=reader)
    # Tied targets are not in the checkpoint (transformers re-ties them), hence strict=False;
    # check_compatible has already refused a checkpoint that lacks any required tensor.
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
