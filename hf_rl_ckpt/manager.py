"""`CheckpointManager`: save, retain, resume. The framework-agnostic core.

Integrations (Trainer callback, Accelerate hooks, RL frameworks) only decide *when* to save
and hand over their objects; this module decides *how*: every file is written under
`.incomplete/<name>/`, fsynced, listed with size and sha256 in `training_info.json` (the
last file written), and only then renamed into place. A crash at any instant therefore
leaves either the old set of checkpoints or the old set plus one whole new checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import operator
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
from .atomic import atomic_write_json, fsync_dir, fsync_tree, write_bytes
from .config import STEP_METRIC, CheckpointConfig, parse_duration, parse_size, redact_secrets
from .errors import CheckpointError, CheckpointNotFoundError, CheckpointSaveError, ConfigError, CorruptCheckpointError, StateMismatchError
from .faultpoint import faultpoint
from .hub.card import Leaderboard, branch_for, card_rows, render_model_card
from .hub.publish import HubPublisher
from .lock import DirectoryLock, ReadOnlyCheckpointDirError
from .layout import (
    ADAPTER_DIR,
    COMMIT_SEQ,
    CONFIG_YAML,
    CONSOLIDATED_DIR,
    FORMAT_VERSION,
    MODEL_CARD,
    OPTIM_DIR,
    SCHEDULER_JSON,
    SHARDED_DIR,
    TRAINING_INFO,
    CheckpointLayout,
    dataloader_file,
    deployable_dir,
    rng_file,
    safe_join,
)
from .registry import Registry, in_commit_order, record_from_training_info, retention_saved_under
from .retention import RetentionPolicy, metric_value
from .async_save import (
    AsyncCheckpointWriter,
    RankMarkers,
    SavePart,
    background_failure,
    hold_for_tests,
    run_parts,
)
from .state import jsoncodec
from .state.dataloader import capture_dataloader, load_dataloader
from .state.model import deduplicated_state_dict, load_consolidated, save_consolidated, save_hf_metadata, save_weights, unwrap_model, weights_dtype
from .state.optim import capture_optimizer, check_optimizer_fits, load_optimizer, write_optimizer_dcp, write_optimizer_tensors
from .state.peft import is_peft_model, load_adapter, save_adapter
from .state.rng import capture_rng, load_rng
from .state.safetensors_io import tensors_from_buffer, write_safetensors
from .state.scheduler import capture_scheduler, load_scheduler
from .state.sharded import is_sharded, load_sharded, save_sharded
from .verify import available_memory, build_manifest, read_training_info, read_verified, verify_checkpoint
from .weight_sync import publish

logger = logging.getLogger("hf_rl_ckpt")

_REPLACED_PREFIX = "replaced-"
_EVICTED_PREFIX = "evicted-"


@runtime_checkable
class CheckpointManagerProtocol(Protocol):
    """Exactly what the integrations call on a manager; a custom `checkpoint_manager_class` must provide all of it.

    `CheckpointCallback` calls every member (the Trainer's resume path restores weights,
    optimizer and RNG at different moments); `register_checkpointing` needs a
    `CheckpointManager` subclass, since Accelerate's hooks also use its layout.
    """

    def save(self, step: int, **state: Any) -> Path | None: ...

    def load(self, path: str | os.PathLike, **state: Any) -> "ResumeState": ...

    def resume(self, *, model: torch.nn.Module, mode: str | None = None, **state: Any) -> "ResumeState | None": ...

    def load_optimizer_state(self, path: str | os.PathLike, *, model: torch.nn.Module, optimizer: Any, scheduler: Any = None) -> None: ...

    def load_rng_state(self, path: str | os.PathLike) -> None: ...

    def sync_weights(self, step: int, *, model: torch.nn.Module, tokenizer: Any | None = None) -> Path | None: ...

    def should_save(self, step: int) -> bool: ...

    def should_load(self) -> bool: ...

    def latest(self) -> Path | None: ...

    @property
    def deadline_reached(self) -> bool: ...

    def finalize(self, terminate: bool = True) -> None: ...


#: The members of `CheckpointManagerProtocol`, checked on a `checkpoint_manager_class` when it is loaded.
PROTOCOL_MEMBERS = tuple(name for name in vars(CheckpointManagerProtocol) if not name.startswith("_"))


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


def model_dir_for(model: torch.nn.Module) -> str:
    """Where a checkpoint keeps `model`'s weights: the adapter alone for a PeftModel, else the consolidated model."""
    return ADAPTER_DIR if is_peft_model(unwrap_model(model)) else CONSOLIDATED_DIR


def _prefixed(folder: str, digests: Mapping[str, tuple[int, str]]) -> dict[str, tuple[int, str]]:
    return {f"{folder}/{name}": digest for name, digest in digests.items()}


def _nothing() -> dict[str, tuple[int, str]]:
    """The write of a part this rank has nothing to write for."""
    return {}


def checked_step(step: Any) -> int:
    """`step` as an int, or CheckpointSaveError before anything is written: a checkpoint's name encodes its step."""
    try:
        if isinstance(step, bool):
            raise TypeError
        number = operator.index(step)  # int, numpy and 0-d tensor integers; not floats or strings
    except TypeError:
        number = None
    if number is None or number < 0:
        raise CheckpointSaveError(
            f"step {step!r} ({type(step).__name__}) cannot name a checkpoint: pass the global step, an integer >= 0"
        )
    return number


def _describe_retention(policy: RetentionPolicy) -> str:
    return f"keep_top_k={policy.keep_top_k}, metric_name={policy.metric_name!r}, higher_is_better={policy.higher_is_better}"


class BaseCheckpointManager:
    """Policies shared by every manager: when to save, what to keep, where checkpoints are.

    Subclasses add the I/O. Nothing here writes a file except `apply_retention`'s deletions.
    """

    def __init__(self, config: CheckpointConfig) -> None:
        self.config = config
        self.layout = CheckpointLayout(config.checkpoint_dir, config.checkpoint_name_template)
        self.registry = Registry(self.layout)
        self.policy = RetentionPolicy(config.keep_top_k, config.metric_name, config.higher_is_better)
        if config.enabled and self.layout.root.exists() and not self.layout.root.is_dir():
            raise ConfigError(
                f"checkpoint_dir {self.layout.root} is a file, not a directory; point checkpoint_dir at a directory "
                "(it is created if missing)"
            )
        if config.enabled:
            self._check_name_template()
        self._reported_kept: set[int] = set()  # steps already named as kept by other retention settings
        self._started = time.monotonic()
        self._deadline = (
            parse_duration(config.checkpoint_must_save_by, "checkpoint_must_save_by") if config.checkpoint_must_save_by else None
        )
        self._deadline_saved = False
        self._warned_unranked = False

    def _check_name_template(self) -> None:
        """Refuse a `checkpoint_name_template` other than the one this directory's checkpoints are named by.

        Under another template they would not parse as checkpoints: the run would silently start
        fresh next to them, and the start would drop them from the index. Checked before anything is written.
        """
        recorded = CheckpointLayout.of_run(self.layout.root)
        if recorded.name_template == self.layout.name_template:
            return
        named = [path.name for path in recorded.committed_steps().values()]
        if named:
            raise ConfigError(
                f"checkpoint_name_template {self.layout.name_template!r} does not name the checkpoints already in "
                f"{self.layout.root}: they are named by {recorded.name_template!r} ({', '.join(named[:5])}{', ...' if len(named) > 5 else ''}). "
                f"Keep checkpoint_name_template: {recorded.name_template!r} for this checkpoint_dir, or use a new checkpoint_dir"
            )

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
        """Registry rows of committed checkpoints in commit order, the newest last (step, metrics, top_k_rank, ...).

        Only rows of checkpoints still on disk: one deleted by hand stays in the index until the
        next save or start reconciles it, and must not be listed (or returned by `best()`) meanwhile.
        """
        committed = self.layout.committed_steps()
        return [row for row in self.registry.records() if row["step"] in committed]

    def latest(self) -> Path | None:
        """The newest committed checkpoint (the most recent commit, not the highest step), or None."""
        committed = list(self.layout.committed_steps().values())
        return committed[-1] if committed else None

    def best(self) -> Path | None:
        """The best committed checkpoint by `metric_name` (the newest when no metric ranks)."""
        values = self._metric_values(self.checkpoints())
        ranking = self.policy.ranking(values)
        if ranking:
            return self.layout.step_dir(ranking[0])
        return self.latest()

    def consolidated_path(self, step: int | None = None) -> Path:
        """The deployable folder of a checkpoint (the newest when `step` is None): hand this to vLLM/SGLang.

        For a PEFT run that is the adapter folder (`model/adapter`, served with the base model
        named in its adapter_config.json); otherwise the consolidated HF folder.
        """
        path = self.layout.step_dir(step) if step is not None else self.latest()
        if path is None or not (path / TRAINING_INFO).is_file():
            raise CheckpointNotFoundError(f"no committed checkpoint{f' for step {step}' if step is not None else ''} in {self.layout.root}")
        return path / (deployable_dir(path) or CONSOLIDATED_DIR)

    def _metric_values(self, rows: list[dict[str, Any]]) -> dict[int, float | None]:
        """Step -> the value that ranks it, in the order of `rows`.

        A recorded value that cannot rank (saved under another metric_name, or NaN written
        by an older version) counts as missing: it was not checked as a ranking metric when saved.
        """
        values: dict[int, float | None] = {}
        for row in rows:
            try:
                values[row["step"]] = metric_value(row.get("metrics"), self.config.metric_name, row["step"])
            except CheckpointError:
                values[row["step"]] = None
        return values

    # ------------------------------------------------------------- retention
    def apply_retention(self, data: dict[str, Any]) -> list[int]:
        """Evict what the policy does not retain, logging why; update `data` (the registry) in place.

        The newest checkpoint is the most recent commit (the last row in commit order), so a
        save made after resuming from an older step is never evicted for its low step number.
        A checkpoint committed under other retention settings (`keep_top_k`, `metric_name`,
        `higher_is_better` changed on a restart) is never evicted: the new settings would
        re-rank it by a rule it was not saved under, so it is kept and named in a warning
        instead, for the user to delete by hand.

        Crash-safe order: each evicted directory is first renamed into `.trash/` (one atomic
        step: it stops being a checkpoint), then the registry is rewritten, then the trash
        is deleted. A crash in between leaves only trash, which the next start removes.
        """
        rows = in_commit_order(data["checkpoints"])
        values = self._metric_values(rows)
        retained = self.policy.retained(values)
        ranking = self.policy.top_k(values)
        kept = self._saved_under_other_settings(rows, data, evictable=set(values) - retained)
        evicted = [step for step in values if step not in retained and step not in kept]
        trash = []
        if evicted:
            self.layout.trash_root.mkdir(exist_ok=True)
            for step in evicted:
                logger.info("evicting %s: %s", self.layout.step_dir(step), self._eviction_reason(step, values, ranking))
                target = self.layout.trash_root / f"{_EVICTED_PREFIX}{self.layout.step_name(step)}"
                shutil.rmtree(target, ignore_errors=True)
                os.rename(self.layout.step_dir(step), target)
                trash.append(target)
            fsync_dir(self.layout.root)
            faultpoint("retention.after_trash")
        for row in rows:  # recorded per row, so that the settings below do not become theirs
            saved_under = retention_saved_under(row, data)
            row["retention"] = dataclasses.asdict(saved_under) if saved_under is not None else None
        data["checkpoints"] = [row for row in rows if row["step"] not in evicted]
        for row in data["checkpoints"]:
            row["top_k_rank"] = ranking.index(row["step"]) + 1 if row["step"] in ranking else None
        data.update(
            metric_name=self.config.metric_name,
            higher_is_better=self.config.higher_is_better,
            keep_top_k=self.config.keep_top_k,
        )
        self.registry.write(data)
        faultpoint("retention.before_delete")
        for target in trash:
            shutil.rmtree(target)
        return evicted

    def _eviction_reason(self, step: int, values: Mapping[int, float | None], ranking: list[int]) -> str:
        """Why retention evicts `step`, for the log line every eviction gets."""
        k, name = self.config.keep_top_k, self.config.metric_name
        if values[step] is None:
            return f"it has no metric '{name}' to rank by in keep_top_k={k}, and it is no longer the newest checkpoint"
        if name == STEP_METRIC:
            return f"keep_top_k={k} with metric_name 'step' keeps the {k} most recent checkpoint(s)"
        cutoff = ranking[-1]
        return (
            f"its {name}={values[step]:.6g} is not in the top {k} ({'higher' if self.config.higher_is_better else 'lower'} is better; "
            f"the top {k} ends at step {cutoff} with {values[cutoff]:.6g}), and it is no longer the newest checkpoint"
        )

    def _saved_under_other_settings(self, rows: list[dict[str, Any]], data: dict[str, Any], evictable: set[int]) -> set[int]:
        """The `evictable` steps committed under retention settings other than this run's: kept, and named once in a warning."""
        kept: dict[RetentionPolicy, list[int]] = {}
        for row in rows:
            saved_under = retention_saved_under(row, data)
            if row["step"] in evictable and saved_under is not None and saved_under != self.policy:
                kept.setdefault(saved_under, []).append(row["step"])
        for saved_under, steps in kept.items():
            news = [step for step in steps if step not in self._reported_kept]
            if news:
                self._reported_kept.update(news)
                logger.warning(
                    "keeping %s although this run's retention settings (%s) would evict them: they were saved under "
                    "other settings (%s), and retention never deletes what earlier settings kept. Delete the ones you "
                    "no longer need by hand (rm -r %s); the registry catches up at the next start",
                    ", ".join(self.layout.step_name(step) for step in news), _describe_retention(self.policy),
                    _describe_retention(saved_under), " ".join(str(self.layout.step_dir(step)) for step in news),
                )
        return {step for steps in kept.values() for step in steps}


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
        self._publisher: HubPublisher | None = None
        self._lock = DirectoryLock(self.layout.root)
        self._async = AsyncCheckpointWriter()  # async_save: the staging buffer and the background write + commit
        self.read_only = False
        # Like checkpoint_dir (see CheckpointLayout): resolved once, so an os.chdir cannot move where weights are published.
        self._sync_weight_path = os.path.abspath(config.sync_weight_path) if config.sync_weight_path else None
        if config.enabled and distributed.rank() == 0:
            try:
                self.layout.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"checkpoint_dir {self.layout.root} cannot be created: {err}") from err
            try:
                self._lock.acquire()  # before _recover: it deletes what another live writer may be staging
            except ReadOnlyCheckpointDirError as err:
                self.read_only = True
                logger.warning("%s: resuming works, saving will fail", err)
            self._recover()
            if not self.read_only:
                self._warn_about_other_retention_settings()
            if config.push_to_hub and not self.read_only:  # publishing records its progress in checkpoints.json
                self._publisher = HubPublisher(config, self.registry)
                self._publisher.enqueue()  # finish what an earlier process left pending
        distributed.barrier()

    def _recover(self) -> None:
        """Finish or undo what an interrupted process left behind, and re-index (only report it in a read-only dir)."""
        if self.read_only:
            leftovers = [p for d in (self.layout.incomplete_root, self.layout.trash_root) if d.is_dir() for p in sorted(d.iterdir())]
            if leftovers:
                logger.warning("cannot clean up after an interrupted process in read-only %s: %s", self.layout.root, ", ".join(map(str, leftovers)))
            return
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
                    logger.info("removing %s: an eviction or replacement interrupted by a crash left it there (no longer a checkpoint)", entry)
                    shutil.rmtree(entry)
            fsync_dir(self.layout.root)
        self.registry.reconcile()

    def _warn_about_other_retention_settings(self) -> None:
        """At start: name the checkpoints saved under other retention settings that this run's would evict (they are kept)."""
        if self.config.keep_top_k is None:
            return
        data = self.registry.read()
        rows = in_commit_order(data["checkpoints"])
        values = self._metric_values(rows)
        self._saved_under_other_settings(rows, data, evictable=set(values) - set(self.policy.top_k(values)))

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
        extra_files: Mapping[str, bytes] | None = None,
    ) -> Path | None:
        """Write one checkpoint for `step` and commit it atomically; apply top-k retention.

        Args:
            step: the global step, an integer >= 0; names the checkpoint (`step_<N>`).
            model: the model (DDP/Accelerate-wrapped or `torch.compile`d is fine); saved as a consolidated HF folder.
            optimizer, scheduler: saved for exact resume (`save_optimizer` can turn the first off).
            dataloader: something with `state_dict()`/`load_state_dict()`, e.g. `ResumableDataLoader`.
            metrics: numbers for `training_info.json` and top-k ranking (`metric_name`); numpy and
                0-d tensor scalars are recorded as numbers, NaN/infinity as null (see `jsoncodec.plain`).
            tokenizer: saved into the consolidated folder so it is deployable as is.
            epoch: recorded in `training_info.json`.
            extra_state: any JSON-able dict with str keys (e.g. your loop counters), returned by
                `resume` as `.extra`; recorded like `metrics`.
            extra_files: small files to store at the checkpoint root, by name (e.g. the Trainer's
                `trainer_state.json`); listed in the manifest like every other file.

        Returns:
            The committed checkpoint directory (None when checkpointing is disabled). With
            `async_save`, the directory it will have once the background commit is done:
            `save` returns as soon as the state is staged in host memory; the next `save`
            (only if that one is still running) and `finalize()` wait for it.

        Raises:
            CheckpointSaveError: a write failed on some rank; nothing was committed and
                earlier checkpoints are intact. With `async_save`, a background failure is
                raised by the next `save` (or `finalize`), on every rank. Also, before
                anything is written, for a step that is not an integer >= 0 and for a value
                in `metrics`/`extra_state` that JSON cannot hold (naming its key).
        """
        if not self.config.enabled:
            return None
        step, metrics, epoch, extra_state = self._checked_record(step, metrics, epoch, extra_state)
        self._drain_async_save()
        started = time.perf_counter()
        if self.config.metric_name and self.config.keep_top_k and metric_value(metrics, self.config.metric_name, step) is None:
            # Periodic saves between evaluations routinely lack an eval metric: say it once per run, not every save.
            log = logger.debug if self._warned_unranked else logger.warning
            self._warned_unranked = True
            log(
                "metric '%s' is not among this save's metrics (%s) at step %d; the checkpoint cannot rank in top-%d "
                "and is kept only while it is the newest", self.config.metric_name, ", ".join(metrics) or "none", step, self.config.keep_top_k,
            )
        staging = self.layout.incomplete_dir(step)
        error = None
        if distributed.rank() == 0:
            try:
                self._prepare_staging(staging)
            except (OSError, CheckpointError) as err:  # read-only dir, lock taken by another process, disk full: reported below
                error = err
        self._raise_if_any_rank_failed(step, staging, error)
        faultpoint("save.staged")
        parts: list[SavePart] = []
        error = None
        try:
            parts = self._state_parts(staging, step, metrics, model, optimizer, scheduler, dataloader, tokenizer, extra_files or {})
        except Exception as err:  # e.g. a dataloader without state_dict(): reported to every rank below
            error = err
        self._raise_if_any_rank_failed(step, staging, error)
        in_background = self.config.async_save
        digests: dict[str, tuple[int, str]] = {}
        here = [save_part for save_part in parts if not (in_background and save_part.background)]
        # A single process writes the parts concurrently (hashing on several cores); ranks of a job one by one.
        for part, error in run_parts(here, concurrently=not distributed.is_distributed()):
            self._raise_if_any_rank_failed(step, staging, error)  # a failure is reported to every rank, then re-raised with the rank named
            digests.update(part)
            faultpoint("save.part_written")
        if in_background:
            staged = [save_part for save_part in parts if save_part.background]
            return self._save_in_background(step, staging, staged, digests, metrics, epoch, extra_state, model, started)
        all_digests: dict[str, tuple[int, str]] = {}
        for rank_digests in distributed.all_gather_object(digests):
            all_digests.update(rank_digests)
        error = None
        if distributed.rank() == 0:
            try:
                self._commit(step, staging, all_digests, metrics, epoch, extra_state, model, started)
            except Exception as err:  # sealing failed before the rename (disk full, I/O error): reported, staging removed
                error = err
        self._raise_if_any_rank_failed(step, staging, error)
        return self.layout.step_dir(step)

    def _checked_record(self, step: Any, metrics, epoch, extra_state) -> tuple[int, dict[str, Any], Any, dict[str, Any]]:
        """What `save` records about a checkpoint, as plain JSON; refused (CheckpointSaveError naming the key) before anything is written.

        The ranking metric is checked first, as given: NaN or infinity cannot rank (the other
        values record a non-finite number as null, see `jsoncodec.plain`).
        """
        step = checked_step(step)
        metric_value(metrics, self.config.metric_name, step)
        return (
            step, jsoncodec.plain(dict(metrics or {}), "metrics"), jsoncodec.plain(epoch, "epoch"),
            jsoncodec.plain(dict(extra_state or {}), "extra_state"),
        )

    def _prepare_staging(self, staging: Path) -> None:
        """Rank 0: an empty `.incomplete/<name>/`, after checking this process may write the directory."""
        if self.read_only:
            raise ReadOnlyCheckpointDirError(f"{self.layout.root} is read-only (found at start); earlier checkpoints are untouched")
        self._lock.acquire()  # a no-op while held; takes it again after finalize() released it
        # Checkpoints deleted by hand since the last commit leave the index now: retention could not move them away.
        self.registry.reconcile()
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)

    def _state_parts(
        self, staging: Path, step: int, metrics: Mapping[str, Any], model, optimizer, scheduler, dataloader, tokenizer, extra_files
    ) -> list[SavePart]:
        """The parts of a checkpoint in write order, each holding what it will write as of this call.

        Building them captures the state: small state as bytes, tensors by reference (an
        async save copies them into its staging buffer before the training loop resumes, a
        synchronous one writes them from where they are, holding no second copy). Each part
        writes into `staging` and returns digests computed while writing. Parts may run
        collectives (DCP) and every rank runs them in the same order; `save` checks for a
        failure on any rank after each part, so a rank that failed never leaves the others
        waiting in a collective it will not join.
        """
        return [
            self._model_part(staging, model, tokenizer, extra_files),
            self._optimizer_part(staging, model, optimizer),
            self._rank_state_part(staging, scheduler, dataloader),
            SavePart("model card", lambda: self._write_card_part(staging, step, metrics), after_others=True),  # reads config.yaml, config.json
        ]

    def _model_part(self, staging: Path, model, tokenizer, extra_files) -> SavePart:
        """The weights: per-rank shards (every rank) + consolidated folder for a sharded model, else rank 0's folder."""
        inner = unwrap_model(model)
        rank0 = distributed.rank() == 0
        extra_files = dict(extra_files)  # as of this call (an async save writes them later)

        def write_extra_files() -> dict[str, tuple[int, str]]:
            return {name: write_bytes(safe_join(staging, name), data) for name, data in extra_files.items()} if rank0 else {}

        if is_sharded(inner) and not is_peft_model(inner):

            def write_sharded() -> dict[str, tuple[int, str]]:
                consolidated = staging / CONSOLIDATED_DIR if self.config.save_consolidated else None
                save_sharded(inner, staging / SHARDED_DIR, consolidated, max_shard_size=self._max_shard_size, tokenizer=tokenizer)
                return write_extra_files()

            return SavePart("model", write_sharded, background=False)  # DCP collectives
        if not rank0:
            return SavePart("model", _nothing)
        if is_peft_model(inner):  # save_adapter reads the live adapter: written in the training thread (adapters are small)
            return SavePart("model", lambda: {**_prefixed(ADAPTER_DIR, save_adapter(inner, staging / ADAPTER_DIR, tokenizer=tokenizer)), **write_extra_files()}, background=False)
        out = staging / CONSOLIDATED_DIR
        out.mkdir(parents=True, exist_ok=True)
        save_hf_metadata(inner, out, tokenizer)  # small, and now: a tokenizer must not be saved from another thread

        def write_weights(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
            weights = save_weights(state, out, self._max_shard_size, self.config.model_save_format)
            return {**_prefixed(CONSOLIDATED_DIR, weights), **write_extra_files()}

        return SavePart("model", write_weights, tensors=deduplicated_state_dict(inner))

    def _optimizer_part(self, staging: Path, model, optimizer) -> SavePart:
        """The optimizer state: streamed by rank 0 when unsharded (single process, DDP replicas), else DCP on every rank."""
        if optimizer is None or not self.config.save_optimizer:
            return SavePart("optimizer", _nothing)
        inner = unwrap_model(model)
        snapshot = capture_optimizer(inner, optimizer)
        out = staging / OPTIM_DIR
        if snapshot.plain and not is_sharded(inner):  # every rank holds the whole (replicated) state, like the model itself
            if distributed.rank() != 0:
                return SavePart("optimizer", _nothing)
            return SavePart(
                "optimizer", lambda tensors: _prefixed(OPTIM_DIR, write_optimizer_tensors(tensors, snapshot.rest, out)),
                tensors=snapshot.tensors, written_by_step=optimizer,
            )
        return SavePart("optimizer", lambda: _prefixed(OPTIM_DIR, write_optimizer_dcp(snapshot, out)), background=False)  # collective

    def _rank_state_part(self, staging: Path, scheduler, dataloader) -> SavePart:
        """Small per-rank files (dataloader position, RNG) and rank 0's scheduler and config; no collectives.

        Captured now as bytes (and the RNG streams as fresh tensors), written by the part.
        """
        rank = distributed.rank()
        files: dict[str, bytes] = {}
        if scheduler is not None and rank == 0:
            files[SCHEDULER_JSON] = capture_scheduler(scheduler)
        if dataloader is not None:
            files[dataloader_file(rank)] = capture_dataloader(dataloader)
        if rank == 0:
            document = {"checkpoint": self.config.to_dict(redact=True), "training": redact_secrets(self.training_config)}
            files[CONFIG_YAML] = yaml.safe_dump(document, sort_keys=False).encode()
        rng_tensors, rng_metadata = capture_rng()

        def write() -> dict[str, tuple[int, str]]:
            digests: dict[str, tuple[int, str]] = {}
            for name, data in files.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                digests[name] = write_bytes(target, data)  # no per-file fsync: the commit fsyncs the staging tree
            (staging / "rng").mkdir(exist_ok=True)
            digests[rng_file(rank)] = write_safetensors(staging / rng_file(rank), rng_tensors, rng_metadata)
            return digests

        return SavePart("rank state", write)

    def _save_in_background(
        self, step: int, staging: Path, parts: list[SavePart], digests, metrics, epoch, extra_state, model, started: float
    ) -> Path:
        """`async_save`, training thread: copy the parts' tensors into the staging buffer, then hand write + commit to the thread."""
        markers = RankMarkers(staging)
        error, deferred = None, []
        try:
            if distributed.rank() == 0:
                markers.reset()
            deferred = self._async.stage(parts)  # optimizer state: copied by the thread before the optimizer's next step
        except Exception as err:  # reported to every rank below, then re-raised with the rank named
            error = err
        self._raise_if_any_rank_failed(step, staging, error)
        self._async.submit(
            step, lambda: self._write_and_commit(step, staging, parts, digests, markers, metrics, epoch, extra_state, model, started, deferred)
        )
        logger.info("async save of step %d staged in %.3fs (%.1f MB buffered); writing and committing in the background",
                    step, time.perf_counter() - started, self._async.buffer.nbytes() / 1e6)
        return self.layout.step_dir(step)

    def _write_and_commit(self, step, staging, parts, digests, markers: RankMarkers, metrics, epoch, extra_state, model, started, deferred=()) -> None:
        """`async_save`, background thread: write the staged parts; rank 0 commits once every rank reported. No collectives."""
        rank, world = distributed.rank(), distributed.world_size()
        error = None
        try:
            for deferred_copy in deferred:  # first: the training loop's next optimizer step waits for these
                deferred_copy.run(self._async.buffer)
            for save_part in parts:
                digests.update(save_part.run())
                faultpoint("save.part_written")
                hold_for_tests()
        except Exception as err:
            error = err
        if world > 1:
            markers.report(rank, digests, error)
        if rank != 0:
            if error is not None:
                raise error
            return
        try:
            all_digests = digests
            if world > 1:  # wait for every rank, even after a failure here, so nothing is written after the clean-up
                try:
                    all_digests = markers.collect(world, staging)
                except CheckpointSaveError:
                    if error is None:
                        raise
            if error is not None:
                raise error
            self._commit(step, staging, all_digests, metrics, epoch, extra_state, model, started)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            markers.reset()

    def _drain_async_save(self) -> None:
        """Wait for the async save in flight, if any; if it failed on any rank, raise on every rank.

        Runs in the training thread (the only place collectives run), at the start of every
        `save` and in `finalize`, so a background failure is never silent.
        """
        if not self.config.async_save:
            return
        failure = self._async.wait()
        reports = distributed.all_gather_object(None if failure is None else (failure[0], f"{type(failure[1]).__name__}: {failure[1]}"))
        failed = {rank: report for rank, report in enumerate(reports) if report is not None}
        if not failed:
            return
        if failure is not None:
            raise background_failure(failure[0], failure[1], self.latest())
        step = next(iter(failed.values()))[0]
        detail = "; ".join(f"rank {rank}: {report[1]}" for rank, report in failed.items())
        raise CheckpointSaveError(f"the background (async) save of step {step} failed ({detail}); nothing was committed")

    def _write_card_part(self, staging: Path, step: int, metrics: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
        """README.md (rank 0): the model card as of this save, so it is in the manifest.

        Its leaderboard is the one this commit produces. A committed checkpoint is never
        rewritten, so the local card stays as of the save; the Hub publisher re-renders the
        card with the current leaderboard on every push.
        """
        if distributed.rank() != 0:
            return {}
        board = Leaderboard.from_rows(card_rows(self.registry.records(), step, metrics), self.policy)
        publishing = self.config.push_to_hub
        card = render_model_card(
            staging, step=step, metrics=metrics, leaderboard=board, local_path=self.layout.step_dir(step),
            repo_id=self.config.hub_model_id if publishing else None, revision=branch_for(step) if publishing else None,
        )
        return {MODEL_CARD: write_bytes(staging / MODEL_CARD, str(card).encode())}  # sealed by the commit's fsync_tree

    def _write_model(self, model: torch.nn.Module, out_dir: Path, tokenizer: Any | None) -> dict[str, tuple[int, str]]:
        """The deployable weights folder of `model` (see `model_dir_for`); digests by file name."""
        inner = unwrap_model(model)
        if is_peft_model(inner):
            return save_adapter(inner, out_dir, tokenizer=tokenizer)
        return save_consolidated(
            inner, out_dir, max_shard_size=self._max_shard_size, tokenizer=tokenizer, weights_format=self.config.model_save_format
        )

    def sync_weights(self, step: int, *, model: torch.nn.Module, tokenizer: Any | None = None) -> Path | None:
        """Publish the weights to `sync_weight_path` for an inference engine, every `sync_weight_period` steps.

        Only the deployable folder is written (consolidated weights, or the adapter of a
        PeftModel), to a fresh version folder that is swapped in atomically: see
        `hf_rl_ckpt.weight_sync` for what readers can rely on. Returns the published folder
        on rank 0 on a sync step, else None.
        """
        if not self.config.enabled or not self._sync_weight_path or step % self.config.sync_weight_period:
            return None
        published = None
        if distributed.rank() == 0:
            published = publish(self._sync_weight_path, self.layout.step_name(step), lambda out: self._write_model(model, out, tokenizer))
            logger.info("published weights of step %d to %s -> %s", step, self._sync_weight_path, published)
        distributed.barrier()
        return published

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
            f"saving step {step} failed ({detail}); nothing was committed to {self.layout.root}"
            + (f", the previous checkpoint {previous} is intact" if previous else "")
        ) from error

    def stage(self, step: int) -> Path:
        """An empty `.incomplete/<name>/` for a framework that writes a checkpoint's files itself; commit it with `commit_staged`."""
        staging = self.layout.incomplete_dir(checked_step(step))
        self._prepare_staging(staging)
        return staging

    def commit_staged(self, step: int, *, metrics: Mapping[str, Any] | None = None, extra_state: Mapping[str, Any] | None = None) -> Path:
        """Commit what a framework wrote into `stage(step)` as it is: manifest, seal, rename into place, retention.

        Single-process API (the NeMo-RL driver's `init_tmp_checkpoint`/`finalize_checkpoint`,
        see `hf_rl_ckpt.compat.nemo_rl`); every file written there is listed in the manifest.
        """
        staging = self.layout.incomplete_dir(checked_step(step))
        if not staging.is_dir():
            raise CheckpointError(f"nothing staged for step {step} at {staging}; call stage({step}) first")
        try:
            step, metrics, _epoch, extra_state = self._checked_record(step, metrics, None, extra_state)
            self._commit(step, staging, {}, metrics, None, extra_state, None, time.perf_counter())
        except Exception as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointSaveError(f"committing step {step} failed ({err}); nothing was committed to {self.layout.root}") from err
        return self.layout.step_dir(step)

    def _commit(self, step, staging, digests, metrics, epoch, extra_state, model, started) -> None:
        inner = unwrap_model(model) if model is not None else None
        info = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "metrics": metrics,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            COMMIT_SEQ: self.registry.next_commit_seq(),  # what makes it the newest checkpoint, whatever its step
            "retention": dataclasses.asdict(self.policy),  # retention never evicts it under other settings
            "save_seconds": None,
            "world_size": distributed.world_size(),
            "versions": library_versions(),
            "model": {
                "class": type(inner).__name__,
                "num_parameters": sum(p.numel() for p in inner.parameters()),
                "dtype": str(dtype).removeprefix("torch.") if (dtype := weights_dtype(inner)) is not None else None,
            } if inner is not None else None,
            "extra": extra_state,
            "manifest": build_manifest(staging, digests),
        }
        info["save_seconds"] = round(time.perf_counter() - started, 3)
        atomic_write_json(staging / TRAINING_INFO, info)
        faultpoint("commit.before_fsync")
        fsync_tree(staging)
        faultpoint("commit.before_rename")
        final = self.layout.step_dir(step)
        if final.exists():
            self._replace(final, staging)
        else:
            os.rename(staging, final)
        fsync_dir(self.layout.root)
        fsync_dir(self.layout.incomplete_root)
        faultpoint("commit.after_rename")
        try:
            with self.registry.lock:
                data = self.registry.read()
                data["checkpoints"] = [row for row in data["checkpoints"] if row.get("step") != step]
                data["checkpoints"].append(record_from_training_info(step, final.name, info))
                data.setdefault("history", []).append({"step": step, "metrics": info["metrics"]})
                evicted = self.apply_retention(data)
        except OSError as err:  # the checkpoint is whole and in place; only its index lags, and `_recover` rebuilds that
            logger.error(
                "checkpoint step %d is committed at %s, but updating %s failed (%s); the index and top-k retention "
                "catch up at the next start", step, final, self.layout.registry_path, err,
            )
            return
        faultpoint("commit.before_hub_enqueue")
        if self._publisher is not None:
            self._publisher.enqueue()  # local bookkeeping only; the upload runs in the publisher's thread
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
        mode: str | None = None,
    ) -> ResumeState | None:
        """Resume according to `config.resume` (or `mode`, when given); None means a fresh start.

        `auto` picks the newest complete checkpoint (the most recent commit: after a resume
        from an older step, the new timeline's); if it fails verification it falls back to
        the one committed before it, with a warning naming the problem (`resume.on_corrupt:
        error` raises instead). `from_path` loads `resume.resume_path` and fails if it is missing.
        """
        mode = mode or self.config.resume.mode
        if not self.config.enabled or mode == "disable":
            logger.info("resume.mode=%s: starting fresh", mode if self.config.enabled else "disabled checkpointing")
            return None
        objects = dict(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=dataloader)
        if mode == "from_path":
            return self._load_from_path(Path(self.config.resume.resume_path or ""), objects)
        candidates = list(reversed(self.layout.committed_steps().items()))
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

    def _load_from_path(self, path: Path, objects: dict[str, Any]) -> ResumeState:
        """`resume.mode: from_path`: our checkpoint, or another framework's folder converted on the fly.

        `hf_rl_ckpt.convert` recognises HF Trainer, Accelerate and NeMo-RL folders; such a
        folder is converted under `.incomplete/`, loaded, and the copy deleted (a crash
        mid-way leaves only `.incomplete/` content, which the next start removes). Their
        pickled files are read only with `resume.trust_pickle` (weights-only loaders).
        """
        from .convert import convert_checkpoint, detect_format  # convert builds checkpoints through this module

        if detect_format(path) is None:
            if not (path / TRAINING_INFO).is_file():
                raise CheckpointNotFoundError(
                    f"resume.resume_path {path} is neither a committed checkpoint (no {TRAINING_INFO}) nor a folder "
                    f"`hf-rl-ckpt convert` recognises; pick one of `hf-rl-ckpt list {self.layout.root}` or set resume.mode: auto"
                )
            return self.load(path, **objects)
        converted = self.layout.incomplete_root / f"converted-{path.name}"
        error = None
        if distributed.rank() == 0:
            try:
                convert_checkpoint(
                    path, converted, trust_pickle=self.config.resume.trust_pickle, weights_only=self.config.resume.load_weight_only
                )
            except CheckpointError as err:
                error = err
        failure = distributed.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if failure is not None:
            raise error if error is not None else CheckpointError(failure)
        try:
            return dataclasses.replace(self.load(converted, **objects), path=path)
        finally:
            distributed.barrier()
            if distributed.rank() == 0:
                shutil.rmtree(converted, ignore_errors=True)

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
        damaged checkpoint is refused before anything is modified. In a single process the
        weight and optimizer tensor files are read once: into memory while their sha256 is
        checked, then loaded from there (see `_verified_info`).
        """
        path = Path(path)
        started = time.perf_counter()
        self._async.join()  # an async save in flight finishes first (its failure is still raised by the next save)
        weights_only = self.config.resume.load_weight_only if weights_only is None else weights_only
        preloaded: dict[str, dict[str, torch.Tensor]] = {}
        info = self._verified_info(path, model=model, optimizer=None if weights_only else optimizer, preloaded=preloaded)
        model_dir = self._model_dir(path, model)
        if optimizer is not None and not weights_only:  # before the weights load: a misfit leaves the model as it was
            check_optimizer_fits(unwrap_model(model), optimizer, self._optimizer_dir(path))
        self._load_model(path, model, model_dir, preloaded)
        state = ResumeState(
            step=int(info["step"]), path=path, epoch=info.get("epoch"), metrics=info.get("metrics") or {},
            extra=info.get("extra") or {}, weights_only=weights_only,
        )
        if not weights_only:
            self._load_training_state(path, info, model, optimizer, scheduler, dataloader, preloaded)
        logger.info("resumed from %s (step %d%s) in %.2fs", path, state.step, ", weights only" if weights_only else "", time.perf_counter() - started)
        self._warn_if_later_steps(state.step)
        return state

    def _warn_if_later_steps(self, step: int) -> None:
        """Say so when training goes on from `step` while the run holds checkpoints of later steps (a rollback)."""
        later = [later for later in self.layout.committed_steps() if later > step]
        if later:
            logger.warning(
                "resuming from step %d while %s holds later step(s) %s: training goes on from step %d on a new timeline. "
                "Its saves are the newest checkpoints from now on (resume.mode: auto picks the most recent commit); a save "
                "at one of those steps replaces it, and the others stay until retention evicts them or you delete them",
                step, self.layout.root, ", ".join(map(str, sorted(later))), step,
            )

    @staticmethod
    def _model_dir(path: Path, model: torch.nn.Module) -> str:
        """The folder of checkpoint `path` that `model` loads from; refused when the checkpoint holds another kind of model."""
        expected = model_dir_for(model)
        if expected == CONSOLIDATED_DIR and (path / SHARDED_DIR).is_dir() and (is_sharded(unwrap_model(model)) or not (path / CONSOLIDATED_DIR).is_dir()):
            expected = SHARDED_DIR  # per-rank shards: DCP reads the slices this rank needs, whatever world size wrote them
        if not (path / expected).is_dir():
            held = next((d for d in (ADAPTER_DIR, CONSOLIDATED_DIR) if (path / d).is_dir()), None)
            kind = "a PeftModel" if expected == ADAPTER_DIR else "a plain (non-PEFT) model"
            raise StateMismatchError(
                f"{path} has no {expected}/ to load into {kind}"
                + (f"; it holds {held}/ (saved from a {'PEFT' if held == ADAPTER_DIR else 'non-PEFT'} model). "
                   "Build the same kind of model as the run that saved it, or `hf-rl-ckpt export --merge-lora` "
                   "an adapter into a plain model" if held else "")
            )
        return expected

    def _load_model(self, path: Path, model: torch.nn.Module, model_dir: str, preloaded: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> None:
        """Load `model` from `path / model_dir` (see `_model_dir`)."""
        if model_dir == ADAPTER_DIR:
            load_adapter(unwrap_model(model), path / ADAPTER_DIR)
        elif model_dir == SHARDED_DIR or is_sharded(unwrap_model(model)):
            load_sharded(unwrap_model(model), path / model_dir)
        else:
            load_consolidated(model, path / CONSOLIDATED_DIR, trust_pickle=self.config.resume.trust_pickle, preloaded=preloaded)

    def _verified_info(self, path: Path, *, model=None, optimizer=None, preloaded: dict | None = None) -> dict[str, Any]:
        """Verify `path` against its manifest (rank 0) and return its training_info on every rank.

        With `preloaded` (a dict to fill) in a single process with `verify_on_resume`, the
        consolidated weight files of `model` and the optimizer tensor files (when `optimizer`
        is given) are not hashed here and read again by the loaders: each is read once into
        memory while hashed (`read_verified`), and the loaders take the tensors from there.
        All of them are read and checked before anything is loaded, so a damaged checkpoint
        still modifies nothing; the price is holding those files in memory meanwhile (about
        what `torch.load` of an optimizer.pt costs), so above half the available memory this
        falls back to hashing first and loading after (a second read, usually from the page cache).
        """
        error, info = None, None
        if distributed.rank() == 0:
            try:
                deferred = self._read_once_files(path, model, optimizer) if preloaded is not None else []
                info = verify_checkpoint(path, checksums=self.config.verify_on_resume, deferred=deferred)
                for name, data in read_verified(path, info["manifest"], deferred).items():
                    tensors = tensors_from_buffer(name, data)
                    if tensors is not None:
                        preloaded[name] = tensors
            except CorruptCheckpointError as err:
                error = (str(err.path), err.reason)
        error, info = distributed.broadcast_object((error, info))
        if error is not None:
            raise CorruptCheckpointError(*error)
        return info

    def _read_once_files(self, path: Path, model, optimizer) -> list[str]:
        """Manifest names `_verified_info` reads once for the loaders, or [] where hashing them up front is kept."""
        if model is None or distributed.is_distributed() or not self.config.verify_on_resume:
            return []
        manifest = read_training_info(path)["manifest"]
        folders = [OPTIM_DIR] if optimizer is not None else []
        if model_dir_for(model) == CONSOLIDATED_DIR and not is_sharded(unwrap_model(model)):
            folders.append(CONSOLIDATED_DIR)
        names = [name for name in manifest if name.endswith(".safetensors") and any(name.startswith(f + "/") for f in folders)]
        sizes = [manifest[name].get("size") for name in names]
        if not all(isinstance(size, int) for size in sizes) or sum(sizes) > available_memory() // 2:
            return []
        return names

    def _load_training_state(self, path: Path, info: dict[str, Any], model, optimizer, scheduler, dataloader, preloaded=None) -> None:
        self.load_optimizer_state(path, model=model, optimizer=optimizer, scheduler=scheduler, preloaded=preloaded)
        rank = distributed.rank()
        if dataloader is not None and self.config.resume.resume_dataloader:
            if dataloader_file(rank) in info["manifest"]:
                load_dataloader(dataloader, path / dataloader_file(rank))
            else:
                logger.warning("%s has no data position for rank %d (saved without a dataloader, or converted); the data order starts afresh", path, rank)
        self.load_rng_state(path)

    def load_optimizer_state(
        self, path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any | None = None,
        preloaded: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Restore optimizer and scheduler state from a checkpoint already verified by `load`.

        A step of `load`, public for integrations whose framework restores the pieces of its
        state at different moments (the Trainer's resume path, see `CheckpointCallback`).
        """
        path = Path(path)
        if optimizer is not None:
            load_optimizer(unwrap_model(model), optimizer, self._optimizer_dir(path), preloaded=preloaded)
        if scheduler is not None:
            load_scheduler(scheduler, path / SCHEDULER_JSON)

    @staticmethod
    def _optimizer_dir(path: Path) -> Path:
        """The optimizer state folder of checkpoint `path`; an error saying what to do when it was saved without one."""
        if not (path / OPTIM_DIR).is_dir():
            raise CheckpointError(
                f"{path} has no optimizer state (saved with save_optimizer: false); pass optimizer=None "
                "or set resume.load_weight_only: true to start with a fresh optimizer"
            )
        return path / OPTIM_DIR

    def load_rng_state(self, path: str | os.PathLike) -> None:
        """Restore this rank's RNG streams from a checkpoint (a step of `load`, public like `load_optimizer_state`)."""
        rank = distributed.rank()
        file = Path(path) / rng_file(rank)
        if file.is_file():
            load_rng(file)
        else:
            logger.warning("%s has no RNG state for rank %d (saved with another world size); RNG streams not restored", path, rank)

    # ============================================================= lifecycle
    def finalize(self, terminate: bool = True) -> None:
        """Finish background work: wait for pending Hub pushes (rank 0, after the barrier, so other ranks are not held).

        With `terminate`, the publisher's thread also ends (a later `save` starts it again) and
        the checkpoint directory's lock is released (a later `save` takes it again). An async
        save in flight is committed first; if it failed, its error is raised (on every rank)
        after the rest of the clean-up.
        """
        try:
            self._drain_async_save()
        finally:
            if terminate:
                self._async.buffer.close()  # frees the staging buffer; a later async save allocates it again
            distributed.barrier()
            if self._publisher is not None:
                self._publisher.drain()
                if terminate:
                    self._publisher.stop()
            if terminate:
                self._lock.release()


def load_manager_class(dotted: str) -> type:
    """Import `package.module.Class` and check it implements the manager protocol."""
    module_name, _, class_name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"checkpoint_manager_class {dotted!r} cannot be imported: {err}") from err
    missing = [name for name in PROTOCOL_MEMBERS if not hasattr(cls, name)]
    if missing:
        raise TypeError(
            f"checkpoint_manager_class {dotted!r} does not implement the checkpoint manager protocol: "
            f"missing {', '.join(missing)} (needs {', '.join(PROTOCOL_MEMBERS)}; subclassing "
            "hf_rl_ckpt.CheckpointManager provides them all)"
        )
    return cls


def create_manager(config: CheckpointConfig, **kwargs: Any) -> CheckpointManagerProtocol:
    """The manager `config` asks for: `checkpoint_manager_class` if set, else `CheckpointManager`."""
    cls = load_manager_class(config.checkpoint_manager_class) if config.checkpoint_manager_class else CheckpointManager
    return cls(config, **kwargs)
