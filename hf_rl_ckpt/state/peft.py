"""PEFT adapters: a checkpoint of a `PeftModel` holds the adapter, never the frozen base.

`model/adapter/` is what `PeftModel.save_pretrained` writes for one adapter
(`adapter_config.json` with `base_model_name_or_path`, `adapter_model.safetensors`), plus
the tokenizer so the folder serves as is (`vllm serve BASE --lora-modules name=DIR`). The
weights go through our streaming writer so they are hashed while written. Loading checks
names and shapes before anything is copied, then hands the tensors to peft's own
`set_peft_model_state_dict`. Merging (for engines that want a plain model) loads the base
from a local folder or cache only: an export must never start a download.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError, CorruptCheckpointError
from ..digest import Digests
from .model import check_tensors, read_header_shapes
from .safetensors_io import write_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_peft_model(model: torch.nn.Module) -> bool:
    """True for a `peft.PeftModel`."""
    if "peft" not in sys.modules:  # no PeftModel can exist before peft is imported; importing it costs seconds
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def active_adapter(model: Any) -> str:
    """The one adapter a checkpoint holds; several adapters are refused rather than half-saved."""
    names = list(model.peft_config)
    if len(names) != 1:
        raise CheckpointError(
            f"this PeftModel holds {len(names)} adapters ({', '.join(names)}); hf_rl_ckpt checkpoints one adapter. "
            "Delete the others with model.delete_adapter(name) before training, or merge them."
        )
    return names[0]


def save_adapter(model: Any, out_dir: str | os.PathLike, *, tokenizer: Any | None = None) -> Digests:
    """Write the adapter of `model` (weights, config, tokenizer) into `out_dir`; return weight digests."""
    from peft import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = active_adapter(model)
    state = get_peft_model_state_dict(model, adapter_name=name)
    digests = {ADAPTER_WEIGHTS: write_safetensors(out_dir / ADAPTER_WEIGHTS, state, {"format": "pt"})}
    # As PeftModel.save_pretrained does, on the model's own config (a copy could list a set such as `target_modules` in
    # another order): a saved adapter names its base and is for inference.
    config = model.peft_config[name]
    base = model.get_base_model()
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(base, "name_or_path", None) or None
    # Without a task type, AutoPeftModel finds the base class through `auto_mapping` (PeftModel.save_pretrained records it then).
    auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__} if config.task_type is None else None
    training_mode, config.inference_mode = config.inference_mode, True
    try:
        config.save_pretrained(out_dir, auto_mapping_dict=auto_mapping)
    finally:
        config.inference_mode = training_mode
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return digests


def load_adapter(model: Any, folder: str | os.PathLike) -> None:
    """Load the adapter weights saved by `save_adapter` into `model` in place.

    Names and shapes are checked against the model's adapter first (a different rank or
    different target modules is named key by key), so a mismatch leaves the model untouched.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CorruptCheckpointError(folder, f"no {ADAPTER_WEIGHTS}: not an adapter folder")
    name = active_adapter(model)
    expected = {key: tuple(t.shape) for key, t in get_peft_model_state_dict(model, adapter_name=name).items()}
    problem = f"adapter weights in {folder} do not fit this PeftModel (another base model, rank or target_modules?)"
    check_tensors(expected, expected, read_header_shapes([weights]), problem)
    with torch.no_grad():
        set_peft_model_state_dict(model, load_file(weights), adapter_name=name)


def load_merged_model(adapter_dir: str | os.PathLike, *, base: str | None = None, cache_dir: str | None = None) -> Any:
    """The base model with the adapter of `adapter_dir` merged in, loaded from local files only.

    Args:
        adapter_dir: a `model/adapter` folder.
        base: a local folder or Hub id of the base model; defaults to the adapter's
            `base_model_name_or_path`.
        cache_dir: Hugging Face cache to look the base up in (the run's `model_cache_dir`).
    """
    import transformers
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    base = base or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not base:
        raise CheckpointError(
            f"{adapter_dir / ADAPTER_CONFIG} has no base_model_name_or_path (the base was built in memory); "
            "pass the base model folder explicitly (`hf-rl-ckpt export CKPT OUT --merge-lora --base DIR`)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(base, cache_dir=cache_dir, local_files_only=True)
    except OSError as err:
        raise CheckpointError(
            f"cannot load the base model {base!r} for merging from local files "
            f"({'cache ' + cache_dir if cache_dir else 'no model_cache_dir set'}): {err}. Merging never downloads; "
            "point --base at a local copy of the base model, or download it into model_cache_dir first"
        ) from err
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise CheckpointError(f"the config of base model {base!r} names no known architecture ({architectures}); cannot rebuild it to merge into")
    model = model_class.from_pretrained(base, cache_dir=cache_dir, local_files_only=True, dtype="auto")
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
