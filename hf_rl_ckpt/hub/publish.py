"""Publishing checkpoints to the Hugging Face Hub, in the background, without ever stalling training.

Layout on the Hub: one model repo per run. Every checkpoint on the run's leaderboard (the
`keep_top_k` best) is a branch `step-<N>`; `main` holds the best one; the branch of an
evicted checkpoint is deleted unless `hub_keep_evicted`. A branch holds what serving needs,
at its root: the consolidated folder (or the adapter folder of a PEFT model) with its
tokenizer and config, and the model card README.md; the rest of the checkpoint goes under
`training_state/` only with `hub_push_training_state`. So `from_pretrained(repo,
revision="step-N")` and `vllm serve repo --revision step-N` work as they are.

How training is kept out of it: `CheckpointManager.save` calls `HubPublisher.enqueue`, which
records pending pushes in the `hub` section of `checkpoints.json` (local I/O only, typed as
`HubState`) and submits one reconciling pass to a `BackgroundWorker`. The pass reconciles
the Hub with the registry: it pushes the leaderboard's branches that are not up to date,
moves `main` to the best checkpoint, deletes evicted branches. Reconciling (rather than
replaying a list of tasks) makes requests coalesce (three saves during one slow upload
become one pass that publishes only what is still retained), makes every action idempotent
(a retry redoes it, a restart reruns the pass), and needs no journal beyond the per-step
status: a new process finishes whatever was pending.

Failures: 5xx, 429, timeouts and connection errors are retried request by request with
exponential backoff (`config.hub_retry`, a `RetryPolicy`); when the budget runs out the
pass stops and its pushes stay pending (retried at the next save, at the next start, or by
`hf-rl-ckpt push`). A 401/403 is reported once, as one ERROR line that says what to fix,
and stops publishing for the process; training goes on.

Bytes: each branch update is one `create_commit`. The preupload answer lets the client skip
files the branch already has, and the Hub's LFS store (content-addressed by sha256) is never
sent an object twice: pushing `main` after the branch of the same checkpoint uploads no
weights again. The LFS object ids (sha256) are computed by the publisher's thread, off the
save path (checkpoints record XXH3-128, see `digest`); for checkpoints written before
format 2 the manifest's sha256 is used as is.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Hashable, Literal, Mapping, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from huggingface_hub.utils import disable_progress_bars
from tqdm.auto import tqdm

from ..atomic import hash_file
from ..digest import recorded_digest
from ..background import BackgroundWorker, RetryPolicy
from ..config import CheckpointConfig, check_repo_id
from ..errors import CheckpointError, CorruptCheckpointError, HubAuthError, HubPublishError, HubUnavailableError
from ..events import CheckpointCommitted, CheckpointEvicted, Subscriber
from ..faultpoint import faultpoint
from ..layout import ADAPTER_DIR, CONFIG_YAML, CONSOLIDATED_DIR, MODEL_CARD, TRAINING_INFO, safe_join
from ..records import Contents
from ..registry import Registry
from ..retention import RetentionPolicy
from ..verify import read_training_info, verify_checkpoint
from .card import Leaderboard, branch_for, render_model_card

logger = logging.getLogger("hf_rl_ckpt")

MAIN = "main"
TRAINING_STATE_DIR = "training_state"
PENDING, PUSHED, FAILED = "pending", "pushed", "failed"
PushStatus = Literal["pending", "pushed", "failed"]
_KEEP_ON_HUB = {".gitattributes"}
_T = TypeVar("_T")


_TRANSPORT_ERRORS = (HfHubHTTPError, httpx2.TransportError, ConnectionError, TimeoutError)


# ====================================================================== publishing state (the `hub` section of checkpoints.json)
@dataclass
class HubEntry:
    """The publishing state of one checkpoint's branch, stored under `hub.steps["<step>"]` in checkpoints.json.

    `status` is `pending` until the branch holds the checkpoint (`pushed`, with its `commit`
    and the `fingerprint` of what was pushed) or a push was refused (`failed`, with the
    `error`); `evicted` marks a pushed branch kept after its checkpoint left the leaderboard
    (`hub_keep_evicted`).
    """

    step: int
    branch: str
    status: PushStatus = PENDING
    commit: str | None = None
    fingerprint: str | None = None
    updated_at: str | None = None
    error: str | None = None
    evicted: bool = False

    @classmethod
    def from_json(cls, step: int, data: Mapping[str, Any]) -> "HubEntry":
        return cls(
            step=step, branch=data.get("branch") or branch_for(step), status=data.get("status", PENDING), commit=data.get("commit"),
            fingerprint=data.get("fingerprint"), updated_at=data.get("updated_at"), error=data.get("error"), evicted=bool(data.get("evicted")),
        )

    def to_json(self) -> dict[str, Any]:
        """The stored form: the step is the key, unset fields are left out (as files written before this class have them)."""
        optional = {"commit": self.commit, "fingerprint": self.fingerprint, "updated_at": self.updated_at, "error": self.error}
        return {
            "status": self.status, "branch": self.branch,
            **{key: value for key, value in optional.items() if value is not None},
            **({"evicted": True} if self.evicted else {}),
        }


@dataclass
class HubMain:
    """What `main` holds: the best checkpoint's `step`, pushed as `commit` with that content's `fingerprint`."""

    step: int
    commit: str
    fingerprint: str
    updated_at: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "HubMain":
        return cls(step=int(data["step"]), commit=data.get("commit", ""), fingerprint=data.get("fingerprint", ""), updated_at=data.get("updated_at", ""))

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "commit": self.commit, "fingerprint": self.fingerprint, "updated_at": self.updated_at}


@dataclass
class HubState:
    """The `hub` section of checkpoints.json: the run's repo, one `HubEntry` per published step, and `main`.

    ```python
    >>> state = HubState.from_json({"repo_id": "alice/run", "steps": {"40": {"status": "pushed", "branch": "step-40"}}, "main": None}, "alice/run")
    >>> state.steps[40].status
    'pushed'
    >>> HubState.from_json(None, "alice/run").steps   # no section yet, or one of another repo: start afresh
    {}

    ```
    """

    repo_id: str
    steps: dict[int, HubEntry] = field(default_factory=dict)
    main: HubMain | None = None

    @classmethod
    def from_json(cls, data: Any, repo_id: str) -> "HubState":
        """The section as stored (None when absent); a section of another repo (or malformed) reads as empty."""
        if not (isinstance(data, Mapping) and data.get("repo_id") == repo_id and isinstance(data.get("steps"), Mapping)):
            return cls(repo_id)
        steps = {int(key): HubEntry.from_json(int(key), entry) for key, entry in data["steps"].items()}
        main = HubMain.from_json(data["main"]) if isinstance(data.get("main"), Mapping) and "step" in data["main"] else None
        return cls(repo_id, steps, main)

    def to_json(self) -> dict[str, Any]:
        """The stored form: steps keyed by `str(step)`."""
        return {
            "repo_id": self.repo_id,
            "steps": {str(step): entry.to_json() for step, entry in self.steps.items()},
            "main": None if self.main is None else self.main.to_json(),
        }


# ====================================================================== what a branch holds
@dataclass(frozen=True)
class HubFile:
    """A checkpoint file and where it goes in the repo.

    `digest` is the hex digest the manifest records (any algorithm: it tells pushed content apart);
    `sha256` the file's sha256 when the manifest records one (checkpoints before format 2).
    """

    path_in_repo: str
    local: Path
    digest: str
    sha256: str | None = None


@dataclass(frozen=True)
class CheckpointUpload:
    """Everything one branch should hold for one checkpoint: its files and its model card."""

    step: int
    files: tuple[HubFile, ...]
    card: bytes

    @property
    def fingerprint(self) -> str:
        """Identity of the branch content: equal fingerprints mean nothing to push."""
        listing = json.dumps([(f.path_in_repo, f.digest) for f in self.files]).encode()
        return hashlib.sha256(listing + b"\0" + self.card).hexdigest()


def checkpoint_files(ckpt_dir: str | Path, *, include_training_state: bool = False) -> tuple[HubFile, ...]:
    """The files of a committed checkpoint to publish, with their paths in the repo.

    The model folder (`model/adapter/` for a PEFT model, else `model/consolidated/`) goes to
    the repo root; with `include_training_state` every other file goes under
    `training_state/` (training_info.json included). The model card is not among them: it
    is rendered for each push. Sizes are checked against the manifest (a stat per file), so
    a damaged checkpoint is refused rather than published.

    ```python
    >>> [f.path_in_repo for f in checkpoint_files("runs/ckpt/step_40")]   # doctest: +SKIP
    ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']
    ```
    """
    ckpt_dir = Path(ckpt_dir)
    manifest: Mapping[str, Mapping[str, Any]] = read_training_info(ckpt_dir)["manifest"]
    folder = Contents.of(ckpt_dir).deployable_dir
    if folder is None:
        raise CheckpointError(
            f"{ckpt_dir} has no {CONSOLIDATED_DIR}/ or {ADAPTER_DIR}/ to serve from the Hub "
            "(a sharded model saved with save_consolidated: never, or final before the last save); `hf-rl-ckpt export` it, "
            "or set save_consolidated: every to publish every checkpoint"
        )
    files = []
    for rel, entry in sorted(manifest.items()):
        if rel.startswith(folder + "/") and rel != f"{folder}/{MODEL_CARD}":
            in_repo = rel[len(folder) + 1 :]
        elif include_training_state and rel != MODEL_CARD:
            in_repo = f"{TRAINING_STATE_DIR}/{rel}"
        else:
            continue
        path = safe_join(ckpt_dir, rel)
        if path.stat().st_size != entry["size"]:
            raise CorruptCheckpointError(path, f"size {path.stat().st_size} bytes, manifest says {entry['size']}; not publishing a damaged checkpoint")
        recorded = recorded_digest(entry)
        if recorded is None:
            raise CorruptCheckpointError(path, "its manifest entry records no digest; not publishing a damaged checkpoint")
        files.append(HubFile(in_repo, path, recorded[1], entry.get("sha256")))
    if include_training_state:
        info = ckpt_dir / TRAINING_INFO
        files.append(HubFile(f"{TRAINING_STATE_DIR}/{TRAINING_INFO}", info, hash_file(info)))
    return tuple(files)


# ====================================================================== Hub operations
class HubRepo:
    """The Hub operations of publishing on one repo, each retried on transient failures per `retry`.

    ```python
    repo = HubRepo(HfApi(), "alice/my-run", RetryPolicy(attempts=5))
    repo.prepare(private=True)
    sha = repo.push("step-40", upload, "step 40")
    ```
    """

    def __init__(self, api: HfApi, repo_id: str, retry: RetryPolicy) -> None:
        self.api = api
        self.repo_id = repo_id
        self.retry = retry
        self._root_commit: str | None = None

    def prepare(self, private: bool) -> None:
        """Create the repo if needed and find its first commit, which new branches start from.

        A new branch starts empty (not from `main`): a branch whose push is interrupted
        must not serve another checkpoint's weights under its name.
        """
        self.call("create the repo", lambda: self.api.create_repo(self.repo_id, private=private, exist_ok=True))
        commits = self.call("list the repo's commits", lambda: self.api.list_repo_commits(self.repo_id))
        self._root_commit = commits[-1].commit_id

    def push(self, branch: str, upload: CheckpointUpload, message: str) -> str:
        """One commit that makes `branch` hold exactly `upload` (stale files deleted); returns its sha."""
        if self._root_commit is None:
            raise RuntimeError("HubRepo.prepare() must run before push()")
        if branch != MAIN:
            root = self._root_commit
            self.call(f"create branch {branch}", lambda: self.api.create_branch(self.repo_id, branch=branch, revision=root, exist_ok=True))
        return self.call(f"push {branch}", lambda: self._commit(branch, upload, message))

    def delete_branch(self, branch: str) -> None:
        """Delete `branch`; one that does not exist (never pushed, or already deleted) is fine."""
        try:
            self.call(f"delete branch {branch}", lambda: self.api.delete_branch(self.repo_id, branch=branch))
        except HubPublishError as err:
            if not isinstance(err.__cause__, RevisionNotFoundError):
                raise

    def _commit(self, branch: str, upload: CheckpointUpload, message: str) -> str:
        remote = set(self.api.list_repo_files(self.repo_id, revision=branch))
        wanted = {f.path_in_repo for f in upload.files} | {MODEL_CARD}
        operations: list[CommitOperationAdd | CommitOperationDelete] = [_addition(f) for f in upload.files]
        operations.append(CommitOperationAdd(MODEL_CARD, upload.card))
        operations += [CommitOperationDelete(path) for path in sorted(remote - wanted - _KEEP_ON_HUB)]
        return self.api.create_commit(self.repo_id, operations, commit_message=message, revision=branch).oid

    def call(self, what: str, fn: Callable[[], _T]) -> _T:
        """`fn()`, retried with backoff on transient failures; Hub errors become typed, actionable errors."""
        attempts = itertools.count()

        def attempt() -> _T:
            with _client_progress_bars(retrying=next(attempts) > 0):
                return fn()

        def log_retry(err: Exception, delay: float) -> None:
            logger.info("Hub: could not %s on %s (%s); retrying in %.1fs", what, self.repo_id, self._describe(err), delay)

        try:
            return self.retry.call(attempt, transient=lambda err: isinstance(err, _TRANSPORT_ERRORS) and classify(err) == "transient", on_retry=log_retry)
        except _TRANSPORT_ERRORS as err:
            kind, reason = classify(err), self._describe(err)
            if kind == "auth":
                raise HubAuthError(
                    f"the Hub refused the credentials ({reason}) for {self.repo_id}. Check hub_token / HF_TOKEN "
                    f"(or `hf auth login`) and that the token has write access to {self.repo_id}"
                ) from err
            if kind == "permanent":
                raise HubPublishError(f"could not {what} on {self.repo_id}: {reason}") from err
            raise HubUnavailableError(f"could not {what} on {self.repo_id} after {self.retry.attempts} attempts: {reason}") from err

    def _describe(self, err: BaseException) -> str:
        return describe(err, self.api.token if isinstance(self.api.token, str) else None)


def _client_progress_bars(retrying: bool) -> ContextManager[object]:
    """huggingface_hub's own upload bars around one Hub call: drawn on a terminal, for a first attempt only.

    Written to a log (stderr not a terminal) every redraw stays as text, and a retried call
    redraws its bars from zero at every attempt. The per-file and "Upload N LFS files" bars
    answer only to huggingface_hub's process-wide switch, so it is off for the length of the
    call (other huggingface_hub bars of the process are quiet meanwhile; `__exit__` turns the
    switch back on only if it was on before).
    """
    return disable_progress_bars() if retrying or not sys.stderr.isatty() else contextlib.nullcontext()


def _addition(file: HubFile) -> CommitOperationAdd:
    operation = CommitOperationAdd(file.path_in_repo, str(file.local))
    # The LFS object id. Old manifests hold it; else it is hashed here, on the publisher's thread, off the save path.
    operation.upload_info.sha256 = bytes.fromhex(file.sha256 or hash_file(file.local, "sha256"))
    return operation


def classify(err: BaseException) -> Literal["auth", "transient", "permanent"]:
    """How to react to a failed Hub call: stop (auth), retry (transient) or give this request up (permanent)."""
    if isinstance(err, HfHubHTTPError):
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            return "auth"
        if status is None or status >= 500 or status in (408, 429):
            return "transient"
        return "permanent"
    return "transient"  # transport errors: timeouts, refused or reset connections


def describe(err: BaseException, token: str | None = None) -> str:
    """One line for logs and checkpoints.json; never contains `token` or the token of HF_TOKEN / the login."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status is not None:
        message = getattr(err, "server_message", None)
        line = f"HTTP {status}" + (f": {message.strip().splitlines()[0]}" if message and message.strip() else "")
    else:
        line = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    for secret in (token, get_token()):
        if secret:
            line = line.replace(secret, "<redacted>")
    return line


# ====================================================================== manual pushes
def publish_checkpoint(
    ckpt_dir: str | Path,
    repo_id: str,
    *,
    revision: str = MAIN,
    private: bool = True,
    include_training_state: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> str:
    """Push one checkpoint to `revision` of `repo_id` now (what `hf-rl-ckpt push` runs); returns the commit sha.

    The checkpoint is verified first (sizes and sha256): the manifest's digests are what
    the Hub is told the files hash to. The card lists this checkpoint only. Each request is
    retried per `retry` on transient failures (by default about 1.5 minutes of retries).

    ```python
    >>> publish_checkpoint("runs/ckpt/step_40", "alice/my-run", revision="step-40")   # doctest: +SKIP
    '3f2a9c...'
    ```

    Raises:
        ConfigError: `repo_id` is not a Hub repo id (checked before anything else).
        CorruptCheckpointError: the checkpoint fails verification.
        HubAuthError, HubUnavailableError, HubPublishError: the Hub refused or could not be reached.
    """
    check_repo_id(repo_id, "repo_id")
    ckpt_dir = Path(ckpt_dir)
    info = verify_checkpoint(ckpt_dir, checksums=True)
    step = int(info["step"])
    metrics = info.get("metrics") or {}
    board = Leaderboard.single(step, metrics, _policy_of(ckpt_dir), branch=revision)
    card = render_model_card(ckpt_dir, step=step, metrics=metrics, leaderboard=board, repo_id=repo_id, revision=revision)
    upload = CheckpointUpload(step, checkpoint_files(ckpt_dir, include_training_state=include_training_state), str(card).encode())
    repo = HubRepo(HfApi(endpoint=endpoint, token=token, library_name="hf_rl_ckpt"), repo_id, retry)
    repo.prepare(private=private)
    return repo.push(revision, upload, f"hf_rl_ckpt: step {step} ({ckpt_dir.name})")


def _policy_of(ckpt_dir: Path) -> RetentionPolicy:
    """The ranking metric recorded in a checkpoint's config.yaml (for its card)."""
    import yaml

    try:
        block = (yaml.safe_load((ckpt_dir / CONFIG_YAML).read_text()) or {}).get("checkpoint") or {}
    except (OSError, yaml.YAMLError):
        block = {}
    return RetentionPolicy(None, block.get("metric_name"), bool(block.get("higher_is_better", True)))


# ====================================================================== the background publisher
@dataclass(frozen=True)
class _Action:
    kind: Literal["push", "main", "delete"]
    step: int
    upload: CheckpointUpload | None = None


class HubPublisher:
    """Mirrors a run's leaderboard to its Hub repo from a background worker (rank 0 only).

    The manager owns it: `enqueue()` after each commit, `drain()` at the end of training.
    Its updates of the `hub` section of checkpoints.json hold `registry.lock`, as a commit's
    update does, so the two never interleave. Each Hub request is retried per `retry`
    (default: `config.hub_retry`).

    ```python
    publisher = HubPublisher(config, registry)
    publisher.enqueue()      # after a commit: returns at once
    publisher.drain()        # end of training: wait, with a progress bar
    publisher.stop()
    ```
    """

    def __init__(self, config: CheckpointConfig, registry: Registry, *, retry: RetryPolicy | None = None) -> None:
        if not config.hub_model_id:
            raise CheckpointError("HubPublisher needs config.hub_model_id")
        self.config = config
        self.repo_id = config.hub_model_id
        self.registry = registry
        self.policy = RetentionPolicy(config.keep_top_k, config.metric_name, config.higher_is_better)
        api = HfApi(endpoint=config.hub_endpoint, token=config.hub_token, library_name="hf_rl_ckpt")
        self.repo = HubRepo(api, self.repo_id, retry or config.hub_retry)
        # Passes are not retried as a whole: the repo retries each request, and a pass that runs out of attempts
        # leaves its pushes pending for the next one (see `_sync`).
        self._worker = BackgroundWorker("hf_rl_ckpt-hub", on_failure=self._crashed)
        self._progress = threading.Lock()
        self._prepared = False
        self._auth_failed = False
        self._done = 0
        self._total = 0

    # ------------------------------------------------------------ control (training thread)
    def enqueue(self) -> None:
        """Record pending pushes in checkpoints.json and queue a pass; returns at once (no network)."""
        try:
            self._update_hub(self._track)
        except (OSError, CheckpointError) as err:  # bookkeeping must not fail a save that is already committed
            logger.warning("could not record pending Hub pushes in %s (%s); publishing goes on", self.registry.layout.registry_path, err)
        self._worker.submit("sync", self._sync)  # a pass still waiting absorbs this request

    def drain(self, progress: bool = True) -> None:
        """Wait until the worker has done everything asked of it (pushed, or given up until the next start)."""
        if not self._worker.idle:
            # disable=None is tqdm's rule: no bar when stderr is not a terminal (a job log would get a redraw every
            # half second, for minutes while the Hub is down); a terminal redraws in place, a notebook shows a widget.
            with tqdm(total=max(self._total, 1), desc=f"Publishing to {self.repo_id}", unit="push", disable=None if progress else True) as bar:

                def show() -> None:
                    with self._progress:
                        bar.total, bar.n = max(self._total, self._done, 1), self._done
                    bar.refresh()

                self._worker.drain(tick=show)
        self._report_unpublished()

    def stop(self) -> None:
        """Let the worker finish the passes asked for, then end it (a later `enqueue` starts a new one)."""
        self._worker.stop()

    # ------------------------------------------------------------ worker
    def _crashed(self, key: Hashable, error: Exception) -> None:
        """A bug in a pass must not kill the worker (or training): log it, keep serving requests."""
        logger.error("Hub publishing to %s failed unexpectedly; pending pushes are retried at the next save", self.repo_id, exc_info=error)

    def _sync(self) -> None:
        """One reconciling pass: push out-of-date branches (best first), move main, delete evicted branches."""
        if self._auth_failed:
            return
        with self.registry.lock:
            data = self.registry.read()
        actions = self._plan(data["checkpoints"], HubState.from_json(data.get("hub"), self.repo_id))
        with self._progress:
            self._done, self._total = 0, len(actions)
        if not actions:
            return
        try:
            if not self._prepared:
                self.repo.prepare(private=self.config.hub_private)
                self._prepared = True
            for action in actions:
                self._execute(action)
                with self._progress:
                    self._done += 1
        except HubAuthError as err:
            self._auth_failed = True
            logger.error(
                "Hub publishing stopped: %s. Training continues and checkpoints stay local; the pushes recorded as "
                "pending in %s resume at the next start, or run `hf-rl-ckpt push CKPT --repo-id %s`.",
                err, self.registry.layout.registry_path, self.repo_id,
            )
        except HubUnavailableError as err:
            logger.warning(
                "Hub publishing paused: %s. The pushes recorded as pending in %s are retried at the next save or start.",
                err, self.registry.layout.registry_path,
            )

    def _plan(self, rows: list[dict[str, Any]], hub: HubState) -> list[_Action]:
        board = Leaderboard.from_rows(rows, self.policy)
        metrics = {row["step"]: row.get("metrics") or {} for row in rows}
        uploads: dict[int, CheckpointUpload] = {}
        actions = []
        for step in board.steps:
            upload = self._upload(step, metrics[step], board)
            if upload is None:
                continue
            uploads[step] = upload
            entry = hub.steps.get(step)
            if entry is None or entry.status != PUSHED or entry.fingerprint != upload.fingerprint:
                actions.append(_Action("push", step, upload))
        main = hub.main
        if board.main in uploads and (main is None or main.step != board.main or main.fingerprint != uploads[board.main].fingerprint):
            actions.append(_Action("main", board.main, uploads[board.main]))
        for step, entry in hub.steps.items():
            if step not in board.steps and not entry.evicted:
                actions.append(_Action("delete", step))
        return actions

    def _upload(self, step: int, metrics: Mapping[str, Any], board: Leaderboard) -> CheckpointUpload | None:
        ckpt_dir = self.registry.layout.step_dir(step)
        try:
            if Contents.of(ckpt_dir).deployable_dir is None:  # shards only (save_consolidated: final, before the last save)
                logger.debug("Hub: step %d has no folder to serve (save_consolidated: %s); not published", step, self.config.save_consolidated)
                return None
            files = checkpoint_files(ckpt_dir, include_training_state=self.config.hub_push_training_state)
            card = render_model_card(ckpt_dir, step=step, metrics=metrics, leaderboard=board, repo_id=self.repo_id, revision=branch_for(step))
        except (OSError, CheckpointError) as err:
            if ckpt_dir.is_dir():
                self._failed(step, f"cannot publish {ckpt_dir}: {err}")
            return None  # else: evicted since the registry was read; the next pass deletes its branch
        return CheckpointUpload(step, files, str(card).encode())

    def _execute(self, action: _Action) -> None:
        step, branch = action.step, branch_for(action.step)
        try:
            if action.kind == "delete":
                self.repo.delete_branch(branch)
                self._update_hub(lambda hub, rows: hub.steps.pop(step, None))
                logger.info("Hub: deleted branch %s of evicted checkpoint step %d from %s", branch, step, self.repo_id)
                return
            assert action.upload is not None
            fingerprint = action.upload.fingerprint
            if action.kind == "main":
                sha = self.repo.push(MAIN, action.upload, f"hf_rl_ckpt: main <- step {step} (best)")
                main = HubMain(step, sha, fingerprint, _now())
                self._update_hub(lambda hub, rows: setattr(hub, "main", main))
                logger.info("Hub: main of %s now holds step %d (commit %s)", self.repo_id, step, sha[:12])
                return
            sha = self.repo.push(branch, action.upload, f"hf_rl_ckpt: step {step}")
            pushed = HubEntry(step, branch, PUSHED, commit=sha, fingerprint=fingerprint, updated_at=_now())
            self._update_hub(lambda hub, rows: hub.steps.update({step: pushed}))
            logger.info("Hub: step %d is on %s@%s (commit %s)", step, self.repo_id, branch, sha[:12])
        except (HubAuthError, HubUnavailableError) as err:
            self._failed(step, str(err), log=False)
            raise
        except HubPublishError as err:
            self._failed(step, str(err))
        except (OSError, ValueError) as err:  # a file vanished mid-push (the client raises ValueError for a missing path)
            if self.registry.layout.step_dir(step).is_dir():
                self._failed(step, f"cannot read {self.registry.layout.step_dir(step)}: {err}")

    # ------------------------------------------------------------ the `hub` section of checkpoints.json
    def _update_hub(self, change: Callable[[HubState, list[dict[str, Any]]], object]) -> None:
        """Read-modify-write the `hub` section under the registry lock (the registry keeps sections it does not own)."""
        with self.registry.lock:
            data = self.registry.read()
            hub = HubState.from_json(data.get("hub"), self.repo_id)
            before = json.dumps(data.get("hub"), sort_keys=True)
            change(hub, data["checkpoints"])
            stored = hub.to_json()
            if json.dumps(stored, sort_keys=True) != before:
                data["hub"] = stored
                self.registry.write(data)

    def _track(self, hub: HubState, rows: list[dict[str, Any]]) -> None:
        """New leaderboard checkpoints become pending; a pushed branch that leaves it is kept (`hub_keep_evicted`) or left for deletion."""
        board = Leaderboard.from_rows(rows, self.policy)
        for step in board.steps:
            hub.steps.setdefault(step, HubEntry(step, branch_for(step)))
        for step, entry in hub.steps.items():
            # Off the leaderboard with hub_keep_evicted: kept. Back on it, or the setting turned off: the next pass deletes it.
            entry.evicted = step not in board.steps and self.config.hub_keep_evicted and entry.status == PUSHED

    def _failed(self, step: int, error: str, log: bool = True) -> None:
        if log:
            logger.error("Hub: could not publish step %d to %s: %s", step, self.repo_id, error)

        def mark(hub: HubState, rows: list[dict[str, Any]]) -> None:
            entry = hub.steps.get(step)
            if entry is not None and entry.status != PUSHED:
                entry.status, entry.error, entry.updated_at = FAILED, error, _now()

        self._update_hub(mark)

    def _report_unpublished(self) -> None:
        with self.registry.lock:
            data = self.registry.read()
        steps = HubState.from_json(data.get("hub"), self.repo_id).steps
        board = Leaderboard.from_rows(data["checkpoints"], self.policy)
        waiting = [step for step in sorted(board.steps) if step not in steps or steps[step].status != PUSHED]
        if waiting:
            logger.warning(
                "%d checkpoint(s) are not on the Hub yet (step(s) %s; see 'hub' in %s). They are pushed at the next start "
                "with push_to_hub, or run `hf-rl-ckpt push CKPT --repo-id %s --revision step-<N>`.",
                len(waiting), ", ".join(map(str, waiting)), self.registry.layout.registry_path, self.repo_id,
            )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class HubPublishing(Subscriber):
    """The after-commit subscriber that mirrors the run's retained checkpoints on the Hub (see `HubPublisher`).

    Each event only records what is pending (local bookkeeping); the uploads run on the
    publisher's thread. Created at start, it first resumes what an earlier process left pending.
    """

    def __init__(self, config: CheckpointConfig, registry: Registry) -> None:
        self.publisher = HubPublisher(config, registry)
        self.publisher.enqueue()

    def on_committed(self, event: CheckpointCommitted) -> None:
        faultpoint("commit.before_hub_enqueue")
        self.publisher.enqueue()

    def on_evicted(self, event: CheckpointEvicted) -> None:
        self.publisher.enqueue()  # its branch goes (or stays, per hub_delete_evicted) at the next pass

    def drain(self) -> None:
        self.publisher.drain()

    def close(self) -> None:
        self.publisher.stop()
