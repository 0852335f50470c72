"""`CheckpointManager`: save, retain, resume. The framework-agnostic core, as a thin facade.

Integrations (Trainer callback, Accelerate hooks, RL frameworks) only decide *when* to save
and hand over their objects; the modules behind this facade decide *how*:

- `plan`: what each rank writes, decided once per save (and recorded as `contents`);
- `write`: executing the plan, synchronously or staged for a background write (`async_save`);
- `commit`: the atomic protocol (stage under `.incomplete/`, seal with a manifest, rename);
- `events`: what follows a commit, as ordered subscribers: the index and top-k retention
  (`eviction`), the Hub publisher (`hub.publish`), and any the caller adds;
- `load`: verify, then restore what the checkpoint holds.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from . import distributed
from .commit import CommitRequest, Committer
from .config import CheckpointConfig, parse_duration
from .digest import Digests
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError
from .events import Subscriber, Subscribers
from .eviction import IndexAndRetention, ranking_values
from .remote import RemoteStore, RemoteTier
from .hub.publish import HubPublishing
from .layout import TRAINING_INFO, CheckpointLayout
from .load import CheckpointLoader, ResumeState
from .records import CheckpointRecord, Contents
from .registry import Registry
from .retention import RetentionPolicy, metric_value
from .state.model import save_consolidated, weights_dtype
from .state.peft import save_adapter
from .plan import classify_model, export_dtype
from .preemption import PreemptionWatch
from .weight_sync import publish
from .write import CheckpointWriter, SaveInputs, whole_model_weights

logger = logging.getLogger("hf_rl_ckpt")


@dataclass(frozen=True)
class SaveDecision:
    """`should_save`'s answer for one step, as every rank agreed on it."""

    step: int
    save: bool


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

    def sync_weights(self, step: int, *, model: torch.nn.Module, tokenizer: Any | None = None, policy_version: int | None = None) -> Path | None: ...

    def should_save(self, step: int) -> bool: ...

    def should_load(self) -> bool: ...

    def latest(self) -> Path | None: ...

    @property
    def deadline_reached(self) -> bool: ...

    @property
    def preempted(self) -> bool: ...

    def finalize(self, terminate: bool = True) -> None: ...


#: The members of `CheckpointManagerProtocol`, checked on a `checkpoint_manager_class` when it is loaded.
PROTOCOL_MEMBERS = tuple(name for name in vars(CheckpointManagerProtocol) if not name.startswith("_"))


class BaseCheckpointManager:
    """Policies shared by every manager: when to save, what to keep, where checkpoints are.

    Subclasses add the I/O; nothing here writes a file.
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
        self._started = time.monotonic()
        self._deadline = (
            parse_duration(config.checkpoint_must_save_by, "checkpoint_must_save_by") if config.checkpoint_must_save_by else None
        )
        self._preemption = PreemptionWatch() if config.enabled and config.save_on_preemption else None
        self._decision: SaveDecision | None = None  # the last should_save's, agreed by every rank
        self._deciding: distributed.Ranks | None = None  # the gloo group the decisions are agreed on, made at the first
        self._deadline_reached = self._preempted = False  # agreed, and once true they stay true
        self._deadline_saved = self._preemption_saved = False
        self._warned_unranked = self._warned_still_running = False

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
        """True on every `save_period`-th step, and once when `checkpoint_must_save_by` is reached or the job is preempted.

        Every rank calls it at every step: the time budget and the preemption signal are
        agreed among the ranks (one small all-reduce over a gloo group of their own: no GPU
        sync), so all of them answer alike even when their clocks started apart or only one
        was signalled. Asking again for the same step returns the same answer without
        another collective; the save itself marks the deadline or preemption save done.
        """
        if not self.config.enabled:
            return False
        if self._decision is None or self._decision.step != step:
            self._decision = self._decide(step)
        return self._decision.save

    def _decide(self, step: int) -> SaveDecision:
        if self._deadline is not None or self._preemption is not None:
            deadline = self._deadline is not None and time.monotonic() - self._started >= self._deadline
            signalled = self._preemption is not None and self._preemption.received is not None
            if self._deciding is None:  # every rank asks at the same step: the group is made collectively
                self._deciding = distributed.JOB.side_channel()
            deadline, signalled = self._deciding.any_rank(deadline, signalled)
            if deadline and not self._deadline_reached:
                logger.warning("checkpoint_must_save_by (%s) reached at step %d: saving now", self.config.checkpoint_must_save_by, step)
            if signalled and not self._preempted:
                received = self._preemption.signal_name if self._preemption else None
                logger.warning("preempted (%s): saving step %d, then stopping", received or "a signal on another rank", step)
            self._deadline_reached |= deadline
            self._preempted |= signalled
            if self._preemption_saved and not self._warned_still_running:
                self._warned_still_running = True
                logger.warning(
                    "step %d: still training after the preemption save; stop the loop when manager.preempted is true "
                    "(the Trainer callback does), or the job is killed mid-step when its grace period ends", step,
                )
        period = self.config.save_period
        periodic = period is not None and step > 0 and step % period == 0
        owed = (self._deadline_reached and not self._deadline_saved) or (self._preempted and not self._preemption_saved)
        return SaveDecision(step, periodic or owed)

    @property
    def deadline_reached(self) -> bool:
        """True once every rank agreed that `checkpoint_must_save_by` is reached (save, then stop the job)."""
        return self._deadline_reached

    @property
    def preempted(self) -> bool:
        """True once every rank agreed that a preemption signal (SIGTERM, SIGUSR1) arrived (save, then stop the job)."""
        return self._preempted

    def should_load(self) -> bool:
        """True when `resume` would load something."""
        mode = self.config.resume.mode
        if not self.config.enabled or mode == "disable":
            return False
        return mode == "from_path" or bool(self.layout.committed_steps()) or (self.remote is not None and bool(self.remote.store.committed()))

    # ------------------------------------------------------------- queries
    def checkpoints(self) -> list[CheckpointRecord]:
        """The committed checkpoints in commit order, the newest last (step, metrics, top_k_rank, size_bytes, ...).

        Only those still on disk: one deleted by hand stays in the index until the next save
        or start reconciles it, and must not be listed (or returned by `best()`) meanwhile.
        """
        committed = self.layout.committed_steps()
        return [record for record in self.registry.records() if record.step in committed]

    def latest(self) -> Path | None:
        """The newest committed checkpoint (the most recent commit, not the highest step), or None."""
        return self.layout.latest()

    def best(self) -> Path | None:
        """The best committed checkpoint by `metric_name` (the newest when no metric ranks)."""
        ranking = self.policy.ranking(ranking_values(self.checkpoints(), self.config.metric_name))
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
        folder = Contents.of(path).deployable_dir
        if folder is None:
            raise CheckpointNotFoundError(f"{path} holds model shards only (saved with save_consolidated: never, or final before the last save); `hf-rl-ckpt export` it to serve it")
        return path / folder


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

    def __init__(
        self, config: CheckpointConfig, training_config: Mapping[str, Any] | None = None, *, subscribers: Iterable[Subscriber] = (),
    ) -> None:
        """
        Args:
            config: the checkpointing settings.
            training_config: the run's own settings, recorded (secrets redacted) in each checkpoint's config.yaml.
            subscribers: more after-commit subscribers (see `hf_rl_ckpt.events`), notified after the run's index and the Hub.
        """
        super().__init__(config)
        self.events = Subscribers()
        self._index = IndexAndRetention(self.layout, self.registry, self.policy, self.events)
        self.committer = Committer(self.layout, self.registry, self.policy, self.events)
        self._writer = CheckpointWriter(config, self.committer, self.registry, self.policy, training_config or {})
        self.remote = RemoteTier(
            RemoteStore(config.remote_dir, config.remote_storage_options), self.layout, config.remote_retry,
            rank_timeout=parse_duration(config.async_rank_timeout, field_name="async_rank_timeout"),
        ) if config.remote_dir else None
        self._loader = CheckpointLoader(config, self.layout, self._writer.background, remote=self.remote)
        # Like checkpoint_dir (see CheckpointLayout): resolved once, so an os.chdir cannot move where weights are published.
        self._sync_weight_path = os.path.abspath(config.sync_weight_path) if config.sync_weight_path else None
        listeners: list[Subscriber] = [self._index]
        if config.enabled:
            read_only = distributed.on_rank0(self._open)  # the lock and recovery outcome, raised on every rank
            if not read_only:
                self._check_disks(distributed.seeing_rank0_directory(self.layout.root))
            if distributed.rank() == 0 and not self.committer.read_only and config.push_to_hub:
                listeners.append(HubPublishing(config, self.registry))  # publishing records its progress in checkpoints.json
            if self.remote is not None and distributed.rank() == 0 and not self.committer.read_only:
                listeners.append(self.remote)
            if self._preemption is not None:
                self._preemption.install()
        self.events.extend([*listeners, *subscribers])

    def _open(self) -> bool:
        if self.remote is not None:  # unreachable, no credentials, denied: one clear error now, before anything is written
            self.remote.store.check_access()
        self.committer.open()
        if not self.committer.read_only:
            self._index.warn_about_other_settings()
            if self.remote is not None:
                self.remote.catch_up()
        return self.committer.read_only

    def _check_disks(self, seeing: list[bool]) -> None:
        """Node-local disks (a rank does not see rank 0's checkpoint_dir): supported through `remote_dir`, refused without it."""
        if all(seeing):
            return
        blind = [rank for rank, seen in enumerate(seeing) if not seen]
        where = f"checkpoint_dir {self.layout.root} is not shared by every rank: rank(s) {', '.join(map(str, blind[:8]))} do not see rank 0's files"
        if self.remote is None:
            raise ConfigError(f"{where}, so their parts of each checkpoint would never be committed. Put checkpoint_dir on a "
                              "filesystem every rank shares, or set remote_dir (each node then uploads its own files)")
        if self.config.async_save:
            raise ConfigError(f"{where}; with node-local disks, saves are synchronous for now: set async_save: false")
        own_disk = not seeing[distributed.rank()]
        self._writer.own_disk = self.remote.own_disk = own_disk
        self._writer.node_local = self.remote.node_local = True
        if own_disk:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            self.remote.catch_up()
            self.events.extend([self.remote])  # its uploads are drained and stopped with the others'
        logger.info("%s: node-local disks; each rank uploads its own files to %s", where, self.remote.store.url)

    @property
    def read_only(self) -> bool:
        """True when the checkpoint directory could not be written at start: resuming works, saving raises."""
        return self.committer.read_only

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
        rollout_state: Any = None,
        policy_version: int | None = None,
        final: bool = False,
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
            rollout_state: this rank's RL loop state that is neither weights nor optimizer (buffered
                generations, a replay buffer, a rollout cursor): dicts, lists and tuples of tensors,
                numbers and strings. Tensors are copied to host memory now and stored as
                safetensors, the rest as JSON; `resume` returns it to the same rank as
                `.rollout_state`. Each rank passes its own (or None).
            policy_version: the version (step) of the policy that produced the rollouts in flight,
                recorded in `training_info.json` and returned by `resume` as `.policy_version`.
            final: this is the run's last save (the Trainer callback says so at the end of
                training). With `save_consolidated: final`, a sharded model's consolidated
                folder is written by this save only (and by a save on preemption or at
                `checkpoint_must_save_by`, which are final too).

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
        # Rank 0's records are the ones committed: checked there, and a refusal raised on every rank.
        record = distributed.on_rank0(
            lambda: CommitRequest.checked(step, metrics, epoch, extra_state, self.config.metric_name, policy_version=policy_version),
        )
        inputs = SaveInputs(
            record=record, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=dataloader, tokenizer=tokenizer,
            extra_files=dict(extra_files or {}), rollout_state=rollout_state,
            final=final or self._preempted or self._deadline_reached,
        )
        self._writer.drain()
        started = time.perf_counter()
        if self.config.metric_name and self.config.keep_top_k and metric_value(record.metrics, self.config.metric_name, record.step) is None:
            # Periodic saves between evaluations routinely lack an eval metric: say it once per run, not every save.
            log = logger.debug if self._warned_unranked else logger.warning
            self._warned_unranked = True
            log(
                "metric '%s' is not among this save's metrics (%s) at step %d; the checkpoint cannot rank in top-%d "
                "and is kept only while it is the newest", self.config.metric_name, ", ".join(record.metrics) or "none", record.step,
                self.config.keep_top_k,
            )
        path = self._writer.save(inputs, started, in_background=self.config.async_save and not self._preempted)  # the job is ending: write now
        if self.remote is not None and self.remote.node_local:  # ranks on their own disks keep, evict and upload their files
            retained = distributed.on_rank0(lambda: [folder.name for folder in self.layout.committed_steps().values()])
            if self.remote.own_disk:
                self.remote.keep_own_files(path.name, retained)
        self._deadline_saved |= self._deadline_reached
        self._preemption_saved |= self._preempted
        return path

    def sync_weights(
        self, step: int, *, model: torch.nn.Module, tokenizer: Any | None = None, policy_version: int | None = None,
    ) -> Path | None:
        """Publish the weights to `sync_weight_path` for an inference engine, every `sync_weight_period` steps.

        Only the deployable folder is written (consolidated weights in `consolidated_dtype`, or
        the adapter of a PeftModel), to a fresh version folder that is swapped in atomically,
        with a `weight_sync.json` naming the step, `policy_version` (default: the step), the
        dtype and every file; the newest `sync_weight_keep` versions stay on disk. See
        `hf_rl_ckpt.weight_sync` for what readers can rely on, and `reload_vllm` for a live
        vLLM engine. Every rank calls it; returns the published folder on rank 0 on a sync
        step, else None.
        """
        if not self.config.enabled or not self._sync_weight_path or step % self.config.sync_weight_period:
            return None
        kind = classify_model(model)
        dtype = export_dtype(self.config.consolidated_dtype, kind)
        with whole_model_weights(kind) as state:  # ZeRO-3, FSDP2, tensor parallel: every rank gathers, rank 0 writes

            def write(out: Path) -> Digests:
                if kind.peft:
                    return save_adapter(kind.module, out, tokenizer=tokenizer)
                return save_consolidated(
                    kind.module, out, max_shard_size=self._writer.max_shard_size, tokenizer=tokenizer,
                    weights_format=self.config.model_save_format, state=state, dtype=dtype,
                )

            def publish_weights() -> Path:
                written = dtype or weights_dtype(kind.module)
                published = publish(
                    self._sync_weight_path, self.layout.step_name(step), write, step=step, policy_version=policy_version,
                    dtype=str(written).removeprefix("torch.") if written is not None else None, keep=self.config.sync_weight_keep,
                )
                logger.info("published weights of step %d to %s -> %s", step, self._sync_weight_path, published)
                return published

            published = distributed.on_rank0(publish_weights)
        return published if distributed.rank() == 0 else None

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
        return self._loader.resume(dict(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=dataloader), mode)

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

        Verifies the manifest first (sizes always, digests when `verify_on_resume`), so a
        damaged checkpoint is refused before anything is modified. In a single process the
        weight and optimizer tensor files are read once: into memory while their digest is
        checked, then loaded from there (see `load.CheckpointLoader`).
        """
        return self._loader.load(path, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=dataloader, weights_only=weights_only)

    def load_optimizer_state(
        self, path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any | None = None,
    ) -> None:
        """Restore optimizer and scheduler state from a checkpoint already verified by `load`.

        A step of `load`, public for integrations whose framework restores the pieces of its
        state at different moments (the Trainer's resume path, see `CheckpointCallback`).
        """
        self._loader.load_optimizer_state(path, model=model, optimizer=optimizer, scheduler=scheduler)

    def load_rng_state(self, path: str | os.PathLike) -> None:
        """Restore this rank's RNG streams from a checkpoint (a step of `load`, public like `load_optimizer_state`)."""
        self._loader.load_rng_state(path)

    # ============================================================= lifecycle
    def finalize(self, terminate: bool = True) -> None:
        """Finish background work: wait for pending Hub pushes (rank 0, after the barrier, so other ranks are not held).

        With `terminate`, the subscribers' background work also ends (a later `save` starts it
        again) and the checkpoint directory's lock is released (a later `save` takes it again).
        An async save in flight is committed first; if it failed, its error is raised (on
        every rank) after the rest of the clean-up.
        """
        try:
            self._writer.drain()
        finally:
            if terminate:
                self._writer.background.buffer.close()  # frees the staging buffer; a later async save allocates it again
            distributed.barrier()
            self.events.drain()
            if terminate:
                self.events.close()
                self.committer.lock.release()
                if self._preemption is not None:
                    self._preemption.uninstall()
                if self._deciding is not None:
                    self._deciding.close()
                self._deciding = None


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
