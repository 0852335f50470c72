"""The commit protocol of one run directory: stage, seal, rename into place, notify.

Every file of a checkpoint is written under `.incomplete/<name>/`; `Committer.commit` lists
them with size and digest in `training_info.json` (the last file written), fsyncs the tree
and renames it into place. A crash at any instant therefore leaves either the old set of
checkpoints or the old set plus one whole new checkpoint; `recover` (at start) removes
what an interrupted save or eviction left behind. Once in place, the commit is announced
to the run's subscribers (`events`): the index and retention first, then the Hub.

Only rank 0 commits. The directory lock (`lock.DirectoryLock`) keeps a second process
from committing into, or cleaning up, the same run directory.
"""

from __future__ import annotations

import logging
import operator
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping

from .digest import Digests
from .atomic import atomic_write_json, commit_directory, fsync_dir, fsync_tree, recover_parked, remove_entry
from .errors import CheckpointError, CheckpointSaveError, ConfigError
from .events import CheckpointCommitted, Subscribers
from .faultpoint import faultpoint
from .layout import CONVERTED_PREFIX, DOWNLOAD_PREFIX, EVICTED_PREFIX, REPLACED_PREFIX, TRAINING_INFO, CheckpointLayout
from .lock import DirectoryLock, ReadOnlyCheckpointDirError
from .records import Contents, ModelSummary, TrainingInfo
from .registry import Registry
from .retention import RetentionPolicy, metric_value
from .state import jsoncodec
from .verify import build_manifest

logger = logging.getLogger("hf_rl_ckpt")



def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint, recorded in training_info.json."""
    versions = {"python": sys.version.split()[0]}
    for name in ("hf_rl_ckpt", "torch", "transformers", "accelerate", "peft", "safetensors", "huggingface_hub"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def checked_step(step: Any, name: str = "step") -> int:
    """`step` as an int, or CheckpointSaveError before anything is written: a checkpoint's name encodes its step."""
    try:
        if isinstance(step, bool):
            raise TypeError
        number = operator.index(step)  # int, numpy and 0-d tensor integers; not floats or strings
    except TypeError:
        number = None
    if number is None or number < 0:
        raise CheckpointSaveError(
            f"step {step!r} ({type(step).__name__}) cannot name a checkpoint: pass the global step, an integer >= 0" if name == "step"
            else f"{name} {step!r} ({type(step).__name__}) is not a step number: pass an integer >= 0"
        )
    return number


@dataclass(frozen=True)
class CommitRequest:
    """What a save records about its checkpoint besides the files (see `TrainingInfo`)."""

    step: int
    metrics: dict[str, Any]
    epoch: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    model: ModelSummary | None = None
    contents: Contents | None = None  # None: a framework wrote the files itself (`Committer.commit_staged`)
    world_size: int = 1  # the ranks that wrote it
    policy_version: int | None = None
    started: float = field(default_factory=time.perf_counter)  # when the save began

    @classmethod
    def checked(
        cls, step: Any, metrics: Mapping[str, Any] | None, epoch: Any, extra: Mapping[str, Any] | None, metric_name: str | None,
        policy_version: Any = None,
    ) -> CommitRequest:
        """The records of a save as plain JSON, refused (CheckpointSaveError naming the key) before anything is written.

        The ranking metric is checked first, as given: NaN or infinity cannot rank (the other
        values record a non-finite number as null, see `jsoncodec.plain`).
        """
        step = checked_step(step)
        metric_value(metrics, metric_name, step)
        return cls(
            step=step, metrics=jsoncodec.plain(dict(metrics or {}), "metrics"), epoch=jsoncodec.plain(epoch, "epoch"),
            extra=jsoncodec.plain(dict(extra or {}), "extra_state"),
            policy_version=None if policy_version is None else checked_step(policy_version, "policy_version"),
        )


class Committer:
    """Commits checkpoints into one run directory and recovers it after a crash (rank 0)."""

    def __init__(self, layout: CheckpointLayout, registry: Registry, policy: RetentionPolicy, events: Subscribers) -> None:
        self.layout, self.registry, self.policy, self.events = layout, registry, policy, events
        self.lock = DirectoryLock(layout.root)
        self.read_only = False

    def open(self) -> None:
        """At start: create the directory, take its lock, and finish or undo what an interrupted process left.

        A directory this process may not write is opened read-only (resuming works, saving
        raises ReadOnlyCheckpointDirError).
        """
        try:
            self.layout.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"checkpoint_dir {self.layout.root} cannot be created: {err}") from err
        try:
            self.lock.acquire()  # before recover: it deletes what another live writer may be staging
        except ReadOnlyCheckpointDirError as err:
            self.read_only = True
            logger.warning("%s: resuming works, saving will fail", err)
        self.recover()

    def _created_here(self, name: str, prefixes: tuple[str, ...], *, steps: bool = False) -> bool:
        """Whether `name` is one hf_rl_ckpt gives an entry of `.incomplete/` or `.trash/`; anything else is left alone, and said so."""
        if name.startswith(prefixes) or (steps and self.layout.parse_step(name) is not None):
            return True
        logger.warning("leaving %s alone: hf_rl_ckpt did not create it, and recovery deletes only what it created", name)
        return False

    def staging_dir(self, step: int) -> Path:
        """An empty `.incomplete/<name>/` to write checkpoint `step` into."""
        if self.read_only:
            raise ReadOnlyCheckpointDirError(f"{self.layout.root} is read-only (found at start); earlier checkpoints are untouched")
        self.lock.acquire()  # a no-op while held; takes it again after finalize() released it
        # Checkpoints deleted by hand since the last commit leave the index now: retention could not move them away.
        self.registry.reconcile()
        staging = self.layout.incomplete_dir(step)
        if staging.exists() or staging.is_symlink():
            remove_entry(staging)
        staging.mkdir(parents=True)
        return staging

    def commit(self, staging: Path, request: CommitRequest, digests: Digests) -> TrainingInfo:
        """Seal `staging` with its training_info.json, rename it into place, and notify the subscribers.

        `digests` are the digests of files computed while they were written; other
        files in `staging` are hashed here. Raises before the rename if sealing fails
        (nothing is committed; the caller removes `staging`).
        """
        created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = build_manifest(staging, digests)
        # Files other ranks wrote to their own (node-local) disks: listed by the digests they reported (see `remote`).
        manifest.update({rel: digest.entry() for rel, digest in digests.items() if rel not in manifest})
        info = TrainingInfo(
            step=request.step,
            epoch=request.epoch,
            metrics=request.metrics,
            created_at=created_at,
            commit_seq=self.registry.next_commit_seq(),  # what makes it the newest checkpoint, whatever its step
            retention=self.policy,  # retention never evicts it under other settings
            save_seconds=round(time.perf_counter() - request.started, 3),
            world_size=request.world_size,
            versions=library_versions(),
            model=request.model,
            extra=request.extra,
            contents=request.contents,
            manifest=manifest,
            policy_version=request.policy_version,
        )
        atomic_write_json(staging / TRAINING_INFO, info.to_json())
        faultpoint("commit.before_fsync")
        fsync_tree(staging)
        faultpoint("commit.before_rename")
        final = self.layout.step_dir(request.step)
        if final.exists():
            logger.warning("replacing existing checkpoint %s with a new save of the same step", final)
        commit_directory(staging, final, parked=self.layout.trash_root / f"{REPLACED_PREFIX}{final.name}")  # recover() finishes a crashed swap
        faultpoint("commit.after_rename")
        evicted = self.events.committed(CheckpointCommitted(request.step, final, info))
        logger.info(
            "saved checkpoint step %d -> %s (%.1f MB) in %.2fs%s",
            request.step, final, sum(entry["size"] for entry in info.manifest.values()) / 1e6, time.perf_counter() - request.started,
            f"; evicted step(s) {', '.join(str(event.step) for event in evicted)}" if evicted else "",
        )
        return info

    def commit_staged(self, step: int, request: CommitRequest) -> Path:
        """Commit what a framework wrote into `staging_dir(step)` as it is (see `compat.nemo_rl`); nothing is left behind on failure."""
        staging = self.layout.incomplete_dir(step)
        if not staging.is_dir():
            raise CheckpointError(f"nothing staged for step {step} at {staging}; stage it first")
        try:
            self.commit(staging, request, {})
        except Exception as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointSaveError(f"committing step {step} failed ({err}); nothing was committed to {self.layout.root}") from err
        return self.layout.step_dir(step)

    def recover(self) -> None:
        """Finish or undo what an interrupted process left behind, and re-index (only report it in a read-only dir)."""
        if self.read_only:
            leftovers = [p for d in (self.layout.incomplete_root, self.layout.trash_root) if d.is_dir() for p in sorted(d.iterdir())]
            if leftovers:
                logger.warning("cannot clean up after an interrupted process in read-only %s: %s", self.layout.root, ", ".join(map(str, leftovers)))
            return
        if self.layout.incomplete_root.is_dir():
            for leftover in sorted(self.layout.incomplete_root.iterdir()):
                if self._created_here(leftover.name, (DOWNLOAD_PREFIX, CONVERTED_PREFIX), steps=True):
                    logger.warning("removing %s: an interrupted save left it incomplete (never committed)", leftover)
                    remove_entry(leftover)
        if self.layout.trash_root.is_dir():
            for entry in sorted(self.layout.trash_root.iterdir()):
                if not self._created_here(entry.name, (REPLACED_PREFIX, EVICTED_PREFIX)):
                    continue
                if entry.name.startswith(REPLACED_PREFIX) and not entry.is_symlink():
                    recover_parked(entry, self.layout.root / entry.name.removeprefix(REPLACED_PREFIX))
                else:
                    logger.info("removing %s: an eviction interrupted by a crash left it there (no longer a checkpoint)", entry)
                    remove_entry(entry)
            fsync_dir(self.layout.root)
        self.registry.reconcile()
