"""Model weights as a consolidated, HF-format folder that transformers and vLLM load directly.

The folder is what `save_pretrained(safe_serialization=True)` would produce: config.json
(with `architectures`), generation_config.json, tokenizer files, `model.safetensors` or
shards + `model.safetensors.index.json` above `max_shard_size`, tied weights stored once,
dtype kept. The weights go through our streaming writer so they are hashed while written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CorruptCheckpointError, StateMismatchError
from ..layout import safe_join
from .safetensors_io import write_safetensors

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
FileDigests = dict[str, tuple[int, str]]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP/DataParallel/compile/Accelerate wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def tied_weight_targets(model: torch.nn.Module) -> set[str]:
    """Keys that transformers re-creates by tying (e.g. `lm_head.weight`), so they are not saved."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, Mapping) else set(tied)


def deduplicated_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every shared tensor kept once, under its source name.

    Tied embeddings share storage; like `save_pretrained`, keep the source key and drop the
    tied target, so transformers re-ties them on load.
    """
    state = model.state_dict()
    targets = tied_weight_targets(model)
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(_storage_key(tensor), []).append(name)
    keep: set[str] = set()
    for names in groups.values():
        sources = [n for n in names if n not in targets] or names
        keep.add(sources[0])
    return {name: tensor for name, tensor in state.items() if name in keep}


def save_hf_metadata(model: torch.nn.Module, out_dir: Path, tokenizer: Any | None) -> None:
    """config.json, generation_config.json and tokenizer files, as `save_pretrained` writes them."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        if not getattr(config, "architectures", None):
            config.architectures = [type(model).__name__]
        config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if generation_config is not None and can_generate:
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def save_weights(state: Mapping[str, torch.Tensor], out_dir: Path, max_shard_size: int) -> FileDigests:
    """Write `state` as `model.safetensors` or HF-named shards + index; return digests by file name."""
    split = split_torch_state_dict_into_shards(
        dict(state), max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors"
    )
    digests: FileDigests = {}
    for filename, names in split.filename_to_tensors.items():
        digests[filename] = write_safetensors(out_dir / filename, {n: state[n] for n in names}, {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return digests


def save_consolidated(
    model: torch.nn.Module, out_dir: str | os.PathLike, *, max_shard_size: int, tokenizer: Any | None = None
) -> FileDigests:
    """Write the HF-format folder of `model` (weights, config, generation config, tokenizer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = unwrap_model(model)
    digests = save_weights(deduplicated_state_dict(inner), out_dir, max_shard_size)
    save_hf_metadata(inner, out_dir, tokenizer)
    return digests


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF folder, from the index when sharded."""
    folder = Path(folder)
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CorruptCheckpointError(index, f"not a valid safetensors index ({err})") from err
        return [safe_join(folder, name) for name in sorted(set(weight_map.values()))]
    single = folder / SAFE_WEIGHTS
    if not single.is_file():
        raise CorruptCheckpointError(folder, f"no {SAFE_WEIGHTS} or {SAFE_INDEX}: not a consolidated model folder")
    return [single]


def read_header_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Tensor name -> (shape, file) from safetensors headers, without reading the data."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = (tuple(fh.get_slice(key).get_shape()), path)
        except Exception as err:  # safetensors raises its own SafetensorError for malformed headers
            raise CorruptCheckpointError(path, f"not a readable safetensors file ({err})") from err
    return shapes


def check_compatible(model: torch.nn.Module, saved: Mapping[str, tuple[tuple[int, ...], Path]], where: Path) -> None:
    """Raise naming the mismatching keys when the checkpoint's tensors do not fit `model`."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    loadable = deduplicated_state_dict(model)
    missing = [n for n in loadable if n not in saved]
    unexpected = [n for n in saved if n not in expected]
    wrong_shape = [
        f"{n} (checkpoint {list(saved[n][0])}, model {list(expected[n])})" for n in saved if n in expected and saved[n][0] != expected[n]
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, names in (("missing in checkpoint", missing), ("not in model", unexpected), ("shape mismatch", wrong_shape)):
            if names:
                parts.append(f"{label}: {', '.join(names[:8])}" + (f" (+{len(names) - 8} more)" if len(names) > 8 else ""))
        raise StateMismatchError(
            f"checkpoint weights in {where} do not fit {type(model).__name__} (another architecture or config?): " + "; ".join(parts)
        )


def load_consolidated(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load the weights of an HF-format folder into `model` in place (memory-mapped reads).

    Everything is checked against the model before any tensor is copied, so a mismatch
    leaves the model untouched.
    """
    inner = unwrap_model(model)
    files = weight_files(folder)
    check_compatible(inner, read_header_shapes(files), Path(folder))
    with torch.no_grad():
        for path in files:
            inner.load_state_dict(load_file(path), strict=False)
