"""The remote tier: committed checkpoints copied to storage that outlives the node (any fsspec URL).

Saves commit locally exactly as without it (fast, atomic). Then `RemoteTier`, an
after-commit subscriber, uploads each committed checkpoint on a background worker, so
training never waits for the network. Object stores have no atomic rename, so a remote
checkpoint's commit is its marker, `training_info.json` (which carries the manifest): it is
uploaded last, after every file it lists, and deleted first when retention evicts the
checkpoint. A prefix without it does not exist for readers (`RemoteStore.committed`); the
next upload of that checkpoint completes it (files already there with the right size are
kept) and a download checks every byte against the manifest.

```python
>>> store = RemoteStore("memory://bucket/run")
>>> store.check_access()
>>> store.committed()
[]

```

`RemoteStore` is the whole storage surface (list, upload, download, delete); `RemoteTier`
holds the policies: what to upload when, retention's deletes, catching up after a restart,
fetching the newest checkpoint onto a fresh node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterator, Mapping

import fsspec
from fsspec.callbacks import Callback

from .atomic import commit_directory
from .background import BackgroundWorker, RetryPolicy
from .errors import ConfigError, RemoteStorageError
from .events import CheckpointCommitted, CheckpointEvicted, Subscriber
from .faultpoint import faultpoint
from .layout import DOWNLOAD_PREFIX, REPLACED_PREFIX, TRAINING_INFO, CheckpointLayout, commit_order, safe_join
from .verify import verify_checkpoint

logger = logging.getLogger("hf_rl_ckpt")

#: The file whose presence makes a remote checkpoint committed: written last, deleted first.
MARKER = TRAINING_INFO

#: The pip extra that installs each protocol's fsspec backend.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure", "hdfs": "hdfs"}


def is_remote_url(path: str | Any) -> bool:
    """True for a URL with a protocol (`s3://...`, `file://...`), False for a plain local path."""
    return isinstance(path, str) and "://" in path


def is_transient(error: Exception) -> bool:
    """May trying again help? Network and throttling errors yes; missing objects, denied access and bad input no."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ConfigError)):
        return False
    if isinstance(error, (OSError, TimeoutError, ConnectionError)):
        return True
    name = type(error).__name__  # botocore's and aiohttp's errors subclass neither
    return any(word in name for word in ("Connection", "Timeout", "Throttl", "SlowDown", "ServiceUnavailable"))


def _hint(error: Exception) -> str:
    """What to do about an access error, by its kind."""
    name = type(error).__name__
    if "Credentials" in name or isinstance(error, PermissionError):
        return ("the credentials are missing or not allowed to write there: set them the way the filesystem reads them "
                "(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or in remote_storage_options")
    if isinstance(error, FileNotFoundError):
        return "the bucket (or container) does not exist: create it, or fix remote_dir"
    if is_transient(error):
        return "the endpoint cannot be reached: check the network and the endpoint setting (for S3: AWS_ENDPOINT_URL)"
    return "check remote_dir and remote_storage_options"


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A committed remote checkpoint: its folder name under `remote_dir`, and its training_info.json."""

    name: str
    info: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.info["step"])

    @property
    def order(self) -> tuple[int, str, int]:
        return commit_order(self.step, self.info)


class _EachFile(Callback):
    """Passes the `remote.file_uploaded` fault point as each file of a batch is uploaded (crash tests kill there)."""

    def relative_update(self, inc: int = 1) -> None:
        super().relative_update(inc)
        faultpoint("remote.file_uploaded")


class RemoteStore:
    """One `remote_dir` on an fsspec filesystem: everything the remote tier reads and writes goes through here.

    Args:
        url: an fsspec URL (`s3://bucket/runs/a`, `gs://...`, `az://...`, `hdfs://...`, `file:///...`).
        storage_options: handed to the filesystem (credentials, endpoint, ...); otherwise each
            filesystem reads its standard environment (for S3 what botocore reads: `AWS_ENDPOINT_URL`, ...).

    Raises:
        ConfigError: `url` is not a URL, or its filesystem's backend is not installed.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if not is_remote_url(url):
            raise ConfigError(f"remote_dir must be a URL such as 's3://bucket/runs/my-run' (got {url!r}); "
                              "for a local or mounted path use file:///absolute/path")
        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0]
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        except ImportError as err:
            extra = EXTRAS.get(protocol)
            install = f"pip install 'hf_rl_ckpt[{extra}]'" if extra else "install the fsspec backend for it"
            raise ConfigError(f"remote_dir {self.url}: the {protocol}:// filesystem is not installed ({err}); {install}") from err
        except (ValueError, TypeError) as err:
            raise ConfigError(f"remote_dir {self.url}: {err}; check the URL and remote_storage_options") from err
        self.root = self.root.rstrip("/")
        self._local = "file" in self.fs.protocol or "local" in self.fs.protocol

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    def _path(self, name: str, rel: str = "") -> str:
        return f"{self.root}/{name}/{rel}" if rel else f"{self.root}/{name}"

    def check_access(self) -> None:
        """Write and delete one small object under the root: an unreachable endpoint, missing credentials or a denied bucket fail here, at start.

        Raises:
            RemoteStorageError: naming remote_dir, the error, and what to do.
        """
        probe = self._path(f".hf_rl_ckpt-access-check-{uuid.uuid4().hex}")
        try:
            if self._local:  # object stores have no folders to make; a local one does
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"hf_rl_ckpt write check\n")
            self.fs.rm_file(probe)
        except Exception as err:
            raise RemoteStorageError(
                f"remote_dir {self.url} is not usable ({type(err).__name__}: {err}): {_hint(err)}. Nothing was written; fix it and start again"
            ) from err

    # ------------------------------------------------------------- read
    def committed(self) -> list[RemoteCheckpoint]:
        """The committed checkpoints (those whose marker is there), oldest commit first (the newest last)."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            if entry.get("type") != "directory":
                continue
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            info = self.read_info(name)
            if info is not None:
                found.append(RemoteCheckpoint(name, info))
        return sorted(found, key=lambda checkpoint: checkpoint.order)

    def read_info(self, name: str) -> dict[str, Any] | None:
        """The training_info.json of remote checkpoint `name`, or None when it is not committed (no marker)."""
        try:
            info = json.loads(self.fs.cat_file(self._path(name, MARKER)))
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RemoteStorageError(f"{self._path(name, MARKER)} is not valid JSON ({err}); delete that remote checkpoint") from err
        if not isinstance(info, dict) or not isinstance(info.get("manifest"), dict) or not isinstance(info.get("step"), int):
            raise RemoteStorageError(f"{self._path(name, MARKER)} is not an hf_rl_ckpt training_info.json (no manifest or step)")
        return info

    def problems(self, name: str, info: Mapping[str, Any]) -> list[str]:
        """What is wrong with committed remote checkpoint `name` by its listing: files of its manifest missing or of the wrong size."""
        sizes = self._sizes(name)
        return [
            f"{self._path(name, rel)}: " + ("missing" if rel not in sizes else f"size {sizes[rel]} bytes, manifest says {entry['size']}")
            for rel, entry in info["manifest"].items() if sizes.get(rel) != entry.get("size")
        ]

    # ------------------------------------------------------------- write
    def _sizes(self, name: str) -> dict[str, int | None]:
        prefix = self._path(name)
        self.fs.invalidate_cache(prefix)
        try:
            return {path[len(prefix) + 1:]: entry.get("size") for path, entry in self.fs.find(prefix, detail=True).items()}
        except FileNotFoundError:
            return {}

    def upload_files(self, local: Path, name: str, sizes: Mapping[str, int], *, present: Mapping[str, int | None] | None = None) -> int:
        """Copy files of folder `local` (relative path -> size) to `<remote_dir>/<name>/`, skipping those already there with that size; return the bytes copied.

        No marker: a rank on its own disk uploads its files this way, and rank 0's `upload`
        commits the checkpoint once every file is there.
        """
        present = self._sizes(name) if present is None else present
        todo = [rel for rel, size in sizes.items() if present.get(rel) != size]
        if todo:
            if self._local:
                for rel in todo:
                    self.fs.makedirs(self._path(name, rel).rsplit("/", 1)[0], exist_ok=True)
            self.fs.put([str(local / rel) for rel in todo], [self._path(name, rel) for rel in todo], callback=_EachFile())
        return sum(sizes[rel] for rel in todo)

    def upload(self, local: Path, name: str, *, wait_for_others: float = 0.0) -> int:
        """Copy the committed checkpoint folder `local` to `<remote_dir>/<name>/`, its marker last; return the bytes uploaded.

        Idempotent: files already there with their manifest size are kept, so an upload cut
        short (a crash, a lost connection) is completed rather than redone. A committed
        remote copy of another save of the same step is uncommitted first (its marker
        removed), so no reader ever sees a mix of the two. Files of the manifest that are not
        in `local` (written by ranks on their own disks, which upload them) are waited for,
        up to `wait_for_others` seconds, before the marker is written.

        Raises:
            RemoteStorageError: files of other ranks did not arrive in time (the checkpoint stays uncommitted remotely).
        """
        marker = (local / MARKER).read_bytes()
        manifest: dict[str, dict[str, Any]] = json.loads(marker)["manifest"]
        present = self._sizes(name)
        if MARKER in present:
            self.fs.rm_file(self._path(name, MARKER))
        stale = [rel for rel in present if rel not in manifest and rel != MARKER]
        if stale:
            self.fs.rm([self._path(name, rel) for rel in stale])
        here = {rel: entry["size"] for rel, entry in manifest.items() if (local / rel).is_file()}
        nbytes = self.upload_files(local, name, here, present=present)
        elsewhere = {rel: entry["size"] for rel, entry in manifest.items() if rel not in here}
        if elsewhere:
            self._await_files(name, elsewhere, wait_for_others)
        faultpoint("remote.before_marker")
        self.fs.pipe_file(self._path(name, MARKER), marker)
        return nbytes + len(marker)

    def _await_files(self, name: str, sizes: Mapping[str, int], timeout: float) -> None:
        """Wait until every file of `sizes` is in `<remote_dir>/<name>/` with its size (polling the listing, backing off to 5 s)."""
        deadline, delay = time.monotonic() + timeout, 0.1
        while True:
            present = self._sizes(name)
            missing = sorted(rel for rel, size in sizes.items() if present.get(rel) != size)
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise RemoteStorageError(
                    f"{self._path(name)}: files written by other ranks (on their own disks) did not arrive within {timeout:g}s: "
                    f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}; it stays uncommitted remotely until they do"
                )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def download(self, name: str, dest: Path) -> dict[str, Any]:
        """Copy committed remote checkpoint `name` into the new folder `dest`, its marker last; return its training_info.

        The caller verifies `dest` against the manifest before using it.

        Raises:
            RemoteStorageError: `name` is not committed remotely.
        """
        info = self.read_info(name)
        if info is None:
            raise RemoteStorageError(f"{self._path(name)} is not a committed checkpoint (no {MARKER}); `hf-rl-ckpt list {self.url}` shows those that are")
        targets = [safe_join(dest, rel) for rel in info["manifest"]]  # refuses a manifest path leading outside dest
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        if targets:
            self.fs.get([self._path(name, rel) for rel in info["manifest"]], [str(target) for target in targets])
        (dest / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        return info

    def delete(self, name: str) -> None:
        """Remove remote checkpoint `name`: its marker first (it stops being committed at once), then the rest."""
        for target, recursive in ((self._path(name, MARKER), False), (self._path(name), True)):
            try:
                self.fs.rm(target, recursive=recursive)
            except FileNotFoundError:
                pass
        self.fs.invalidate_cache(self._path(name))


@contextlib.contextmanager
def local_copy(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """A remote checkpoint (`s3://bucket/run/step_40`) downloaded into a temporary folder for the block (the CLI reads it there).

    Raises:
        RemoteStorageError: the URL is not a committed remote checkpoint.
        FileNotFoundError: a file its manifest lists is missing remotely.
    """
    parent, _, name = url.rstrip("/").rpartition("/")
    with tempfile.TemporaryDirectory(prefix="hf_rl_ckpt-") as tmp:
        dest = Path(tmp) / name
        dest.mkdir()
        RemoteStore(parent, storage_options).download(name, dest)
        yield dest


def fetch(store: RemoteStore, name: str, layout: CheckpointLayout) -> Path:
    """Download remote checkpoint `name` into `layout`'s directory, verified against its manifest, committed atomically.

    It is staged under `.incomplete/` (removed by the next start if this one dies), checked
    byte for byte (size and sha256 of every file), then renamed into place.

    Raises:
        CorruptCheckpointError: the copy does not match its manifest (nothing is left behind).
        RemoteStorageError: `name` is not committed remotely.
    """
    staging = layout.incomplete_root / f"{DOWNLOAD_PREFIX}{name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    final = layout.root / name
    try:
        store.download(name, staging)
        verify_checkpoint(staging, checksums=True)
        # A rank on its own disk may hold its part of this checkpoint (no marker): the whole copy replaces it.
        commit_directory(staging, final, parked=layout.trash_root / f"{REPLACED_PREFIX}{name}" if final.exists() else None)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("downloaded %s/%s into %s in %.2fs (verified)", store.url, name, layout.root, time.perf_counter() - started)
    return final


class RemoteTier(Subscriber):
    """Keeps `remote_dir` a copy of the run's retained checkpoints (rank 0; see the module docstring).

    Uploads and deletes run on one background worker in commit order; transient failures
    are retried per `retry`; a failure that persists is logged (one ERROR per kind of
    failure, then quieter) and training goes on with its local checkpoints.
    """

    def __init__(self, store: RemoteStore, layout: CheckpointLayout, retry: RetryPolicy, *, rank_timeout: float = 1800.0) -> None:
        self.store, self.layout, self.rank_timeout = store, layout, rank_timeout
        self.worker = BackgroundWorker("hf_rl_ckpt-remote", retry=retry, transient=is_transient, on_failure=self._failed)
        self._failures_reported: set[tuple[str, str]] = set()
        # Set by the manager: some rank does not see rank 0's checkpoint_dir (node-local disks); this one does not.
        self.node_local = self.own_disk = False

    # ------------------------------------------------------------- events
    def on_committed(self, event: CheckpointCommitted) -> None:
        self._submit_upload(event.path.name)

    def on_evicted(self, event: CheckpointEvicted) -> None:
        self.worker.submit(("delete", event.name), lambda: self._delete(event.name))

    def drain(self) -> None:
        self.worker.drain()

    def close(self) -> None:
        self.worker.stop()

    # ------------------------------------------------------------- policies
    def catch_up(self) -> None:
        """At start: upload each local checkpoint the remote lacks, or holds from another save (an upload cut short by a crash)."""
        remote = {checkpoint.name: checkpoint.info for checkpoint in self.store.committed()}
        if self.own_disk:  # this rank's files of checkpoints not committed remotely yet
            for path in self._own_folders().values():
                if path.name not in remote and not (path / MARKER).is_file():
                    self._submit_own_upload(path.name)
            return
        for step, info in self.layout.committed_infos().items():
            name = self.layout.step_name(step)
            if info is not None and same_commit(remote.get(name), info):
                continue
            logger.warning("remote_dir %s lacks %s (an upload did not finish before the last run ended): uploading it", self.store.url, name)
            self._submit_upload(name)

    def fetch_newest(self) -> Path | None:
        """`resume.mode: auto`: when the newest commit of both tiers is remote only (a fresh node), download it; return where.

        A remote that cannot be read or a copy that fails verification is logged, and the
        local checkpoints are used.
        """
        try:
            remote = self.store.committed()
            if not remote:
                return None
            newest = remote[-1]
            orders = [commit_order(step, info) for step, info in self.layout.committed_infos().items() if info is not None]
            if orders and max(orders) >= newest.order:  # the newest commit is local (also when it is this very save)
                return None
            logger.info("the newest checkpoint is %s/%s (not in %s): downloading it", self.store.url, newest.name, self.layout.root)
            return fetch(self.store, newest.name, self.layout)
        except Exception as err:  # the local checkpoints still resume the run
            logger.error("cannot resume from remote_dir %s (%s: %s); resuming from the local checkpoints", self.store.url, type(err).__name__, err)
            return None

    # ------------------------------------------------------------- node-local disks
    # A rank whose checkpoint_dir is its own disk keeps the files it wrote under `<name>/` there
    # (no marker: rank 0's copy is the committed one) and uploads them itself; rank 0 writes the
    # marker once they have arrived. Resuming, such a rank downloads the whole checkpoint.

    def keep_own_files(self, name: str, retained: list[str]) -> None:
        """After a save (every rank on its own disk): put this rank's staged files in place, drop evicted ones, upload them."""
        staging, final = self.layout.incomplete_root / name, self.layout.root / name
        shutil.rmtree(final, ignore_errors=True)
        if staging.is_dir():
            staging.rename(final)
        for path in self._own_folders().values():
            if path.name not in retained:
                shutil.rmtree(path, ignore_errors=True)
        self._submit_own_upload(name)

    def localize(self, name: str) -> Path:
        """The whole checkpoint `name` in this rank's checkpoint_dir: there already (it has its marker), or downloaded."""
        path = self.layout.root / name
        return path if (path / MARKER).is_file() else fetch(self.store, name, self.layout)

    def _own_folders(self) -> dict[int, Path]:
        if not self.layout.root.is_dir():
            return {}
        found = {self.layout.parse_step(entry.name): entry for entry in self.layout.root.iterdir() if entry.is_dir()}
        return {step: path for step, path in found.items() if step is not None}

    def _submit_own_upload(self, name: str) -> None:
        def upload() -> None:
            local = self.layout.root / name
            if local.is_dir() and not (local / MARKER).is_file():
                files = {path.relative_to(local).as_posix(): path.stat().st_size for path in local.rglob("*") if path.is_file()}
                self.store.upload_files(local, name, files)

        self.worker.submit(("upload", name), upload)

    # ------------------------------------------------------------- jobs
    def _submit_upload(self, name: str) -> None:
        if not self.worker.idle:
            newest = self.layout.latest()
            logger.warning(
                "remote_dir %s lags behind %s: an upload is still running when %s is committed (newest local: %s); "
                "training goes on, the uploads catch up in order", self.store.url, self.layout.root, name, newest.name if newest else None,
            )
        self.worker.submit(("upload", name), lambda: self._upload(name))

    def _upload(self, name: str) -> None:
        local = self.layout.root / name
        if not (local / MARKER).is_file():
            return  # evicted (or replaced) since it was queued: nothing to copy
        started = time.perf_counter()
        nbytes = self.store.upload(local, name, wait_for_others=self.rank_timeout)
        elapsed = time.perf_counter() - started
        logger.info("uploaded %s to %s (%.1f MB in %.2fs, %.1f MB/s)", name, self.store.url, nbytes / 1e6, elapsed, nbytes / 1e6 / max(elapsed, 1e-9))

    def _delete(self, name: str) -> None:
        self.store.delete(name)
        logger.info("deleted %s/%s (evicted locally)", self.store.url, name)

    def _failed(self, key: Hashable, error: Exception) -> None:
        action, name = key  # type: ignore[misc]
        kind = (action, type(error).__name__)
        log = logger.error if kind not in self._failures_reported else logger.warning
        self._failures_reported.add(kind)
        log("remote_dir %s: could not %s %s (%s: %s); the local checkpoint is intact and training goes on%s",
            self.store.url, action, name, type(error).__name__, error,
            "; the next start uploads what is missing" if action == "upload" else "")


def same_commit(one: Mapping[str, Any] | None, other: Mapping[str, Any]) -> bool:
    """Do two training_info.json describe the same save (not just the same step)? None (no such checkpoint): no."""
    return one is not None and all(one.get(key) == other.get(key) for key in ("step", "commit_seq", "created_at"))
