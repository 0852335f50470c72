"""Every private name of torch, transformers, accelerate and TRL that hf_rl_ckpt relies on, in one place.

Upstream libraries may rename or drop a private name in any release. Gathering them here
means one file to re-check when a release comes out, and one place where a missing name
turns into an error that names the installed version and what to do, at attach time,
instead of a silent fallback that only an exact-resume test would notice.

Checked against (the floors are `ci/oldest.txt`, run by `.ci/run` next to the newest):

| library      | oldest checked | newest checked |
|--------------|----------------|----------------|
| torch        | 2.13           | 2.13           |
| transformers | 5.18.0         | 5.25.0         |
| accelerate   | 1.13.0         | 1.16.0         |
| deepspeed    | 0.19.8         | 0.19.8         |
| trl          | 0.29.0         | 1.16.0         |

DeepSpeed's ZeRO optimizers are driven through their own `state_dict`/`load_state_dict`; what
`state/deepspeed.py` reads besides (`loss_scaler`, `partition_gradients`,
`single_partition_of_fp32_groups`, `GatheredParameters`) is checked by tests/test_deepspeed.py
against the release in the table.

transformers' weight conversion (`transformers.core_model_loading`: `revert_weight_conversion`,
`rename_source_key`, `dot_natural_key`, `WeightConverter`, `WeightRenaming`, `PrefixChange`, and
`conversion_mapping.get_model_conversion_mapping`) is what makes a deployable folder hold the
tensors `save_pretrained` writes; tests/test_families.py checks it per family against the release
in the table.

Where a public API does the job it is used instead (Accelerate's
`register_save_state_pre_hook`, torch's `Optimizer.register_step_pre_hook`, DCP's
`HuggingFaceStorageReader`); what is left has no public equivalent.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch

from .errors import StateMismatchError, UnsupportedVersionError


def _missing(library: str, names: list[str], where: str) -> UnsupportedVersionError:
    return UnsupportedVersionError(
        f"{where} has no {', '.join(names)} in {library} {version(library)}: hf_rl_ckpt hooks into "
        f"{'it' if len(names) == 1 else 'them'} and was checked with the releases listed in hf_rl_ckpt/shims.py. "
        f"Install a {library} release in that range (pip install '{library}<{version(library)}' if this one is newer), "
        "or upgrade hf_rl_ckpt"
    )


def _private_attr(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise _missing(module.partition(".")[0], [f"{module}.{name}"], "this installation") from None


# ------------------------------------------------------------------ transformers.Trainer
#: The loaders of `Trainer`'s resume path that `CheckpointCallback` points at our pickle-free files.
#: `train(resume_from_checkpoint=...)` calls them; there is no public hook for any of them.
TRAINER_LOADERS = ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state", "_load_scaler")


def trainer_loaders(trainer: Any) -> dict[str, Callable[..., Any]]:
    """The trainer's resume-path loaders by name; raises at once when one is missing."""
    missing = [name for name in TRAINER_LOADERS if not callable(getattr(trainer, name, None))]
    if missing:
        raise _missing("transformers", missing, type(trainer).__name__)
    return {name: getattr(trainer, name) for name in TRAINER_LOADERS}


#: Under DeepSpeed, `Trainer` resumes through this function of its module (not a method one could override per trainer).
TRAINER_DEEPSPEED_LOADER = "deepspeed_load_checkpoint"


def dispatch_trainer_deepspeed_loader(ours: Callable[[Any], bool]) -> None:
    """Route `transformers.trainer.deepspeed_load_checkpoint(engine, path, ...)` to nothing when `ours(path)`, else to the original.

    Installed once per process; trainers resuming anything else are unaffected.
    """
    import transformers.trainer as trainer_module

    original = getattr(trainer_module, TRAINER_DEEPSPEED_LOADER, None)
    if not callable(original):
        raise _missing("transformers", [TRAINER_DEEPSPEED_LOADER], "transformers.trainer")
    if getattr(original, "_hf_rl_ckpt_dispatch", False):
        return

    def load(engine: Any, checkpoint: Any, *args: Any, **kwargs: Any) -> Any:
        if ours(checkpoint):
            return None
        return original(engine, checkpoint, *args, **kwargs)

    load._hf_rl_ckpt_dispatch = True  # type: ignore[attr-defined]
    setattr(trainer_module, TRAINER_DEEPSPEED_LOADER, load)


# ------------------------------------------------------------------ trl (GRPOTrainer, RLOOTrainer)
#: The generation buffer of TRL's online trainers (see `integrations/generation_buffer.py`): the micro-step
#: counter, the buffered scored completions, the metrics not yet logged, and `num_iterations`.
TRL_GENERATION_ATTRS = ("_step", "_buffered_inputs", "_metrics", "num_iterations")


@dataclass(frozen=True)
class TrlGenerationState:
    """Typed access to one TRL trainer's generation buffer (the only place its private names are read or set)."""

    trainer: Any

    def micro_step(self) -> int:
        return self.trainer._step

    def buffered_inputs(self) -> list[dict[str, Any]] | None:
        return self.trainer._buffered_inputs

    def train_metrics(self) -> Mapping[str, list[float]]:
        return self.trainer._metrics["train"]

    def generate_every(self) -> int:
        """Micro-steps between generations: each generation serves `steps_per_generation` slices, `num_iterations` times."""
        return self.trainer.args.steps_per_generation * self.trainer.num_iterations

    def micro_steps_per_step(self) -> int:
        return self.trainer.args.gradient_accumulation_steps

    def set(self, *, micro_step: int, buffered_inputs: list[dict[str, Any]] | None, train_metrics: Mapping[str, list[float]]) -> None:
        self.trainer._step = micro_step
        self.trainer._buffered_inputs = buffered_inputs
        pending = self.trainer._metrics["train"]
        pending.clear()
        pending.update(train_metrics)


def trl_generation_state(trainer: Any) -> TrlGenerationState | None:
    """The generation buffer of a TRL online trainer (its args have `steps_per_generation`), None for other trainers.

    Raises at attach time when this TRL release keeps it under other names.
    """
    if not hasattr(getattr(trainer, "args", None), "steps_per_generation"):
        return None
    missing = [name for name in TRL_GENERATION_ATTRS if not hasattr(trainer, name)]
    if not missing and not (isinstance(trainer._step, int) and isinstance(trainer._metrics, Mapping) and "train" in trainer._metrics):
        missing = ["_step (an int)", "_metrics['train']"]
    if missing:
        raise _missing("trl", missing, f"{type(trainer).__name__} (its generation buffer, saved for exact resume)")
    return TrlGenerationState(trainer)


# ------------------------------------------------------------------ accelerate.Accelerator
#: Lists of what `Accelerator.prepare` and `register_for_checkpointing` registered; `save_state`
#: reads the same ones. Public accessors exist for none of them.
ACCELERATOR_REGISTRIES = ("_models", "_optimizers", "_schedulers", "_dataloaders", "_custom_objects")
#: The dicts behind `register_save_state_pre_hook` / `register_load_state_pre_hook`: read to find
#: other hooks that would never run once `save_state` is ours.
ACCELERATOR_HOOK_DICTS = {"save_state": "_save_model_state_pre_hook", "load_state": "_load_model_state_pre_hook"}
#: `DataLoaderShard` calls `_update_state_dict()` once per batch it hands out (twice for the last):
#: the only per-batch point where the position can be counted without wrapping the iterator.
DATALOADER_BATCH_HOOK = "_update_state_dict"
DATALOADER_SHARD_METHODS = ("begin", "end", DATALOADER_BATCH_HOOK)


def require_accelerator_internals(accelerator: Any) -> None:
    """Raise at registration when this Accelerate release lacks what `register_checkpointing` uses."""
    from accelerate.data_loader import DataLoaderShard

    missing = [name for name in (*ACCELERATOR_REGISTRIES, *ACCELERATOR_HOOK_DICTS.values()) if not hasattr(accelerator, name)]
    missing += [f"DataLoaderShard.{name}" for name in DATALOADER_SHARD_METHODS if not callable(getattr(DataLoaderShard, name, None))]
    if missing:
        raise _missing("accelerate", missing, type(accelerator).__name__)


@dataclass(frozen=True)
class Prepared:
    """What an accelerator prepared or registered, in order (live lists: later `prepare` calls show up)."""

    models: list[Any]
    optimizers: list[Any]
    schedulers: list[Any]
    dataloaders: list[Any]
    custom_objects: list[Any]


def prepared(accelerator: Any) -> Prepared:
    return Prepared(*(getattr(accelerator, name) for name in ACCELERATOR_REGISTRIES))


def state_pre_hooks(accelerator: Any, method: str) -> Mapping[int, Callable[..., Any]]:
    """The pre-hooks registered for `save_state` or `load_state`, by handle id."""
    return getattr(accelerator, ACCELERATOR_HOOK_DICTS[method])


# ------------------------------------------------------------------ torch
#: DCP's HF-format safetensors: the header keys and file names `HuggingFaceStorageReader` expects.
#: Our streamed optimizer files must carry exactly these, so they are DCP's own constants.
_HF_UTILS = "torch.distributed.checkpoint._hf_utils"
DCP_SHARDING_INFO_KEY: str = _private_attr(_HF_UTILS, "DCP_SHARDING_INFO_KEY")
DCP_VERSION_KEY: str = _private_attr(_HF_UTILS, "DCP_VERSION_KEY")
SAVED_OFFSETS_KEY: str = _private_attr(_HF_UTILS, "SAVED_OFFSETS_KEY")
DCP_FORMAT_METADATA: dict[str, str] = {_private_attr(_HF_UTILS, "FORMAT_KEY"): _private_attr(_HF_UTILS, "FORMAT_VALUE")}
HF_DCP_VERSION: str = str(_private_attr(_HF_UTILS, "HF_DCP_VERSION"))
dcp_file_name: Callable[[int, int], str] = _private_attr(_HF_UTILS, "_gen_file_name")

#: Rebuilds a nested state dict from DCP's flattened keys and planner data (read side of legacy DCP folders).
unflatten_state_dict: Callable[..., dict[str, Any]] = _private_attr("torch.distributed.checkpoint._nested_dict", "unflatten_state_dict")


def runs_step_pre_hooks(optimizer: Any) -> bool:
    """True when `optimizer.step()` runs the hooks of `register_step_pre_hook`.

    torch's own optimizers do (their step is wrapped by `Optimizer.profile_hook_step`, which
    reads `_optimizer_step_pre_hooks`); an optimizer that only looks like one may not.
    """
    return isinstance(optimizer, torch.optim.Optimizer) and isinstance(getattr(optimizer, "_optimizer_step_pre_hooks", None), dict)


# ------------------------------------------------------------------ transformers weight conversion (5.x)
#: `save_pretrained` writes a model's weights under the names and shapes of its original checkpoints:
#: transformers 5 fuses some at load time (an MoE layer's experts into one `gate_up_proj`, a VLM's
#: submodels renamed) and `revert_weight_conversion` undoes that when saving. Its building blocks are
#: what runs the same conversion forward (`from_pretrained`'s direction) into a live model, whose
#: parameters must be kept (`convert_and_load_state_dict_in_model` replaces them, which would orphan an
#: optimizer's references).
_CORE_MODEL_LOADING = "transformers.core_model_loading"
WEIGHT_CONVERSION_NAMES = (
    "revert_weight_conversion", "rename_source_key", "dot_natural_key", "WeightConverter", "WeightRenaming", "PrefixChange",
)


@dataclass(frozen=True)
class WeightConversion:
    """transformers' weight conversion of one model: runtime tensors <-> the tensors `save_pretrained` writes.

    Both directions are pure reshuffles of the same values (stack/unbind, concatenate/chunk,
    renames), so `to_runtime(to_saved(state))` gives `state` back bit for bit. A model without a
    conversion (most dense models, any plain `nn.Module`) maps every name to itself.
    """

    model: Any
    transforms: tuple[Any, ...]  # transformers' WeightConverter / WeightRenaming objects, in from_pretrained order
    runtime_names: Mapping[str, bool]  # the live model's state dict names (what `rename_source_key` looks names up in)

    @property
    def identity(self) -> bool:
        return not self.transforms

    def to_saved(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (runtime names; complete groups: every expert tensor of a layer) as `save_pretrained` writes it."""
        if self.identity:
            return dict(state)
        with torch.no_grad():
            return _private_attr(_CORE_MODEL_LOADING, "revert_weight_conversion")(self.model, dict(state))

    def saved_groups(self, names: list[str]) -> list[list[str]]:
        """Saved names grouped by the runtime tensor they become together (a layer's experts), in loading order."""
        if self.identity:
            return [[name] for name in names]
        groups: dict[str, list[str]] = {}
        for name in self._sorted(names):
            groups.setdefault(self._rename(name)[0], []).append(name)
        return list(groups.values())

    @functools.cached_property
    def _renamings(self) -> list[Any]:
        return [t for t in self.transforms if isinstance(t, importlib.import_module(_CORE_MODEL_LOADING).WeightRenaming)]

    @functools.cached_property
    def _converters(self) -> list[Any]:
        return [t for t in self.transforms if isinstance(t, importlib.import_module(_CORE_MODEL_LOADING).WeightConverter)]

    def to_runtime(self, saved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Saved tensors (complete groups, see `saved_groups`) as the live model holds them: `from_pretrained`'s conversion."""
        if self.identity:
            return dict(saved)
        core = importlib.import_module(_CORE_MODEL_LOADING)
        converters = {pattern: converter for converter in self._converters for pattern in converter.source_patterns}
        pending: dict[str, Any] = {}
        for name in self._sorted(list(saved)):
            target, pattern = self._rename(name)
            if pattern is not None:
                conversion = pending.setdefault(target, copy.deepcopy(converters[pattern]))
            else:
                conversion = pending.setdefault(target, core.WeightRenaming(name, target))
                pattern = name
            conversion.add_tensor(target, name, pattern, saved[name])
        runtime: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for target, conversion in pending.items():
                for name, value in conversion.convert(target, model=self.model, config=self.model.config).items():
                    runtime[name] = value[0] if isinstance(value, list) else value
        return runtime

    def _sorted(self, names: list[str]) -> list[str]:
        return sorted(names, key=_private_attr(_CORE_MODEL_LOADING, "dot_natural_key"))

    def _rename(self, name: str) -> tuple[str, str | None]:
        """The runtime name a saved name loads into, and the converter pattern it matched (as `from_pretrained` renames it)."""
        core = importlib.import_module(_CORE_MODEL_LOADING)
        runtime, prefix = self.runtime_names, getattr(self.model, "base_model_prefix", None)
        target, pattern = core.rename_source_key(name, self._renamings, self._converters, prefix, runtime)
        if target not in runtime and name in runtime:  # as from_pretrained: the name only needed the prefix handling
            target, pattern = core.rename_source_key(name, [], [], prefix, runtime)
        return target, pattern


def weight_conversion(model: Any) -> WeightConversion:
    """The conversion `save_pretrained` reverts for `model` (its `from_pretrained` mapping, else transformers' default for its class).

    The choice is `revert_weight_conversion`'s own: the mapping recorded when the model was
    loaded, else the registered one for its architecture without legacy renames or prefix
    changes (a model built from a config has no prefix to restore).
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return WeightConversion(model, (), {})
    core = importlib.import_module(_CORE_MODEL_LOADING)
    missing = [name for name in WEIGHT_CONVERSION_NAMES if not hasattr(core, name)]
    if missing:
        raise _missing("transformers", [f"{_CORE_MODEL_LOADING}.{name}" for name in missing], "save_pretrained's weight conversion")
    transforms = getattr(model, "_weight_conversions", None)
    if transforms is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, core.PrefixChange)]
    transforms = tuple(transforms or ())
    if not transforms:
        return WeightConversion(model, (), {})
    live = model.state_dict(keep_vars=True)
    conversion = WeightConversion(model, transforms, dict.fromkeys(live, True))
    _check_round_trip(conversion, {name: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for name, t in live.items()})
    return conversion


def _check_round_trip(conversion: WeightConversion, runtime: Mapping[str, torch.Tensor]) -> None:
    """Raise, before anything is written or loaded, when `runtime` (meta tensors) does not come back from its saved form unchanged.

    A folder that does not load back into the same tensors could be served but never resumed exactly.
    """
    try:
        back = conversion.to_runtime(conversion.to_saved(runtime))
        problem = None if {n: tuple(t.shape) for n, t in back.items()} == {n: tuple(t.shape) for n, t in runtime.items()} else (
            f"these come back otherwise: {', '.join(sorted(set(back) ^ set(runtime))[:8]) or 'the same names, other shapes'}"
        )
    except Exception as err:  # transformers raises ValueError / RuntimeError / KeyError from inside its operations
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        raise StateMismatchError(
            f"{type(conversion.model).__name__}'s weights cannot be written as save_pretrained writes them and read back into it: "
            f"transformers {version('transformers')}'s weight conversion for it (its `_weight_conversions`, or the mapping "
            f"transformers.conversion_mapping registers for {getattr(conversion.model.config, 'model_type', '?')}) does not invert ({problem}). "
            "Nothing was written. Checkpoint it with a transformers release whose mapping inverts (hf_rl_ckpt/shims.py lists those "
            "checked), or report the model to hf_rl_ckpt"
        )


def save_custom_code(model: Any, out_dir: Any) -> None:
    """The `trust_remote_code` files (modeling_*.py and what they import) next to config.json, as `save_pretrained` copies them."""
    from transformers.dynamic_module_utils import custom_object_save

    if callable(getattr(model, "is_remote_code", None)) and model.is_remote_code():
        custom_object_save(model, out_dir, config=model.config)
