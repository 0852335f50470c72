"""`CheckpointManager`: save, retain, resume. The framework-agnostic core.

Integrations (Trainer callback, Accelerate hooks, RL frameworks) only decide *when* to save
and hand over their objects; this module decides *how*: every file is written under
`.incomplete/<name>/`, fsynced, listed with size and sha256 in `training_info.json` (the
last file written), and only then renamed into place. A crash at any instant therefore
leaves either the old set of checkpoints or the old set plus one whole new checkpoint.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
import yaml

from . import distributed
from .atomic import atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree
from .config import CheckpointConfig, parse_duration, parse_size, redact_secrets
from .errors import CheckpointError, CheckpointNotFoundError, CheckpointSaveError, CorruptCheckpointError
from .layout import (
    CONFIG_YAML,
    CONSOLIDATED_DIR,
    FORMAT_VERSION,
    OPTIM_DIR,
    SCHEDULER_JSON,
    TRAINING_INFO,
    CheckpointLayout,
    dataloader_file,
    rng_file,
)
from .registry import Registry, record_from_training_info
from .retention import RetentionPolicy, metric_value
from .state.dataloader import load_dataloader, save_dataloader
from .state.model import load_consolidated, save_consolidated, unwrap_model
from .state.optim import load_optimizer, save_optimizer
from .state.rng import load_rng, save_rng
from .state.scheduler import load_scheduler, save_scheduler
from .verify import build_manifest, verify_checkpoint

logger = logging.getLogger("hf_rl_ckpt")

PROTOCOL_METHODS = ("save", "load", "should_save", "should_load", "finalize")
_REPLACED_PREFIX = "replaced-"
_EVICTED_PREFIX = "evicted-"


@runtime_checkable
class CheckpointManagerProtocol(Protocol):
    """The surface integrations use; a custom `checkpoint_manager_class` must provide it."""

    def save(self, step: int, **state: Any) -> Path | None: ...

    def load(self, path: str | os.PathLike, **state: Any) -> "ResumeState": ...

    def should_save(self, step: int) -> bool: ...

    def should_load(self) -> bool: ...

    def finalize(self, terminate: bool = True) -> None: ...


@dataclass
class ResumeState:
    """What a resume restored, for the training loop to continue from.

    Attributes:
        step: the step the checkpoint was saved at.
        epoch: the epoch recorded at save time, if any.
        metrics: the metrics recorded at save time.
        path: the checkpoint directory loaded.
        extra: the JSON `extra_state` passed to `save`.
        weights_only: True when only model weights were loaded (`resume.load_weight_only`).
    """

    step: int
    path: Path
    epoch: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    weights_only: bool = False


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint, recorded in training_info.json."""
    versions = {"python": sys.version.split()[0]}
    for name in ("hf_rl_ckpt", "torch", "transformers", "accelerate", "peft", "safetensors", "huggingface_hub"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


class BaseCheckpointManager:
    """Policies shared by every manager: when to save, what to keep, where checkpoints are.

    Subclasses add the I/O. Nothing here writes a file except `apply_retention`'s deletions.
    """

    def __init__(self, config: CheckpointConfig) -> None:
        self.config = config
        self.layout = CheckpointLayout(config.checkpoint_dir, config.checkpoint_name_template)
        self.registry = Registry(self.layout)
        self.policy = RetentionPolicy(config.keep_top_k, config.metric_name, config.higher_is_better)
        self._started = time.monotonic()
        self._deadline = (
            parse_duration(config.checkpoint_must_save_by, "checkpoint_must_save_by") if config.checkpoint_must_save_by else None
        )
        self._deadline_saved = False

    # ------------------------------------------------------------- policies
    def should_save(self, step: int) -> bool:
        """True on every `save_period`-th step, and once when `checkpoint_must_save_by` is reached."""
        if not self.config.enabled:
            return False
        if self._deadline is not None and not self._deadline_saved and time.monotonic() - self._started >= self._deadline:
            self._deadline_saved = True
            logger.warning("checkpoint_must_save_by (%s) reached at step %d: saving now", self.config.checkpoint_must_save_by, step)
            return True
        period = self.config.save_period
        return period is not None and step > 0 and step % period == 0

    @property
    def deadline_reached(self) -> bool:
        """True once the `checkpoint_must_save_by` save has been triggered (time to stop the job)."""
        return self._deadline_saved

    def should_load(self) -> bool:
        """True when `resume` would load something."""
        mode = self.config.resume.mode
        if not self.config.enabled or mode == "disable":
            return False
        return mode == "from_path" or bool(self.layout.committed_steps())

    # ------------------------------------------------------------- queries
    def checkpoints(self) -> list[dict[str, Any]]:
        """Registry rows of committed checkpoints, oldest first (step, metrics, top_k_rank, ...)."""
        return self.registry.records()

    def latest(self) -> Path | None:
        """The newest committed checkpoint, or None."""
        steps = self.layout.committed_steps()
        return steps[max(steps)] if steps else None

    def best(self) -> Path | None:
        """The best committed checkpoint by `metric_name` (the newest when no metric ranks)."""
        values = self._metric_values(self.checkpoints())
        ranking = self.policy.ranking(values)
        if ranking:
            return self.layout.step_dir(ranking[0])
        return self.latest()

    def consolidated_path(self, step: int | None = None) -> Path:
        """The HF-format folder of a checkpoint (the newest when `step` is None): hand this to vLLM/SGLang."""
        path = self.layout.step_dir(step) if step is not None else self.latest()
        if path is None or not (path / TRAINING_INFO).is_file():
            raise CheckpointNotFoundError(f"no committed checkpoint {'for step ' + str(step) if step is not None else ''} in {self.layout.root}")
        return path / CONSOLIDATED_DIR

    def _metric_values(self, rows: list[dict[str, Any]]) -> dict[int, float | None]:
        return {row["step"]: metric_value(row.get("metrics"), self.config.metric_name, row["step"]) for row in rows}

    # ------------------------------------------------------------- retention
    def apply_retention(self, data: dict[str, Any]) -> list[int]:
        """Evict what the policy does not retain; update `data` (the registry) in place.

        Crash-safe order: each evicted directory is first renamed into `.trash/` (one atomic
        step: it stops being a checkpoint), then the registry is rewritten, then the trash
        is deleted. A crash in between leaves only trash, which the next start removes.
        """
        rows = data["checkpoints"]
        values = self._metric_values(rows)
        retained = self.policy.retained(values)
        evicted = sorted(step for step in values if step not in retained)
        trash = []
        if evicted:
            self.layout.trash_root.mkdir(exist_ok=True)
            for step in evicted:
                target = self.layout.trash_root / f"{_EVICTED_PREFIX}{self.layout.step_name(step)}"
                shutil.rmtree(target, ignore_errors=True)
                os.rename(self.layout.step_dir(step), target)
                trash.append(target)
            fsync_dir(self.layout.root)
        ranking = self.policy.top_k(values)
        data["checkpoints"] = [row for row in rows if row["step"] in retained]
        for row in data["checkpoints"]:
            row["top_k_rank"] = ranking.index(row["step"]) + 1 if row["step"] in ranking else None
        data.update(metric_name=self.config.metric_name, higher_is_better=self.config.higher_is_better, keep_top_k=self.config.keep_top_k)
        self.registry.write(data)
        for target in trash:
            shutil.rmtree(target)
        return evicted


class CheckpointManager(BaseCheckpointManager):
    """Writes and reads checkpoints of the hf_rl_ckpt layout for any torch model.

    ```python
    from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ResumableDataLoader

    manager = CheckpointManager(CheckpointConfig(checkpoint_dir="runs/ckpt", save_period=100,
                                                 metric_name="val_reward", keep_top_k=3))
    loader = ResumableDataLoader(train_loader)
    state = manager.resume(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    step = state.step if state else 0
    ...
    if manager.should_save(step):
        manager.save(step, model=model, optimizer=opt, scheduler=sched, dataloader=loader,
                     metrics={"val_reward": 0.71}, tokenizer=tok)
    manager.finalize()
    ```

    Every rank of a distributed job constructs the manager and calls `save`/`resume`
    together; rank 0 writes the shared files and commits.
    """

    def __init__(self, config: CheckpointConfig, training_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.training_config = dict(training_config or {})
        self._max_shard_size = parse_size(config.max_shard_size)
        if config.enabled and distributed.rank() == 0:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            self._recover()
        distributed.barrier()

    def _recover(self) -> None:
        """Finish or undo what an interrupted process left behind, and re-index."""
        if self.layout.incomplete_root.is_dir():
            for leftover in sorted(self.layout.incomplete_root.iterdir()):
                logger.warning("removing %s: an interrupted save left it incomplete (never committed)", leftover)
                shutil.rmtree(leftover)
        if self.layout.trash_root.is_dir():
            for entry in sorted(self.layout.trash_root.iterdir()):
                original = self.layout.root / entry.name.removeprefix(_REPLACED_PREFIX)
                if entry.name.startswith(_REPLACED_PREFIX) and not original.exists():
                    logger.warning("restoring %s: a crash interrupted its replacement", original)
                    os.rename(entry, original)
                else:
                    shutil.rmtree(entry)
            fsync_dir(self.layout.root)
        self.registry.reconcile()

    # ================================================================= save
    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        dataloader: Any | None = None,
        metrics: Mapping[str, Any] | None = None,
        tokenizer: Any | None = None,
        epoch: float | None = None,
        extra_state: Mapping[str, Any] | None = None,
    ) -> Path | None:
        """Write one checkpoint for `step` and commit it atomically; apply top-k retention.

        Args:
            step: the global step; names the checkpoint (`step_<N>`).
            model: the model (DDP/Accelerate-wrapped is fine); saved as a consolidated HF folder.
            optimizer, scheduler: saved for exact resume (`save_optimizer` can turn the first off).
            dataloader: something with `state_dict()`/`load_state_dict()`, e.g. `ResumableDataLoader`.
            metrics: numbers for `training_info.json` and top-k ranking (`metric_name`).
            tokenizer: saved into the consolidated folder so it is deployable as is.
            epoch: recorded in `training_info.json`.
            extra_state: any JSON-able dict (e.g. your loop counters), returned by `resume` as `.extra`.

        Returns:
            The committed checkpoint directory (None when checkpointing is disabled).

        Raises:
            CheckpointSaveError: a write failed on some rank; nothing was committed and
                earlier checkpoints are intact.
        """
        if not self.config.enabled:
            return None
        started = time.perf_counter()
        metrics = dict(metrics or {})
        metric_value(metrics, self.config.metric_name, step)  # reject NaN before writing anything
        if self.config.metric_name and self.config.keep_top_k and metric_value(metrics, self.config.metric_name, step) is None:
            logger.warning(
                "metric '%s' is not among this save's metrics (%s) at step %d; the checkpoint cannot rank in top-%d "
                "and is kept only while it is the newest", self.config.metric_name, ", ".join(metrics) or "none", step, self.config.keep_top_k,
            )
        staging = self.layout.incomplete_dir(step)
        if distributed.rank() == 0:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        distributed.barrier()
        digests, error = {}, None
        try:
            digests = self._write_state(staging, model, optimizer, scheduler, dataloader, tokenizer)
        except Exception as err:  # reported to every rank below, then re-raised with the rank named
            error = err
        self._raise_if_any_rank_failed(step, staging, error)
        all_digests: dict[str, tuple[int, str]] = {}
        for rank_digests in distributed.all_gather_object(digests):
            all_digests.update(rank_digests)
        if distributed.rank() == 0:
            self._commit(step, staging, all_digests, metrics, epoch, extra_state, model, started)
        distributed.barrier()
        return self.layout.step_dir(step)

    def _write_state(self, staging: Path, model, optimizer, scheduler, dataloader, tokenizer) -> dict[str, tuple[int, str]]:
        """Write every component of the checkpoint into `staging`; return digests computed while writing."""
        rank = distributed.rank()
        digests: dict[str, tuple[int, str]] = {}
        if rank == 0:
            for name, digest in save_consolidated(model, staging / CONSOLIDATED_DIR, max_shard_size=self._max_shard_size, tokenizer=tokenizer).items():
                digests[f"{CONSOLIDATED_DIR}/{name}"] = digest
        if optimizer is not None and self.config.save_optimizer:
            save_optimizer(unwrap_model(model), optimizer, staging / OPTIM_DIR)
        if scheduler is not None and rank == 0:
            digests[SCHEDULER_JSON] = save_scheduler(scheduler, staging / SCHEDULER_JSON)
        if dataloader is not None:
            digests[dataloader_file(rank)] = save_dataloader(dataloader, staging / dataloader_file(rank))
        (staging / "rng").mkdir(exist_ok=True)
        digests[rng_file(rank)] = save_rng(staging / rng_file(rank))
        if rank == 0:
            document = {"checkpoint": self.config.to_dict(redact=True), "training": redact_secrets(self.training_config)}
            digests[CONFIG_YAML] = atomic_write_bytes(staging / CONFIG_YAML, yaml.safe_dump(document, sort_keys=False).encode())
        return digests

    def _raise_if_any_rank_failed(self, step: int, staging: Path, error: Exception | None) -> None:
        reports = distributed.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        failed = {rank: report for rank, report in enumerate(reports) if report is not None}
        if not failed:
            return
        if distributed.rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()
        previous = self.latest()
        detail = "; ".join(f"rank {rank}: {report}" for rank, report in failed.items())
        raise CheckpointSaveError(
            f"saving step {step} failed ({detail}); nothing was committed"
            + (f", the previous checkpoint {previous} is intact" if previous else "")
        ) from error

    def _commit(self, step, staging, digests, metrics, epoch, extra_state, model, started) -> None:
        inner = unwrap_model(model)
        info = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "metrics": metrics,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "save_seconds": None,
            "world_size": distributed.world_size(),
            "versions": library_versions(),
            "model": {
                "class": type(inner).__name__,
                "num_parameters": sum(p.numel() for p in inner.parameters()),
                "dtype": str(next(inner.parameters()).dtype).removeprefix("torch.") if any(True for _ in inner.parameters()) else None,
            },
            "extra": dict(extra_state or {}),
            "manifest": build_manifest(staging, digests),
        }
        info["save_seconds"] = round(time.perf_counter() - started, 3)
        atomic_write_json(staging / TRAINING_INFO, info)
        fsync_tree(staging)
        final = self.layout.step_dir(step)
        if final.exists():
            self._replace(final, staging)
        else:
            os.rename(staging, final)
        fsync_dir(self.layout.root)
        fsync_dir(self.layout.incomplete_root)
        data = self.registry.read()
        data["checkpoints"] = [row for row in data["checkpoints"] if row.get("step") != step]
        data["checkpoints"].append(record_from_training_info(step, final.name, info))
        evicted = self.apply_retention(data)
        logger.info(
            "saved checkpoint step %d -> %s (%.1f MB) in %.2fs%s",
            step, final, sum(entry["size"] for entry in info["manifest"].values()) / 1e6, time.perf_counter() - started,
            f"; evicted step(s) {', '.join(map(str, evicted))}" if evicted else "",
        )

    def _replace(self, final: Path, staging: Path) -> None:
        """Swap a re-saved step into place; `_recover` restores the old one if we crash mid-swap."""
        logger.warning("replacing existing checkpoint %s with a new save of the same step", final)
        self.layout.trash_root.mkdir(exist_ok=True)
        parked = self.layout.trash_root / f"{_REPLACED_PREFIX}{final.name}"
        shutil.rmtree(parked, ignore_errors=True)
        os.rename(final, parked)
        os.rename(staging, final)
        fsync_dir(self.layout.root)
        shutil.rmtree(parked)

    # ================================================================= load
    def resume(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        dataloader: Any | None = None,
    ) -> ResumeState | None:
        """Resume according to `config.resume`; None means a fresh start.

        `auto` picks the newest complete checkpoint; if it fails verification it falls back
        to the previous one with a warning naming the problem (`resume.on_corrupt: error`
        raises instead). `from_path` loads `resume.resume_path` and fails if it is missing.
        """
        mode = self.config.resume.mode
        if not self.config.enabled or mode == "disable":
            logger.info("resume.mode=%s: starting fresh", mode if self.config.enabled else "disabled checkpointing")
            return None
        objects = dict(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=dataloader)
        if mode == "from_path":
            path = Path(self.config.resume.resume_path or "")
            if not (path / TRAINING_INFO).is_file():
                raise CheckpointNotFoundError(
                    f"resume.resume_path {path} is not a committed checkpoint (no {TRAINING_INFO}); "
                    f"pick one of `hf-rl-ckpt list {self.layout.root}` or set resume.mode: auto"
                )
            return self.load(path, **objects)
        candidates = sorted(self.layout.committed_steps().items(), reverse=True)
        if not candidates:
            logger.info("resume.mode=auto: no checkpoint in %s, starting fresh", self.layout.root)
            return None
        failures = []
        for _step, path in candidates:
            try:
                return self.load(path, **objects)
            except CorruptCheckpointError as err:
                if self.config.resume.on_corrupt == "error":
                    raise
                failures.append(f"{path.name}: {err}")
                logger.warning("checkpoint %s is unusable (%s); falling back to the previous complete checkpoint", path, err)
        raise CorruptCheckpointError(self.layout.root, "no loadable checkpoint: " + " | ".join(failures))

    def load(
        self,
        path: str | os.PathLike,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        dataloader: Any | None = None,
        weights_only: bool | None = None,
    ) -> ResumeState:
        """Load one checkpoint directory into the given objects.

        Verifies the manifest first (sizes always, sha256 when `verify_on_resume`), so a
        damaged checkpoint is refused before anything is modified.
        """
        path = Path(path)
        started = time.perf_counter()
        weights_only = self.config.resume.load_weight_only if weights_only is None else weights_only
        info = self._verified_info(path)
        load_consolidated(model, path / CONSOLIDATED_DIR)
        state = ResumeState(
            step=int(info["step"]), path=path, epoch=info.get("epoch"), metrics=info.get("metrics") or {},
            extra=info.get("extra") or {}, weights_only=weights_only,
        )
        if not weights_only:
            self._load_training_state(path, info, model, optimizer, scheduler, dataloader)
        logger.info("resumed from %s (step %d%s) in %.2fs", path, state.step, ", weights only" if weights_only else "", time.perf_counter() - started)
        return state

    def _verified_info(self, path: Path) -> dict[str, Any]:
        error, info = None, None
        if distributed.rank() == 0:
            try:
                info = verify_checkpoint(path, checksums=self.config.verify_on_resume)
            except CorruptCheckpointError as err:
                error = (str(err.path), err.reason)
        error, info = distributed.broadcast_object((error, info))
        if error is not None:
            raise CorruptCheckpointError(*error)
        return info

    def _load_training_state(self, path: Path, info: dict[str, Any], model, optimizer, scheduler, dataloader) -> None:
        manifest = info["manifest"]
        rank = distributed.rank()
        if optimizer is not None:
            if not any(name.startswith(OPTIM_DIR + "/") for name in manifest):
                raise CheckpointError(
                    f"{path} has no optimizer state (saved with save_optimizer: false); pass optimizer=None "
                    "or set resume.load_weight_only: true to start with a fresh optimizer"
                )
            load_optimizer(unwrap_model(model), optimizer, path / OPTIM_DIR)
        if scheduler is not None:
            load_scheduler(scheduler, path / SCHEDULER_JSON)
        if dataloader is not None:
            load_dataloader(dataloader, path / dataloader_file(rank))
        if rng_file(rank) in manifest:
            load_rng(path / rng_file(rank))
        else:
            logger.warning("%s has no RNG state for rank %d (saved with world size %s); RNG streams not restored", path, rank, info.get("world_size"))

    # ============================================================= lifecycle
    def finalize(self, terminate: bool = True) -> None:
        """Finish background work before the process exits. The synchronous manager has none."""
        distributed.barrier()


def load_manager_class(dotted: str) -> type:
    """Import `package.module.Class` and check it implements the manager protocol."""
    module_name, _, class_name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"checkpoint_manager_class {dotted!r} cannot be imported: {err}") from err
    missing = [name for name in PROTOCOL_METHODS if not callable(getattr(cls, name, None))]
    if missing:
        raise TypeError(
            f"checkpoint_manager_class {dotted!r} does not implement the checkpoint manager protocol: "
            f"missing method(s) {', '.join(missing)} (needs {', '.join(PROTOCOL_METHODS)})"
        )
    return cls


def create_manager(config: CheckpointConfig, **kwargs: Any) -> CheckpointManagerProtocol:
    """The manager `config` asks for: `checkpoint_manager_class` if set, else `CheckpointManager`."""
    cls = load_manager_class(config.checkpoint_manager_class) if config.checkpoint_manager_class else CheckpointManager
    return cls(config, **kwargs)
