"""Model weights as a consolidated, HF-format folder that transformers and vLLM load directly.

The folder is what `save_pretrained` writes, file for file: config.json (with
`architectures` and `dtype`), generation_config.json, a `trust_remote_code` model's code
files, tokenizer files, `model.safetensors` or shards + `model.safetensors.index.json` above
`max_shard_size`, tied weights stored once, and every tensor under the name and shape of the
model's original checkpoints (`saved_state`: transformers 5 fuses an MoE layer's experts and
renames a VLM's submodels at load time; `save_pretrained` reverts that, and so do we). The
weights go through our streaming writer so they are hashed while written. Loading applies the
conversion forward into the live parameters (`load_consolidated`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import torch
from huggingface_hub import StateDictSplit, get_torch_storage_id, get_torch_storage_size, split_state_dict_into_shards_factory
from huggingface_hub.utils import tqdm
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from ..digest import Digests
from ..errors import CorruptCheckpointError, StateMismatchError
from ..layout import safe_join
from ..shims import WeightConversion, save_custom_code, weight_conversion
from .pickled import load_pickled_tensors, write_torch_bin
from .safetensors_io import check_safetensors_header, write_safetensors

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WeightsFormat = Literal["safetensors", "torch_save"]
#: weights format -> (single-file name, shard index name), in the order readers look for them.
_WEIGHT_FILES: dict[str, tuple[str, str]] = {"safetensors": (SAFE_WEIGHTS, SAFE_INDEX), "torch_save": (BIN_WEIGHTS, BIN_INDEX)}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP/DataParallel/DeepSpeed/FSDP, Accelerate and `torch.compile` wrappers.

    Compile wrappers go too: their state dict prefixes every key with `_orig_mod.` and their
    class is no loadable architecture. A model compiled before `accelerator.prepare` under
    DDP sits compiled inside the parallel wrapper, so unwrapping repeats until nothing is left.
    """
    from accelerate.utils import extract_model_from_parallel

    while (inner := extract_model_from_parallel(model, keep_torch_compile=False)) is not model:
        model = inner
    return model


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    if isinstance(tensor, DTensor):  # a sharded parameter: tied copies share the same local shard
        tensor = tensor.to_local()
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def tied_weight_targets(model: torch.nn.Module) -> set[str]:
    """Keys that transformers re-creates by tying (e.g. `lm_head.weight`), so they are not saved."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, Mapping) else set(tied)


def deduplicated_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`state` (default `model.state_dict()`) with every shared tensor kept once, under its source name.

    Tied embeddings share storage; like `save_pretrained`, keep the source key and drop the
    tied target, so transformers re-ties them on load. Which names are one tensor is read
    from the model itself (one parameter under several names), so a state gathered from a
    sharded model, whose copies no longer share storage, loses its tied copies too.
    """
    state = model.state_dict() if state is None else state
    live = model.state_dict(keep_vars=True)
    targets = tied_weight_targets(model)
    groups: dict[Any, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(live[name]) if name in live else _storage_key(tensor), []).append(name)
    keep: set[str] = set()
    for names in groups.values():
        sources = [n for n in names if n not in targets] or names
        keep.add(sources[0])
    return {name: tensor for name, tensor in state.items() if name in keep}


def saved_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`state` (default `model.state_dict()`) as `save_pretrained` writes it: the names, shapes and tensors of the deployable folder.

    The same steps in the same order: keys the model ignores on save dropped, tied copies
    kept once, transformers' weight conversion reverted (`shims.weight_conversion`). The
    tensors are the live ones where the conversion only renames or splits along the first
    dimension, new ones where it must copy (an MoE `gate_up_proj` chunked into `gate_proj` and
    `up_proj`).
    """
    state = model.state_dict() if state is None else state
    return weight_conversion(model).to_saved(deduplicated_state_dict(model, without_ignored_keys(model, state)))


def without_ignored_keys(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` less the keys the model's class says `save_pretrained` leaves out (`_keys_to_ignore_on_save`)."""
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    return {name: tensor for name, tensor in state.items() if name not in ignored}


def meta_state(state: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Shapes and dtypes of `state` (global shapes for DTensors) without data; `dtype`: floating-point tensors as cast to it."""
    return {
        name: torch.empty(tuple(tensor.shape), dtype=dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype, device="meta")
        for name, tensor in state.items()
    }


def total_parameters(model: torch.nn.Module) -> int:
    """`PreTrainedModel.num_parameters()` as `save_pretrained` records it in the index, also for partitioned (ZeRO-3) and sharded models."""
    return sum(getattr(param, "ds_numel", param.numel()) for param in model.parameters())


def weights_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype `model`'s weights are written in: its first floating-point parameter's (`PreTrainedModel.dtype`)."""
    return next((param.dtype for param in model.parameters() if param.is_floating_point()), None)


def save_hf_metadata(model: torch.nn.Module, out_dir: Path, tokenizer: Any | None, *, dtype: torch.dtype | None = None) -> None:
    """config.json, generation_config.json and tokenizer files, as `save_pretrained` writes them.

    Like `save_pretrained`, config.json names the model's class as its architecture (FSDP2
    renames the class `FSDP<name>`) and the dtype the weights are written in, whatever the
    config said when the model was built: `from_pretrained` loads a model cast with
    `.to(torch.bfloat16)` in bf16 by that (`dtype`, when the weights are written cast to
    another one, see `cast_to`). The model's own config is left as it is.
    """
    save_custom_code(model, out_dir)  # before config.json: it records the code files in the config's auto_map
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__.removeprefix("FSDP")]
        dtype = dtype or weights_dtype(model)
        if dtype is not None:
            config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if generation_config is not None and can_generate:
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def cast_to(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` when it is floating point (bf16 weights from fp32 masters); integer buffers and `None` leave it as is."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def split_weights(state: Mapping[str, torch.Tensor], max_shard_size: int, filename_pattern: str, dtype: torch.dtype | None = None) -> StateDictSplit:
    """The files `save_pretrained` splits `state` into: in order, at `max_shard_size`, by the bytes as written (`dtype`: cast).

    Like `save_pretrained` (huggingface_hub's splitter), tensors that share storage go in
    the file of the first of them and count once, at their storage's size: an MoE layer's
    experts, unbound from one fused tensor, stay together. Meta tensors (planning without
    data) share storage as the tensors they stand for would.
    """

    def storage_id(tensor: torch.Tensor) -> Any:
        return id(tensor.untyped_storage()) if tensor.device.type == "meta" else get_torch_storage_id(tensor)

    def storage_size(tensor: torch.Tensor) -> int:
        written = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return get_torch_storage_size(tensor) // tensor.element_size() * written.itemsize

    return split_state_dict_into_shards_factory(
        dict(state), get_storage_size=storage_size, get_storage_id=storage_id, filename_pattern=filename_pattern, max_shard_size=max_shard_size,
    )


def save_weights(
    state: Mapping[str, torch.Tensor], out_dir: Path, max_shard_size: int, weights_format: WeightsFormat = "safetensors",
    dtype: torch.dtype | None = None, *, parameters: int | None = None,
) -> Digests:
    """Write `state` as one weights file or HF-named shards + index; return digests by file name.

    `parameters`: the model's parameter count, recorded in the index as `save_pretrained` does (`total_parameters`).

    `weights_format="torch_save"` writes the legacy `pytorch_model.bin` (a `torch.save` of the
    tensors alone, so `torch.load(weights_only=True)` reads it) for tools that need it.
    `dtype`: floating-point tensors are written cast to it, one file at a time (`cast_to`).
    """
    single, index_name = _WEIGHT_FILES[weights_format]
    split = split_weights(state, max_shard_size, single.replace(".", "{suffix}.", 1), dtype)
    digests: Digests = {}
    # Above max_shard_size a model takes minutes to write: show progress by file (one file needs no bar).
    files = tqdm(split.filename_to_tensors.items(), desc=f"Writing weights to {out_dir}", unit="file", disable=not split.is_sharded, name="hf_rl_ckpt")
    for filename, names in files:
        part = {n: cast_to(state[n], dtype) for n in names}
        if weights_format == "torch_save":
            digests[filename] = write_torch_bin(out_dir / filename, part)
        else:
            digests[filename] = write_safetensors(out_dir / filename, part, {"format": "pt"})
    if split.is_sharded:
        metadata = dict(split.metadata) if parameters is None else {"total_parameters": parameters, **split.metadata}
        index = {"metadata": metadata, "weight_map": dict(split.tensor_to_filename)}
        (out_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return digests


def save_consolidated(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int,
    tokenizer: Any | None = None,
    weights_format: WeightsFormat = "safetensors",
    state: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Digests:
    """Write the HF-format folder of `model` (weights, config, generation config, tokenizer).

    `state`: the weights to write when the model's own are partitioned or sharded (gathered by the caller), by runtime name.
    `dtype`: write the floating-point weights in this dtype (`consolidated_dtype`), recorded in config.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = unwrap_model(model)
    digests = save_weights(saved_state(inner, state), out_dir, max_shard_size, weights_format, dtype, parameters=total_parameters(inner))
    save_hf_metadata(inner, out_dir, tokenizer, dtype=dtype)
    return digests


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of an HF folder (safetensors preferred, else `pytorch_model*.bin`), from the index when sharded."""
    folder = Path(folder)
    for single, index_name in _WEIGHT_FILES.values():
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CorruptCheckpointError(index, f"not a valid weights index ({err})") from err
            return [safe_join(folder, name) for name in names]
        if (folder / single).is_file():
            return [folder / single]
    raise CorruptCheckpointError(folder, f"no {SAFE_WEIGHTS}, {BIN_WEIGHTS} or their index: not a consolidated model folder")


def read_weights(path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one weights file: safetensors after a header check, a `.bin` only through the pickle gate."""
    if path.suffix == ".safetensors":
        check_safetensors_header(path)
        return load_file(path)
    return load_pickled_tensors(path, trust_pickle=trust_pickle)


def read_header_shapes(files: list[Path], *, trust_pickle: bool = False) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Tensor name -> (shape, file), from validated safetensors headers without reading the data."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        if path.suffix == ".safetensors":
            for key, entry in check_safetensors_header(path).items():
                shapes[key] = (tuple(entry["shape"]), path)
        else:
            for key, tensor in read_weights(path, trust_pickle=trust_pickle).items():
                shapes[key] = (tuple(tensor.shape), path)
    return shapes


def check_compatible(model: torch.nn.Module, saved: Mapping[str, tuple[tuple[int, ...], Path]], where: Path) -> WeightConversion:
    """How the tensors of a folder load into `model`; raise naming the mismatching keys when they do not fit.

    A folder holds the names `save_pretrained` writes (ours and transformers' own), loaded
    through the model's weight conversion; one written before hf_rl_ckpt reverted conversions
    holds the runtime names, loaded as they are. Only names and shapes are compared.
    """
    live = model.state_dict()
    conversion = weight_conversion(model)
    forms = [conversion] if conversion.identity else [conversion, WeightConversion(model, (), {})]
    problem = f"checkpoint weights in {where} do not fit {type(model).__name__} (another architecture or config?)"
    mismatches = []
    for form in forms:
        expected = {name: tuple(t.shape) for name, t in form.to_saved(meta_state(live)).items()}
        required = form.to_saved(meta_state(deduplicated_state_dict(model, live)))
        try:
            check_tensors(expected, required, saved, problem)
            return form
        except StateMismatchError as err:
            mismatches.append(err)
    raise mismatches[0]  # the complaint about the saved form, the one a folder is expected to hold


def check_tensors(
    expected: Mapping[str, tuple[int, ...]], required: Iterable[str], saved: Mapping[str, tuple[tuple[int, ...], Path]], problem: str
) -> None:
    """Raise `StateMismatchError(problem: ...)` listing missing, unexpected and wrongly shaped tensors.

    `expected` holds every name the target accepts with its shape, `required` the names the
    checkpoint must provide (tied copies are accepted but not required).
    """
    missing = [n for n in required if n not in saved]
    unexpected = [n for n in saved if n not in expected]
    wrong_shape = [
        f"{n} (checkpoint {list(saved[n][0])}, model {list(expected[n])})" for n in saved if n in expected and saved[n][0] != expected[n]
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, names in (("missing in checkpoint", missing), ("not in model", unexpected), ("shape mismatch", wrong_shape)):
            if names:
                parts.append(f"{label}: {', '.join(names[:8])}" + (f" (+{len(names) - 8} more)" if len(names) > 8 else ""))
        raise StateMismatchError(f"{problem}: " + "; ".join(parts))


def load_consolidated(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    preloaded: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Load the weights of an HF-format folder into `model`'s parameters in place (memory-mapped reads).

    Everything is checked against the model before any tensor is copied, so a mismatch
    leaves the model untouched. Tensors are read and converted to the model's runtime form
    one group at a time (an MoE layer's experts together). A legacy `pytorch_model.bin` folder
    is read only with `trust_pickle` (see `hf_rl_ckpt.state.pickled`). `preloaded` maps file
    paths to their tensors already in memory (read once while their digest was checked): not read again.
    """
    inner = unwrap_model(model)
    saved = read_header_shapes(weight_files(folder), trust_pickle=trust_pickle)
    conversion = check_compatible(inner, saved, Path(folder))
    live = inner.state_dict()
    with torch.no_grad():
        for group in runtime_groups(conversion, saved, trust_pickle=trust_pickle, preloaded=preloaded):
            for name, value in group.items():
                live[name].copy_(value)


def runtime_groups(
    conversion: WeightConversion, saved: Mapping[str, tuple[tuple[int, ...], Path]], *, trust_pickle: bool = False,
    preloaded: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors of a folder (`saved`: name -> (shape, file), see `read_header_shapes`) in the model's runtime form,
    one group at a time (an MoE layer's experts together, converted into its fused tensor)."""
    with _SavedTensors(saved, preloaded or {}, trust_pickle) as tensors:
        for group in conversion.saved_groups(list(saved)):
            yield conversion.to_runtime({name: tensors[name] for name in group})


class _SavedTensors:
    """The tensors of a folder by name, each read when asked for: memory-mapped safetensors, in-memory tensors, or a trusted `.bin`."""

    def __init__(self, saved: Mapping[str, tuple[tuple[int, ...], Path]], preloaded: Mapping[str, Mapping[str, torch.Tensor]], trust_pickle: bool) -> None:
        self._file_of = {name: path for name, (_, path) in saved.items()}
        self._in_memory = {os.path.realpath(path): tensors for path, tensors in preloaded.items()}
        self._trust_pickle = trust_pickle
        self._open = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> "_SavedTensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.close()

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        tensors = self._in_memory.get(os.path.realpath(path))
        if tensors is not None:
            return tensors[name]
        if path not in self._handles:
            self._handles[path] = (
                self._open.enter_context(safe_open(os.fspath(path), framework="pt")) if path.suffix == ".safetensors"
                else read_weights(path, trust_pickle=self._trust_pickle)
            )
        handle = self._handles[path]
        return handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]
