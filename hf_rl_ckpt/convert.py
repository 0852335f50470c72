"""`hf-rl-ckpt convert SRC OUT`: other frameworks' checkpoint folders as hf_rl_ckpt checkpoints.

Recognised sources (`detect_format`):

- `hf_trainer`: a `transformers.Trainer` `checkpoint-N` folder (`model.safetensors` or
  `pytorch_model.bin`, `optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `trainer_state.json`,
  tokenizer files). `trainer_state.json` is kept at the checkpoint root, where
  `CheckpointCallback` (and so `trainer.train(resume_from_checkpoint=OUT)`) reads it. The
  `checkpoint-N` of a PEFT (LoRA) run holds `adapter_model.safetensors` + `adapter_config.json`
  instead of the model: it becomes an adapter checkpoint (`model/adapter/`), and the base
  model's config comes from `base_model`, else from the adapter config's
  `base_model_name_or_path` (a local folder or a Hub id already in the local cache).
  Written under DeepSpeed, the folder holds `latest` and `global_stepN/` instead of an
  optimizer.pt (and, under ZeRO-3, no weights): the weights are merged from the ranks' fp32
  partitions (as `zero_to_fp32.py` would), the ranks' ZeRO optimizer partitions become ours
  (`optim/zero/`, for a resume at the same world size) and every rank's `rng_state_<r>.pth`
  its RNG file.
- `accelerate`: an `accelerator.save_state()` folder (`model.safetensors`, `optimizer.bin`,
  `scheduler.bin`, `random_states_0.pkl`). It holds no model config: pass `base_model`.
- `nemo_rl`: NeMo-RL's legacy `step_N` layout: `policy/weights` and `policy/optimizer` as
  torch.distributed.checkpoint (DCP) folders (`{"model": ...}` and
  `{"optim": {"optim": ..., "sched": ...}}`), `policy/tokenizer/`, `train_dataloader.pt`,
  `training_info.json`, `config.yaml`. The model config comes from `base_model`, else from
  `config.yaml`'s `policy.model_name` (a local folder or a Hub id already in the local cache).

How: the source is read into memory, a model is built from its config on the meta device
and the weights are *assigned* (one copy of the weights in memory, not two; an adapter is
loaded into its PeftModel around a base that stays on the meta device, since an adapter
checkpoint never holds the base), the optimizer state is loaded into a neutral optimizer
over the model's trainable named parameters (the parameter-index-to-name mapping is
validated against every state tensor's shape), and then the ordinary writer
(`write.write_checkpoint`) writes it, this process alone (no collectives), with the source's
own RNG streams: the result is an ordinary checkpoint, byte for byte what a run would have saved, and it appears at OUT whole or not at all.

Pickles: every source above except a safetensors-only weights conversion holds pickled
files. They are read only with `trust_pickle=True` (`--trust-pickle`), and then only
through weights-only loaders (see `hf_rl_ckpt.state.pickled`); without it the error names
every pickled file involved. `weights_only=True` converts just the model weights (a new run
starts from them with a fresh optimizer), which for safetensors sources needs no trust.

`resume.mode: from_path` with a `resume_path` in one of these layouts converts on the fly
into the run's `.incomplete/` and loads from there (see `CheckpointManager.resume`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml
from safetensors.torch import save as safetensors_save

from .commit import CommitRequest
from .errors import CheckpointError, CorruptCheckpointError
from .layout import TRAINING_INFO, rng_file
from .shims import weight_conversion
from .state.model import BIN_INDEX, BIN_WEIGHTS, SAFE_INDEX, SAFE_WEIGHTS, check_tensors, read_weights, weight_files
from .state.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .state.pickled import DCP_METADATA, load_pickled, read_dcp, require_trust
from .state.deepspeed import ZeroPartitions, read_zero_checkpoint
from .state.rng import rng_snapshot
from .write import SaveInputs, write_checkpoint

logger = logging.getLogger("hf_rl_ckpt")

FORMATS = ("hf_trainer", "accelerate", "nemo_rl")
TRAINER_STATE = "trainer_state.json"
#: Tokenizer files copied verbatim (never re-serialised: nothing in them is executed).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
)
_WEIGHT_NAMES = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)


@dataclass
class SourceState:
    """What a reader took from a foreign folder, ready to be written in our layout.

    `optimizer` is a torch optimizer `state_dict()`: keyed by parameter index (torch,
    Trainer, Accelerate) or by parameter name (`get_optimizer_state_dict`, NeMo-RL).
    With `adapter_dir` (a PEFT run), `weights` are the adapter's, `adapter_dir` holds its
    adapter_config.json and `config_source` is the base model's config.
    """

    format: str
    step: int
    weights: dict[str, torch.Tensor]
    weights_file: Path
    config_source: str
    optimizer: dict[str, Any] | None = None
    optimizer_file: Path | None = None
    scheduler: dict[str, Any] | None = None
    rng: tuple[Any, Any, torch.Tensor] | None = None  # python, numpy, torch CPU states
    dataloader: dict[str, Any] | None = None
    tokenizer_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: float | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)
    training_config: dict[str, Any] = field(default_factory=dict)
    adapter_dir: Path | None = None
    zero: ZeroPartitions | None = None  # a DeepSpeed run's ZeRO optimizer partitions, one per rank
    rng_by_rank: list[tuple[Any, Any, torch.Tensor]] = field(default_factory=list)  # a multi-rank run's RNG states


# ---------------------------------------------------------------- detection
def detect_format(path: str | os.PathLike) -> str | None:
    """Which of `FORMATS` the folder `path` is in, or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "policy" / "weights" / DCP_METADATA).is_file():
        return "nemo_rl"
    has_weights = any((path / name).is_file() for name in _WEIGHT_NAMES)
    if (has_weights or _is_adapter_folder(path) or _deepspeed_tag(path)) and (path / TRAINER_STATE).is_file():
        return "hf_trainer"
    if has_weights and ((path / "optimizer.bin").is_file() or any(path.glob("random_states_*.pkl"))):
        return "accelerate"
    return None


def _deepspeed_tag(path: Path) -> str | None:
    """The `global_stepN` folder DeepSpeed's `latest` file names in a Trainer checkpoint, or None."""
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    return tag if tag and "/" not in tag and (path / tag).is_dir() else None


def _is_adapter_folder(path: Path) -> bool:
    """True for a folder PEFT's `save_pretrained` wrote (what the Trainer saves for a LoRA run)."""
    return (path / ADAPTER_WEIGHTS).is_file() and (path / ADAPTER_CONFIG).is_file()


def _step_from_name(path: Path) -> int | None:
    match = re.search(r"(\d+)$", path.name)
    return int(match.group(1)) if match else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CorruptCheckpointError(path, "missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(path, f"not valid JSON ({err})") from err


def _numbers(mapping: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _weights(files: list[Path], trust_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_weights(path, trust_pickle=trust_pickle))
    return state, files[0]


@dataclass(frozen=True)
class _TorchSaveParts:
    """Where a `torch.save`-based format keeps its training state, and the keys of its RNG dict."""

    optimizer: str
    scheduler: str
    rng: str
    rng_keys: tuple[str, str, str]  # python `random`, numpy, torch CPU

    def pickles(self, src: Path, weights_only: bool, weights: list[Path]) -> list[Path]:
        """Every pickled file of `src` a conversion would read (the weight files `weights` included)."""
        parts = [] if weights_only else [src / name for name in (self.optimizer, self.scheduler, self.rng) if (src / name).is_file()]
        return parts + [f for f in weights if f.suffix != ".safetensors"]

    def read_into(self, source: SourceState, src: Path, trust_pickle: bool) -> None:
        """Load the optimizer, scheduler and RNG state present in `src` into `source`."""
        what = f"a {source.format} checkpoint part"
        if (src / self.optimizer).is_file():
            source.optimizer = load_pickled(src / self.optimizer, trust_pickle=trust_pickle, what=what)
            source.optimizer_file = src / self.optimizer
        if (src / self.scheduler).is_file():
            source.scheduler = load_pickled(src / self.scheduler, trust_pickle=trust_pickle, what=what)
        if (src / self.rng).is_file():
            source.rng = self.read_rng(src / self.rng, trust_pickle, source.format)

    def read_rng(self, path: Path, trust_pickle: bool, fmt: str) -> tuple[Any, Any, torch.Tensor]:
        """The python, numpy and torch CPU RNG states of one saved RNG file."""
        rng = load_pickled(path, trust_pickle=trust_pickle, what=f"a {fmt} checkpoint part")
        try:
            return rng[self.rng_keys[0]], rng[self.rng_keys[1]], rng[self.rng_keys[2]]
        except (KeyError, TypeError) as err:
            raise CorruptCheckpointError(path, f"not an RNG state (no {err})") from err


_TRAINER_PARTS = _TorchSaveParts("optimizer.pt", "scheduler.pt", "rng_state.pth", ("python", "numpy", "cpu"))
_ACCELERATE_PARTS = _TorchSaveParts("optimizer.bin", "scheduler.bin", "random_states_0.pkl", ("random_state", "numpy_random_seed", "torch_manual_seed"))


# ---------------------------------------------------------------- readers
def _read_hf_trainer(src: Path, *, trust_pickle: bool, weights_only: bool, base_model: str | None, step: int | None) -> SourceState:
    adapter = _is_adapter_folder(src)
    tag = _deepspeed_tag(src)
    has_weights = adapter or any((src / name).is_file() for name in _WEIGHT_NAMES)
    files = [src / ADAPTER_WEIGHTS] if adapter else (weight_files(src) if has_weights else [])
    deepspeed_files = sorted((src / tag).glob("*.pt")) + sorted(src.glob("rng_state_*.pth")) if tag and not (weights_only and has_weights) else []
    require_trust(_TRAINER_PARTS.pickles(src, weights_only, files) + deepspeed_files, trust_pickle, f"converting the HF Trainer checkpoint {src}")
    state = _read_json(src / TRAINER_STATE)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(src / TRAINER_STATE, "expected a JSON object")
    global_step = step if step is not None else int(state.get("global_step") or _step_from_name(src) or 0)
    logged = [e for e in state.get("log_history") or [] if isinstance(e, dict) and e.get("step") == global_step]
    zero_weights, zero = read_zero_checkpoint(src / tag, trust_pickle=trust_pickle) if deepspeed_files else (None, None)
    weights, weights_file = _weights(files, trust_pickle) if files else (zero_weights, src / tag)
    if weights is None:
        raise CorruptCheckpointError(src, "holds no model weights (no model.safetensors, and a ZeRO-1/2 DeepSpeed folder keeps none)")
    source = SourceState(
        "hf_trainer", global_step, weights, weights_file, base_model or (_adapter_base(src) if adapter else str(src)), tokenizer_dir=src,
        metrics={k: v for entry in logged for k, v in _numbers(entry, ("step", "epoch")).items()},
        epoch=state.get("epoch"), extra_files={TRAINER_STATE: (src / TRAINER_STATE).read_bytes()}, adapter_dir=src if adapter else None,
    )
    if not weights_only:
        _TRAINER_PARTS.read_into(source, src, trust_pickle)
        if zero is not None:
            source.zero = zero
            ranks = sorted(src.glob("rng_state_*.pth"), key=lambda path: int(path.stem.rsplit("_", 1)[1]))
            source.rng_by_rank = [_TRAINER_PARTS.read_rng(path, trust_pickle, source.format) for path in ranks]
    return source


def _adapter_base(src: Path) -> str:
    """The base model an adapter folder names (`base_model_name_or_path` of its adapter_config.json)."""
    config = _read_json(src / ADAPTER_CONFIG)
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise CheckpointError(
            f"{src / ADAPTER_CONFIG} names no base_model_name_or_path (the base was built in memory); pass --base-model DIR "
            "(base_model=...) naming a folder with the base model's config.json"
        )
    return base


def _read_accelerate(src: Path, *, trust_pickle: bool, weights_only: bool, base_model: str | None, step: int | None) -> SourceState:
    if base_model is None:
        raise CheckpointError(
            f"{src} is an Accelerate save_state folder, which stores no model config; pass --base-model DIR "
            "(base_model=...) naming a folder with the model's config.json, e.g. the model the run started from"
        )
    global_step = step if step is not None else _step_from_name(src)
    if global_step is None:
        raise CheckpointError(f"cannot tell which step {src} was saved at; pass --step N (step=...)")
    files = weight_files(src)
    require_trust(_ACCELERATE_PARTS.pickles(src, weights_only, files), trust_pickle, f"converting the Accelerate checkpoint {src}")
    weights, weights_file = _weights(files, trust_pickle)
    source = SourceState("accelerate", global_step, weights, weights_file, base_model)
    if not weights_only:
        _ACCELERATE_PARTS.read_into(source, src, trust_pickle)
    return source


def _read_nemo_rl(src: Path, *, trust_pickle: bool, weights_only: bool, base_model: str | None, step: int | None) -> SourceState:
    policy = src / "policy"
    parts = [policy / "weights" / DCP_METADATA]
    if not weights_only:
        parts += [p for p in (policy / "optimizer" / DCP_METADATA, src / "train_dataloader.pt") if p.is_file()]
    require_trust(parts, trust_pickle, f"converting the NeMo-RL checkpoint {src}")
    info = _read_json(src / TRAINING_INFO) if (src / TRAINING_INFO).is_file() else {}
    if not isinstance(info, dict):
        raise CorruptCheckpointError(src / TRAINING_INFO, "expected a JSON object")
    run_config: dict[str, Any] = {}
    if (src / "config.yaml").is_file():
        try:
            run_config = yaml.safe_load((src / "config.yaml").read_text()) or {}
        except yaml.YAMLError as err:
            raise CorruptCheckpointError(src / "config.yaml", f"not valid YAML ({err})") from err
        if not isinstance(run_config, dict):
            raise CorruptCheckpointError(src / "config.yaml", "expected a mapping")
    policy_config = run_config.get("policy")
    config_source = base_model or (policy_config.get("model_name") if isinstance(policy_config, dict) else None)
    if not config_source:
        raise CheckpointError(f"{src} does not say which model it trains (no policy.model_name in config.yaml); pass --base-model DIR")
    weights = read_dcp(policy / "weights", trust_pickle=trust_pickle)
    if set(weights) != {"model"}:
        raise CorruptCheckpointError(policy / "weights", f"expected the single top-level key 'model', found {sorted(weights)}")
    global_step = step if step is not None else int(info.get("step") or _step_from_name(src) or 0)
    source = SourceState(
        "nemo_rl", global_step, weights["model"], policy / "weights", str(config_source),
        tokenizer_dir=policy / "tokenizer" if (policy / "tokenizer").is_dir() else None,
        metrics=_numbers(info, ("step",)), training_config=run_config,
    )
    if not weights_only:
        if (policy / "optimizer" / DCP_METADATA).is_file():
            optim = read_dcp(policy / "optimizer", trust_pickle=trust_pickle).get("optim") or {}
            source.optimizer, source.optimizer_file = optim.get("optim"), policy / "optimizer"
            source.scheduler = optim.get("sched")
        if (src / "train_dataloader.pt").is_file():
            source.dataloader = load_pickled(src / "train_dataloader.pt", trust_pickle=trust_pickle, what="a NeMo-RL checkpoint part")
    return source


_READERS: dict[str, Callable[..., SourceState]] = {"hf_trainer": _read_hf_trainer, "accelerate": _read_accelerate, "nemo_rl": _read_nemo_rl}


# ---------------------------------------------------------------- rebuilding live objects
def _meta_model(source: SourceState) -> tuple[torch.nn.Module, str]:
    """The model class of the source's config, built on the meta device (no memory for weights), and its name."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source.config_source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read the model config from {source.config_source} ({err}); pass --base-model DIR with the model's config.json"
        ) from err
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, architecture, None) if architecture else None
    if model_cls is None:
        raise CheckpointError(f"the config at {source.config_source} names no architecture transformers provides ({architecture!r})")
    with torch.device("meta"):
        return model_cls._from_config(config), architecture


def _build_model(source: SourceState) -> torch.nn.Module:
    """The source's model with its weights assigned (no second copy); a PEFT source's PeftModel with its adapter loaded."""
    import transformers

    if source.adapter_dir is not None:
        return _build_peft_model(source, source.adapter_dir)
    model, architecture = _meta_model(source)
    # A Trainer folder holds what save_pretrained writes (an MoE's experts one by one): into the runtime form, as from_pretrained loads it.
    result = model.load_state_dict(weight_conversion(model).to_runtime(source.weights), strict=False, assign=True)
    if result.unexpected_keys:
        raise CorruptCheckpointError(
            source.weights_file, f"tensors not in {architecture}: {', '.join(result.unexpected_keys[:8])} (another model? check --base-model)"
        )
    model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise CorruptCheckpointError(source.weights_file, f"missing tensors of {architecture}: {', '.join(missing[:8])}")
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(source.config_source, local_files_only=True)
    except OSError:
        logger.info("no generation_config.json at %s; the converted model gets the default one", source.config_source)
    return model


def _build_peft_model(source: SourceState, adapter_dir: Path) -> torch.nn.Module:
    """A PeftModel of `adapter_dir`'s adapter config around the base model (left on the meta device), holding the adapter weights.

    An adapter checkpoint never reads or writes the base weights, so only the adapter's own
    (trainable) parameters are given memory, and filled through peft's own key mapping.
    The loaded adapter must read back exactly as the file holds it (names, shapes, dtypes, values).
    """
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base, _ = _meta_model(source)
    try:
        peft_config = PeftConfig.from_pretrained(adapter_dir)
    except (OSError, ValueError, TypeError) as err:
        raise CorruptCheckpointError(adapter_dir / ADAPTER_CONFIG, f"not a PEFT adapter config peft can read ({err})") from err
    peft_config.inference_mode = False  # as during training: the adapter's parameters are trainable, the optimizer's
    peft_config.base_model_name_or_path = peft_config.base_model_name_or_path or source.config_source
    model = get_peft_model(base, peft_config)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad:
                setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device="cpu")))
    expected = {key: tuple(tensor.shape) for key, tensor in get_peft_model_state_dict(model).items()}
    check_tensors(
        expected, expected, {key: (tuple(tensor.shape), source.weights_file) for key, tensor in source.weights.items()},
        f"the adapter weights in {source.weights_file} do not fit {adapter_dir / ADAPTER_CONFIG} on the base {source.config_source} "
        "(another rank, target_modules or base model? check --base-model)",
    )
    with torch.no_grad():
        set_peft_model_state_dict(model, source.weights)
    loaded = get_peft_model_state_dict(model)
    changed = [key for key, tensor in source.weights.items() if loaded[key].dtype != tensor.dtype or not torch.equal(loaded[key], tensor)]
    if changed:
        raise CorruptCheckpointError(source.weights_file, f"adapter tensors do not load as saved (dtype or values): {', '.join(changed[:8])}")
    return model


def _param_orders(model: torch.nn.Module, group_sizes: list[int]) -> dict[str, list[list[str]]]:
    """Candidate assignments of parameter names to the optimizer's groups, in parameter-index order.

    Index order is how a torch optimizer numbers parameters: group after group, in the order
    they were passed. Plain loops pass `model.parameters()` (split into consecutive groups);
    `transformers.Trainer` passes its weight-decay group first, then the rest. Only trainable
    parameters count (the Trainer leaves frozen ones out: a LoRA run optimizes its adapter).
    """
    from transformers import Trainer

    names = [name for name, param in model.named_parameters() if param.requires_grad]
    orders = {}
    if sum(group_sizes) == len(names):
        groups, start = [], 0
        for size in group_sizes:
            groups.append(names[start:start + size])
            start += size
        orders["model.parameters() order"] = groups
    if len(group_sizes) == 2:
        decay = set(Trainer.get_decay_parameter_names(None, model))  # does not use `self`
        orders["Trainer weight-decay grouping"] = [[n for n in names if n in decay], [n for n in names if n not in decay]]
    return orders


def _by_index(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state dict (`get_optimizer_state_dict` form) renumbered by index."""
    groups = optimizer_state["param_groups"]
    index = {name: i for i, name in enumerate(name for group in groups for name in group["params"])}
    return {
        "state": {index[name]: slots for name, slots in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in groups],
    }


def _build_optimizer(model: torch.nn.Module, source: SourceState) -> torch.optim.Optimizer | None:
    """A neutral optimizer over `model`'s parameters holding the source's optimizer state."""
    state = source.optimizer
    where = source.optimizer_file
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list) or not isinstance(state.get("state"), dict):
        raise CorruptCheckpointError(where, "not an optimizer state_dict (expected 'state' and 'param_groups')")
    if not state["state"]:
        logger.warning("%s holds no optimizer state (saved before the first step); the converted checkpoint has none", where)
        return None
    params = dict(model.named_parameters())
    named = all(isinstance(n, str) for group in state["param_groups"] for n in group["params"])
    if named:
        orders = {"parameter names": [list(group["params"]) for group in state["param_groups"]]}
        state = _by_index(state)
    else:
        orders = _param_orders(model, [len(group["params"]) for group in state["param_groups"]])
    tried = []
    for label, groups in orders.items():
        flat = [name for group in groups for name in group]
        problem = _order_problem(flat, params, state["state"])
        if problem is None:
            optimizer = torch.optim.Optimizer([{"params": [params[n] for n in group]} for group in groups], {})
            optimizer.load_state_dict(state)
            return optimizer
        tried.append(f"{label}: {problem}")
    raise CorruptCheckpointError(
        where, "cannot tell which parameter each optimizer entry belongs to (" + "; ".join(tried or ["no candidate ordering"]) + ")"
    )


def _order_problem(names: list[str], params: Mapping[str, torch.Tensor], slots_by_index: Mapping[int, Any]) -> str | None:
    """Why `names` (parameter name per optimizer index) cannot be right, or None when every state tensor fits."""
    for index, slots in slots_by_index.items():
        if not isinstance(index, int) or not 0 <= index < len(names) or names[index] not in params:
            return f"entry {index} has no parameter"
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[names[index]].shape:
                return f"entry {index} {slot} has shape {list(value.shape)}, parameter {names[index]} has {list(params[names[index]].shape)}"
    return None


class _StateOf:
    """Hands a plain state dict to the writer where it expects a scheduler or dataloader."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state


class _TokenizerFiles:
    """Copies a folder's tokenizer files verbatim where `save_pretrained` would write them."""

    def __init__(self, folder: Path) -> None:
        self.files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        for path in self.files:
            shutil.copyfile(path, Path(out_dir) / path.name)


# ---------------------------------------------------------------- entry point
def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    weights_only: bool = False,
    base_model: str | None = None,
    step: int | None = None,
) -> Path:
    """Convert the foreign checkpoint folder `src` into the new hf_rl_ckpt checkpoint `out`.

    Args:
        src: an HF Trainer, Accelerate or NeMo-RL (legacy) checkpoint folder.
        out: the checkpoint directory to create; it must not exist. Load it with
            `CheckpointManager.load(out, ...)`, `resume.resume_path: out`, or put it in a run's
            `checkpoint_dir` under the run's name template (e.g. `step_40`).
        trust_pickle: read the source's pickled files (weights-only loaders only).
        weights_only: convert only the model weights.
        base_model: folder (or locally cached Hub id) holding the model's config.json, for
            sources that do not store it (Accelerate; NeMo-RL without `policy.model_name`).
        step: the step to record, for sources that do not say.

    Returns:
        `out`.
    """
    src, out = Path(src), Path(out)
    fmt = detect_format(src)
    if fmt is None:
        raise CheckpointError(
            f"{src} is not a checkpoint folder convert recognises: expected an HF Trainer checkpoint-N folder "
            "(trainer_state.json + model weights, or + adapter_model.safetensors and adapter_config.json for a LoRA run), "
            "an Accelerate save_state folder (weights + optimizer.bin/random_states_0.pkl) "
            "or a NeMo-RL step folder (policy/weights/.metadata)"
        )
    if out.exists():
        raise CheckpointError(f"convert target {out} already exists; choose a new path or remove it first")
    source = _READERS[fmt](src, trust_pickle=trust_pickle, weights_only=weights_only, base_model=base_model, step=step)
    model = _build_model(source)
    optimizer = source.zero if source.zero is not None else (_build_optimizer(model, source) if source.optimizer is not None else None)
    if source.rng_by_rank:  # rank 0's RNG is the checkpoint's own; the other ranks' go in beside it
        source.rng = source.rng_by_rank[0]
        for rank, states in enumerate(source.rng_by_rank[1:], start=1):
            tensors, metadata = rng_snapshot(*states)
            source.extra_files[rng_file(rank)] = safetensors_save(tensors, metadata=metadata)
    inputs = SaveInputs(
        record=CommitRequest.checked(
            source.step, source.metrics, source.epoch,
            {"converted_from": {"format": fmt, "path": str(src.resolve()), "weights_only": weights_only}}, metric_name=None,
        ),
        model=model, optimizer=optimizer,
        scheduler=_StateOf(source.scheduler) if source.scheduler is not None else None,
        dataloader=_StateOf(source.dataloader) if source.dataloader is not None else None,
        tokenizer=_TokenizerFiles(source.tokenizer_dir) if source.tokenizer_dir is not None else None,
        extra_files=source.extra_files,
        rng=rng_snapshot(*source.rng) if source.rng is not None else None,
    )
    write_checkpoint(out, inputs, training_config=source.training_config)
    logger.info("converted %s checkpoint %s -> %s (step %d)", fmt, src, out, source.step)
    return out
