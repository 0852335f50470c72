"""A local, Hub-compatible HTTP server for tests and notebooks (standard library only).

Why this exists: checkpoint publishing must be tested against the *real* ``huggingface_hub`` client (its
preupload / LFS / NDJSON-commit protocol, its typed errors, its retries), not against mocks of it, and CI
has no network access to huggingface.co. :class:`HubServer` speaks the subset of the Hub HTTP API that the
client uses for repos, commits, branches and downloads, and stores everything on disk under ``root_dir``:

* ``objects/<sha256[:2]>/<sha256[2:]>`` - content-addressed blobs (regular and LFS files alike), so a
  re-upload of unchanged content is detected server-side and skipped by the LFS batch API;
* ``repos/<type>/<namespace>/<name>/`` - ``meta.json`` (visibility, creation date), ``refs.json``
  (branch -> commit id) and ``commits/<id>.json`` (parents, message, and the full ``path -> blob`` map).

Like the real Hub, a new repo starts with a system commit holding the default ``.gitattributes``; a file
is uploaded through LFS when ``.gitattributes`` marks it ``filter=lfs``, when it is larger than 10 MiB, or
when its first 512 bytes contain a NUL byte (the server's preupload answer decides, not the client).

Tests use :meth:`HubServer.fail_next` / :meth:`HubServer.set_auth_failure` for fault injection and
:attr:`HubServer.requests` / :attr:`HubServer.uploaded_objects` to assert on traffic. :func:`hub_env`
points an already-imported ``huggingface_hub`` at the server. Run ``python -m
hf_rl_ckpt.testing.hub_server --root DIR --port N`` to serve a directory by hand.

Not implemented (answered with 404/400): pull requests, tags, Xet storage, multipart LFS uploads, gated
repos, Spaces runtime endpoints. Repo ids always have a namespace (``namespace/name``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "RequestRecord", "hub_env", "main"]

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files above 10 MiB
_CHUNK = 1024 * 1024
_COMMIT_ID = re.compile(r"[0-9a-f]{5,40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

# Default `.gitattributes` of a new model repo on huggingface.co: it is what makes `*.safetensors` LFS files.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in """
        *.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.lz4 *.mlmodel *.model *.msgpack *.npy
        *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.*
        *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*
    """.split()
)

# repo type -> (plural used in /api/<plural>/..., prefix used in /<prefix><repo_id>/resolve/...)
_REPO_TYPES: dict[str, tuple[str, str]] = {
    "model": ("models", ""),
    "dataset": ("datasets", "datasets/"),
    "space": ("spaces", "spaces/"),
    "kernel": ("kernels", "kernels/"),
}
_TYPE_BY_PLURAL = {plural: kind for kind, (plural, _) in _REPO_TYPES.items()}


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------------------


def _now_iso() -> str:
    """Current UTC time in the Hub's date format (``%Y-%m-%dT%H:%M:%S.mmmZ``, parsed by the client)."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_blob_oid(content: bytes) -> str:
    """Git object id of a blob: the client compares it with its local sha1 to skip unchanged regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _glob_regex(glob: str) -> str:
    """Translate a git wildmatch pattern (``*``, ``?``, ``**``) into a regex body."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(glob[i], re.escape(glob[i])))
            i += 1
    return "".join(out)


def _git_pattern_matches(pattern: str, path: str) -> bool:
    """Git semantics: a pattern without an inner slash matches the basename, otherwise the whole path."""
    pattern = pattern.rstrip("/")
    if "/" in pattern:
        return re.fullmatch(_glob_regex(pattern.lstrip("/")), path) is not None
    return re.fullmatch(_glob_regex(pattern), path.rsplit("/", 1)[-1]) is not None


def _is_lfs_by_gitattributes(gitattributes: str, path: str) -> bool:
    """Whether the last ``.gitattributes`` line matching ``path`` that sets a filter selects ``filter=lfs``."""
    is_lfs = False
    for line in gitattributes.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#") or not _git_pattern_matches(parts[0], path):
            continue
        filters = [attr for attr in parts[1:] if attr.lstrip("-!").startswith("filter")]
        if filters:
            is_lfs = filters[-1] == "filter=lfs"
    return is_lfs


def _is_gitignored(gitignore: str, path: str) -> bool:
    """Whether ``path`` (or one of its parent folders) is ignored by ``gitignore``; last match wins."""
    candidates = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    ignored = False
    for line in gitignore.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        if any(_git_pattern_matches(pattern, candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def _latin1_safe(text: str) -> str:
    """HTTP header values must be latin-1: replace anything else so an odd path can't crash a response."""
    return text.encode("ascii", "replace").decode("ascii")


# --------------------------------------------------------------------------------------------------------------
# Errors and protocol types
# --------------------------------------------------------------------------------------------------------------


class _HubError(Exception):
    """An HTTP error answer; ``code`` goes to ``X-Error-Code`` so the client raises its typed error."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def _repo_not_found(status: int = 404) -> _HubError:
    return _HubError(status, "Repository not found", "RepoNotFound")


def _revision_not_found(revision: str) -> _HubError:
    return _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _entry_not_found(path: str, commit_id: str | None = None) -> _HubError:
    # `X-Repo-Commit` lets `hf_hub_download` cache the non-existence of the file for that commit.
    headers = {"X-Repo-Commit": commit_id} if commit_id else {}
    return _HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)


class RepoRef(NamedTuple):
    """A repository address: its type (``model``/``dataset``/...) and ``namespace/name`` id."""

    kind: str
    repo_id: str

    @property
    def url_prefix(self) -> str:
        """Path prefix of the repo's web/git URLs (empty for models)."""
        return _REPO_TYPES[self.kind][1]


@dataclass(frozen=True)
class RequestRecord:
    """One served request, as logged in :attr:`HubServer.requests`."""

    method: str
    path: str  # percent-encoded request path as sent, without the query string
    status: int


@dataclass
class _FaultRule:
    """Pending injected failures (see :meth:`HubServer.fail_next`)."""

    remaining: int
    status: int
    path_contains: str | None


@dataclass
class _Response:
    """What a route handler answers; either an in-memory ``body`` or a byte range of a stored ``file``."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None
    file_start: int = 0
    file_length: int = 0

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
        merged = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        return cls(status=status, headers=merged, body=json.dumps(payload).encode())

    @classmethod
    def error(cls, err: _HubError) -> _Response:
        headers = {"X-Error-Message": _latin1_safe(err.message), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        return cls.json({"error": err.message}, status=err.status, headers=headers)


# --------------------------------------------------------------------------------------------------------------
# On-disk, git-like storage
# --------------------------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, payload: Any) -> None:
    """Write-then-rename so a crash (or a concurrent reader) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class _Storage:
    """Repos, commits and branches on disk; one lock serialises all metadata changes.

    A commit stores the complete ``path -> entry`` map of its tree (entries: ``sha256``, ``size``, ``lfs``,
    git ``oid``), so resolving any revision is a single file read and branches are just pointers.
    """

    def __init__(self, root: Path) -> None:
        self.objects_dir = root / "objects"
        self.repos_dir = root / "repos"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.repos_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # ---- blobs ------------------------------------------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        return self.objects_dir / sha256[:2] / sha256[2:]

    def has_object(self, sha256: str) -> bool:
        return _SHA256.fullmatch(sha256) is not None and self.object_path(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` (no-op if already stored) and return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_object(sha256):
            self._install(sha256, lambda f: f.write(data))
        return sha256

    def put_stream(self, chunks: Iterable[bytes], expected_sha256: str, expected_size: int) -> int:
        """Stream an upload to disk while hashing; refuse it unless it matches the announced oid and size."""
        digest = hashlib.sha256()
        size = 0

        def _write(f: IO[bytes]) -> None:
            nonlocal size
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
            if digest.hexdigest() != expected_sha256 or size != expected_size:
                raise _HubError(
                    400,
                    f"Uploaded content (sha256={digest.hexdigest()}, size={size}) does not match "
                    f"the announced object (sha256={expected_sha256}, size={expected_size})",
                )

        self._install(expected_sha256, _write)
        return size

    def _install(self, sha256: str, write: Callable[[IO[bytes]], object]) -> None:
        final = self.object_path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.objects_dir, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp_name, final)
        except BaseException:
            os.unlink(tmp_name)
            raise

    # ---- repos ------------------------------------------------------------------------------------------------

    def repo_dir(self, repo: RepoRef) -> Path:
        return self.repos_dir / repo.kind / repo.repo_id

    def meta(self, repo: RepoRef) -> dict[str, Any] | None:
        path = self.repo_dir(repo) / "meta.json"
        return _read_json(path) if path.is_file() else None

    def create_repo(self, repo: RepoRef, private: bool, author: str) -> dict[str, Any] | None:
        """Create ``repo`` with its initial ``.gitattributes`` commit; returns its meta, None if it exists.

        ``meta.json`` is written last: a half-created repo is invisible to readers.
        """
        with self.lock:
            if self.meta(repo) is not None:
                return None
            files = {".gitattributes": self.regular_entry(DEFAULT_GITATTRIBUTES.encode())}
            commit_id = self._write_commit(repo, [], files, "initial commit", "", author)
            _write_json_atomic(self.repo_dir(repo) / "refs.json", {DEFAULT_BRANCH: commit_id})
            meta = {"id": uuid.uuid4().hex[:24], "private": private, "created_at": _now_iso()}
            _write_json_atomic(self.repo_dir(repo) / "meta.json", meta)
            return meta

    def delete_repo(self, repo: RepoRef) -> bool:
        """Delete the repo's metadata; blobs stay (they are shared, content-addressed)."""
        with self.lock:
            if self.meta(repo) is None:
                return False
            shutil.rmtree(self.repo_dir(repo))
            return True

    # ---- refs and commits -------------------------------------------------------------------------------------

    def branches(self, repo: RepoRef) -> dict[str, str]:
        return dict(_read_json(self.repo_dir(repo) / "refs.json"))

    def read_commit(self, repo: RepoRef, commit_id: str) -> dict[str, Any]:
        return dict(_read_json(self.repo_dir(repo) / "commits" / f"{commit_id}.json"))

    def resolve(self, repo: RepoRef, revision: str) -> dict[str, Any]:
        """Resolve a branch name (optionally ``refs/heads/...``) or a (prefix of a) commit id to a commit."""
        with self.lock:
            branches = self.branches(repo)
            name = revision.removeprefix("refs/heads/")
            if name in branches:
                return self.read_commit(repo, branches[name])
            if _COMMIT_ID.fullmatch(revision):
                matches = [p.stem for p in (self.repo_dir(repo) / "commits").glob(f"{revision}*.json")]
                if len(matches) == 1:
                    return self.read_commit(repo, matches[0])
            raise _revision_not_found(revision)

    def history(self, repo: RepoRef, commit: dict[str, Any]) -> list[dict[str, Any]]:
        """``commit`` and its first-parent ancestors, newest first."""
        out = [commit]
        while out[-1]["parents"]:
            out.append(self.read_commit(repo, out[-1]["parents"][0]))
        return out

    def commit(
        self,
        repo: RepoRef,
        branch: str,
        apply: Callable[[dict[str, dict[str, Any]]], None],
        title: str,
        description: str,
        author: str,
        parent_commit: str | None,
    ) -> str:
        """Create a commit on ``branch`` whose tree is the head's tree modified in place by ``apply``."""
        with self.lock:
            branches = self.branches(repo)
            if branch not in branches:
                raise _revision_not_found(branch)
            head_id = branches[branch]
            if parent_commit is not None and not head_id.startswith(parent_commit):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(self.read_commit(repo, head_id)["files"])
            apply(files)
            commit_id = self._write_commit(repo, [head_id], files, title, description, author)
            branches[branch] = commit_id
            _write_json_atomic(self.repo_dir(repo) / "refs.json", branches)
            return commit_id

    def create_branch(self, repo: RepoRef, branch: str, starting_point: str) -> None:
        with self.lock:
            branches = self.branches(repo)
            if branch in branches:
                raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
            branches[branch] = self.resolve(repo, starting_point)["id"]
            _write_json_atomic(self.repo_dir(repo) / "refs.json", branches)

    def delete_branch(self, repo: RepoRef, branch: str) -> None:
        with self.lock:
            branches = self.branches(repo)
            if branch not in branches:
                raise _revision_not_found(branch)
            if branch == DEFAULT_BRANCH:
                raise _HubError(403, f"Cannot delete the default branch '{DEFAULT_BRANCH}'")
            del branches[branch]
            _write_json_atomic(self.repo_dir(repo) / "refs.json", branches)

    def _write_commit(
        self,
        repo: RepoRef,
        parents: list[str],
        files: dict[str, dict[str, Any]],
        title: str,
        description: str,
        author: str,
    ) -> str:
        commit = {
            "parents": parents,
            "files": files,
            "title": title,
            "message": description,
            "author": author,
            "date": _now_iso(),
        }
        # A random nonce keeps ids unique (two identical commits in the same millisecond are still distinct).
        commit_id = hashlib.sha1(json.dumps({**commit, "nonce": uuid.uuid4().hex}, sort_keys=True).encode()).hexdigest()
        _write_json_atomic(self.repo_dir(repo) / "commits" / f"{commit_id}.json", {"id": commit_id, **commit})
        return commit_id

    # ---- tree entries -----------------------------------------------------------------------------------------

    def regular_entry(self, content: bytes) -> dict[str, Any]:
        """Store a regular (git) file's content and return its tree entry."""
        return {"sha256": self.put_bytes(content), "size": len(content), "lfs": False, "oid": _git_blob_oid(content)}

    def lfs_entry(self, sha256: str) -> dict[str, Any]:
        """Tree entry for an already uploaded LFS object (its git oid is the pointer file's)."""
        if not self.has_object(sha256):
            raise _HubError(422, f"LFS object {sha256} was not uploaded; upload it through the LFS batch API first")
        size = self.object_path(sha256).stat().st_size
        return {"sha256": sha256, "size": size, "lfs": True, "oid": _git_blob_oid(_lfs_pointer(sha256, size))}

    def read_text(self, entry: dict[str, Any] | None) -> str:
        """Content of a small text file of a tree (``.gitattributes``, ``.gitignore``); empty if absent."""
        if entry is None:
            return ""
        return self.object_path(entry["sha256"]).read_bytes().decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------------------------
# Tree / repo JSON shapes (as parsed by huggingface_hub's RepoFile, RepoFolder, ModelInfo, GitRefs...)
# --------------------------------------------------------------------------------------------------------------


def _file_json(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return out


def _folder_json(path: str, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    prefix = path + "/"
    listing = "".join(f"{p} {e['oid']}\n" for p, e in sorted(files.items()) if p.startswith(prefix))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}


def _is_folder(files: dict[str, dict[str, Any]], path: str) -> bool:
    return any(p.startswith(path + "/") for p in files)


def _tree_json(files: dict[str, dict[str, Any]], folder: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries under ``folder`` (repo root if empty): direct children, or everything when ``recursive``."""
    prefix = f"{folder}/" if folder else ""
    if folder and not _is_folder(files, folder):
        raise _entry_not_found(folder)
    folders: set[str] = set()
    listed: list[str] = []
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        if recursive:
            listed.append(path)
            folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
        elif len(parts) == 1:
            listed.append(path)
        else:
            folders.add(prefix + parts[0])
    return [_folder_json(f, files) for f in sorted(folders)] + [_file_json(p, files[p]) for p in listed]


def _commit_json(commit: dict[str, Any]) -> dict[str, Any]:
    message = f"{commit['title']}\n\n{commit['message']}".strip()
    return {
        "id": commit["id"],
        "title": commit["title"],
        "message": message,
        "date": commit["date"],
        "authors": [{"user": commit["author"], "avatar": None}],
        "formatted": {"title": commit["title"], "message": message},
    }


# --------------------------------------------------------------------------------------------------------------
# HTTP request plumbing
# --------------------------------------------------------------------------------------------------------------


class _Request:
    """One parsed request; the body is read lazily (streamed for LFS uploads) and always drained after."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self.handler = handler
        self.method = handler.command
        split = urlsplit(handler.path)
        self.path = split.path
        self.query = parse_qs(split.query)
        self.authenticated = False
        self._body_started = False
        self._body_complete = False
        self._body: bytes | None = None

    def header(self, name: str) -> str | None:
        return self.handler.headers.get(name)

    def bearer_token(self) -> str | None:
        scheme, _, token = (self.header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return token.strip() or None

    def query_flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")

    def iter_body(self) -> Iterator[bytes]:
        """Yield the raw body (Content-Length or chunked transfer encoding) exactly once."""
        if self._body_started:
            raise RuntimeError("request body already consumed")
        self._body_started = True
        rfile = self.handler.rfile
        if (self.header("Transfer-Encoding") or "").lower() == "chunked":
            yield from self._iter_chunked(rfile)
        else:
            remaining = int(self.header("Content-Length") or 0)
            while remaining > 0:
                chunk = rfile.read(min(_CHUNK, remaining))
                if not chunk:
                    raise _HubError(400, "Request body shorter than Content-Length")
                remaining -= len(chunk)
                yield chunk
        self._body_complete = True

    @staticmethod
    def _iter_chunked(rfile: io.BufferedIOBase) -> Iterator[bytes]:
        while True:
            size = int(rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return
            yield rfile.read(size)
            rfile.readline()  # CRLF after each chunk

    def body(self) -> bytes:
        if self._body is None:
            self._body = b"".join(self.iter_body())
        return self._body

    def json(self) -> Any:
        try:
            return json.loads(self.body() or b"null")
        except json.JSONDecodeError as exc:
            raise _HubError(400, f"Invalid JSON body: {exc}") from exc

    def drain(self) -> bool:
        """Consume an unread body so the next request on this keep-alive connection parses correctly.

        Returns False when that is impossible (body abandoned half-read): the connection must then close.
        """
        if not self._body_started:
            try:
                for _ in self.iter_body():
                    pass
            except (_HubError, OSError, ValueError):
                return False
        return self._body_complete


@dataclass(frozen=True)
class _Route:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: Callable[[_Request, re.Match[str]], _Response]
    signed: bool = False  # authorised by a URL signature instead of a bearer token (LFS upload URLs)


_API_REPO = r"^/api/(?P<plural>models|datasets|spaces|kernels)/(?P<repo>[^/]+/[^/]+)"
_GIT_REPO = r"^/(?:(?P<prefix>datasets|spaces|kernels)/)?(?P<repo>[^/]+/[^/]+?)"


class _ThreadingServer(ThreadingHTTPServer):
    """Tracks open connections so :meth:`HubServer.stop` also cuts idle keep-alive connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        super().__init__(address, _Handler)
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def close_connections(self) -> None:
        with self.connections_lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self.connections.clear()


class _Handler(BaseHTTPRequestHandler):
    """Thin adapter: every method goes through :meth:`HubServer._serve`."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: _ThreadingServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def _dispatch(self) -> None:
        self.server.hub._serve(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


# --------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------


class HubServer:
    """Hub-compatible HTTP server on ``127.0.0.1`` storing repos under ``root_dir``.

    Args:
        root_dir: where blobs and repos are stored; reusing a directory restores its repos.
        tokens: accepted bearer tokens. When set, every request without one of them gets 401 (except the
            signed LFS upload URLs, which the client calls without credentials - like S3 pre-signed URLs).
            When ``None``, the server is open, and private repos are readable by any request that carries a
            bearer token (anonymous reads get the Hub's 401 ``RepoNotFound``).
        username: name returned by ``whoami`` and used as the namespace when ``create_repo`` gets none.
        host / port: bind address; port 0 picks a free port.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        tokens: Collection[str] | None = None,
        *,
        username: str = "test-user",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._storage = _Storage(Path(root_dir))
        self._tokens = frozenset(tokens) if tokens is not None else None
        self.username = username
        self._address = (host, port)
        self._signing_key = secrets.token_bytes(32)
        self._httpd: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._faults: list[_FaultRule] = []
        self._auth_failure = False
        self._requests: list[RequestRecord] = []
        self._uploaded_objects: list[str] = []
        self._uploaded_bytes = 0
        self._routes = self._build_routes()

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind and serve in a background thread; returns ``self`` for chaining."""
        if self._httpd is not None:
            raise RuntimeError("HubServer is already started")
        self._httpd = _ThreadingServer(self._address, self)
        # A short poll interval keeps stop() fast (shutdown() waits for the serving loop's next poll).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="HubServer", daemon=True
        )
        self._thread.start()
        logger.info("HubServer serving %s on %s", self._storage.repos_dir.parent, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and cut open connections (a pooled client connection must not outlive the server)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:<port>``), i.e. the value for ``HF_ENDPOINT``."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not started; call start() or use it as a context manager")
        return f"http://{self._address[0]}:{self._httpd.server_port}"

    # ---- test hooks -------------------------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500, path_contains: str | None = None) -> None:
        """Answer the next ``n`` requests whose path contains ``path_contains`` (any if None) with ``status``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        with self._state_lock:
            self._faults.append(_FaultRule(n, status, path_contains))

    def set_auth_failure(self, enabled: bool) -> None:
        """While enabled, every request gets 401 (simulates a revoked or expired token)."""
        with self._state_lock:
            self._auth_failure = enabled

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of all requests answered so far, in answer order (logged before the response is sent)."""
        with self._state_lock:
            return list(self._requests)

    @property
    def uploaded_objects(self) -> list[str]:
        """sha256 of every file content received (LFS PUTs and regular files in commits), once per receipt."""
        with self._state_lock:
            return list(self._uploaded_objects)

    @property
    def uploaded_bytes(self) -> int:
        """Total file-content bytes received through LFS uploads and regular-file commit operations."""
        with self._state_lock:
            return self._uploaded_bytes

    def _record_upload(self, sha256: str, size: int) -> None:
        with self._state_lock:
            self._uploaded_objects.append(sha256)
            self._uploaded_bytes += size

    # ---- request dispatch -------------------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        request = _Request(handler)
        try:
            response = self._respond(request)
        except _HubError as err:
            response = _Response.error(err)
        except Exception:  # a bug here must surface as a 500 to the client, not a dropped connection
            logger.exception("HubServer: unhandled error for %s %s", request.method, request.path)
            response = _Response.error(_HubError(500, "Internal server error (see HubServer logs)"))
        if not request.drain():
            handler.close_connection = True
        # Logged before answering: once the client has its response, tests may assert on the log.
        with self._state_lock:
            self._requests.append(RequestRecord(request.method, request.path, response.status))
        self._write(handler, request, response)

    def _respond(self, request: _Request) -> _Response:
        fault = self._take_fault(request.path)
        if fault is not None:
            return _Response.error(_HubError(fault, f"Injected failure (HTTP {fault}) by HubServer.fail_next"))
        if self._auth_failure:
            return _Response.error(_HubError(401, _INVALID_CREDENTIALS))
        route, match = self._match_route(request)
        if not route.signed:
            self._authenticate(request)
        return route.handler(request, match)

    def _take_fault(self, path: str) -> int | None:
        with self._state_lock:
            for rule in self._faults:
                if rule.path_contains is None or rule.path_contains in path:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._faults.remove(rule)
                    return rule.status
        return None

    def _authenticate(self, request: _Request) -> None:
        token = request.bearer_token()
        if self._tokens is None:
            request.authenticated = token is not None
        elif token in self._tokens:
            request.authenticated = True
        else:
            message = _INVALID_CREDENTIALS if token else "Authorization header is required"
            raise _HubError(401, message)

    def _match_route(self, request: _Request) -> tuple[_Route, re.Match[str]]:
        path_matched = False
        for route in self._routes:
            match = route.pattern.match(request.path)
            if match is None:
                continue
            if request.method in route.methods:
                return route, match
            path_matched = True
        if path_matched:
            raise _HubError(405, f"Method {request.method} not allowed on {request.path}")
        raise _HubError(404, f"Not found: {request.method} {request.path}")

    def _write(self, handler: BaseHTTPRequestHandler, request: _Request, response: _Response) -> None:
        length = response.file_length if response.file is not None else len(response.body)
        handler.send_response(response.status)
        for name, value in response.headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        if request.method == "HEAD":
            return
        if response.file is None:
            handler.wfile.write(response.body)
            return
        with response.file.open("rb") as f:
            f.seek(response.file_start)
            remaining = response.file_length
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                handler.wfile.write(chunk)
                remaining -= len(chunk)

    def _build_routes(self) -> list[_Route]:
        def route(methods: str, pattern: str, handler: Callable[..., _Response], signed: bool = False) -> _Route:
            return _Route(frozenset(methods.split()), re.compile(pattern), handler, signed)

        return [
            route("GET", r"^/api/whoami-v2$", self._whoami),
            route("POST", r"^/api/repos/create$", self._create_repo),
            route("DELETE", r"^/api/repos/delete$", self._delete_repo),
            route("POST", r"^/api/validate-yaml$", self._validate_yaml),
            route("GET", _API_REPO + r"$", self._repo_info),
            route("GET", _API_REPO + r"/revision/(?P<rev>[^/]+)$", self._repo_info),
            route("POST", _API_REPO + r"/preupload/(?P<rev>[^/]+)$", self._preupload),
            route("POST", _API_REPO + r"/commit/(?P<rev>[^/]+)$", self._commit),
            route("GET", _API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", self._tree),
            route("POST", _API_REPO + r"/paths-info/(?P<rev>[^/]+)$", self._paths_info),
            route("GET", _API_REPO + r"/refs$", self._refs),
            route("GET", _API_REPO + r"/commits/(?P<rev>[^/]+)$", self._commits),
            route("POST DELETE", _API_REPO + r"/branch/(?P<branch>[^/]+)$", self._branch),
            route("POST", _GIT_REPO + r"\.git/info/lfs/objects/batch$", self._lfs_batch),
            route("POST", _GIT_REPO + r"\.git/info/lfs/objects/verify$", self._lfs_verify),
            route("PUT", _GIT_REPO + r"\.git/info/lfs/objects/(?P<oid>[0-9a-f]{64})$", self._lfs_put, signed=True),
            route("GET HEAD", _GIT_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self._resolve),
        ]

    # ---- repo access helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _repo_ref(match: re.Match[str]) -> RepoRef:
        groups = match.groupdict()
        if "plural" in groups:
            kind = _TYPE_BY_PLURAL[groups["plural"]]
        else:
            kind = _TYPE_BY_PLURAL[groups["prefix"]] if groups["prefix"] else "model"
        return RepoRef(kind, unquote(groups["repo"]))

    def _open_repo(self, request: _Request, match: re.Match[str]) -> tuple[RepoRef, dict[str, Any]]:
        """The addressed repo and its meta, if it exists and the caller may see it (else ``RepoNotFound``)."""
        repo = self._repo_ref(match)
        meta = self._storage.meta(repo)
        if meta is None:
            raise _repo_not_found()
        if meta["private"] and not request.authenticated:
            raise _repo_not_found(401)  # what the Hub answers anonymous callers, so existence is not leaked
        return repo, meta

    def _open_revision(self, request: _Request, match: re.Match[str]) -> tuple[RepoRef, dict[str, Any]]:
        repo, _ = self._open_repo(request, match)
        return repo, self._storage.resolve(repo, unquote(match["rev"]))

    def _repo_url(self, repo: RepoRef) -> str:
        return f"{self.url}/{repo.url_prefix}{repo.repo_id}"

    # ---- account and repo lifecycle ---------------------------------------------------------------------------

    def _whoami(self, request: _Request, match: re.Match[str]) -> _Response:
        if not request.authenticated:
            raise _HubError(401, _INVALID_CREDENTIALS)
        return _Response.json(
            {
                "type": "user",
                "id": hashlib.sha1(self.username.encode()).hexdigest()[:24],
                "name": self.username,
                "fullname": self.username,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "hub-server", "role": "write"}},
            }
        )

    def _repo_from_payload(self, payload: dict[str, Any]) -> RepoRef:
        kind = payload.get("type") or "model"
        if kind not in _REPO_TYPES:
            raise _HubError(400, f"Invalid repo type: {kind}")
        name = payload.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise _HubError(400, f"Invalid repo name: {name!r}")
        return RepoRef(kind, f"{payload.get('organization') or self.username}/{name}")

    def _create_repo(self, request: _Request, match: re.Match[str]) -> _Response:
        payload = request.json()
        repo = self._repo_from_payload(payload)
        private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
        url = self._repo_url(repo)
        meta = self._storage.create_repo(repo, private, self.username)
        if meta is None:
            # The client reads `url` even from the 409 answer when `exist_ok=True`.
            return _Response.json({"error": f"You already created this {repo.kind} repo", "url": url}, status=409)
        return _Response.json({"url": url, "name": repo.repo_id, "id": meta["id"]})

    def _delete_repo(self, request: _Request, match: re.Match[str]) -> _Response:
        repo = self._repo_from_payload(request.json())
        if not self._storage.delete_repo(repo):
            raise _repo_not_found()
        return _Response.json({})

    def _validate_yaml(self, request: _Request, match: re.Match[str]) -> _Response:
        """Accept any card: metadata validation is the real Hub's business, not what tests exercise."""
        return _Response.json({"errors": [], "warnings": []})

    # ---- read API ---------------------------------------------------------------------------------------------

    def _repo_info(self, request: _Request, match: re.Match[str]) -> _Response:
        repo, meta = self._open_repo(request, match)
        revision = match.groupdict().get("rev")
        commit = self._storage.resolve(repo, unquote(revision) if revision else DEFAULT_BRANCH)
        with_blobs = request.query_flag("blobs")
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                file_json = _file_json(path, entry)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in file_json:
                    lfs = file_json["lfs"]
                    sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        return _Response.json(
            {
                "_id": meta["id"],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit["id"],
                "lastModified": commit["date"],
                "createdAt": meta["created_at"],
                "private": meta["private"],
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(e["size"] for e in commit["files"].values()),
            }
        )

    def _tree(self, request: _Request, match: re.Match[str]) -> _Response:
        _, commit = self._open_revision(request, match)
        folder = unquote(match["path"] or "").strip("/")
        return _Response.json(_tree_json(commit["files"], folder, request.query_flag("recursive")))

    def _paths_info(self, request: _Request, match: re.Match[str]) -> _Response:
        _, commit = self._open_revision(request, match)
        form = parse_qs(request.body().decode())
        files = commit["files"]
        out = []
        for path in (p.strip("/") for p in form.get("paths", [])):
            if path in files:
                out.append(_file_json(path, files[path]))
            elif _is_folder(files, path):
                out.append(_folder_json(path, files))
        return _Response.json(out)

    def _refs(self, request: _Request, match: re.Match[str]) -> _Response:
        repo, _ = self._open_repo(request, match)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit_id}
            for name, commit_id in sorted(self._storage.branches(repo).items())
        ]
        return _Response.json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, request: _Request, match: re.Match[str]) -> _Response:
        repo, commit = self._open_revision(request, match)
        return _Response.json([_commit_json(c) for c in self._storage.history(repo, commit)])

    def _resolve(self, request: _Request, match: re.Match[str]) -> _Response:
        """Serve a file with the headers ``hf_hub_download`` needs (no CDN redirect: content comes from here)."""
        _, commit = self._open_revision(request, match)
        path = unquote(match["path"])
        entry = commit["files"].get(path)
        if entry is None:
            raise _entry_not_found(path, commit["id"])
        etag = f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
        headers = {
            "X-Repo-Commit": commit["id"],
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(entry["size"])})
        start, length, status = self._byte_range(request.header("Range"), entry["size"], headers)
        return _Response(
            status=status,
            headers=headers,
            file=self._storage.object_path(entry["sha256"]),
            file_start=start,
            file_length=length,
        )

    @staticmethod
    def _byte_range(range_header: str | None, size: int, headers: dict[str, str]) -> tuple[int, int, int]:
        """(start, length, status) for a single ``bytes=a-b`` range, so interrupted downloads can resume."""
        if not range_header:
            return 0, size, 200
        unsatisfiable = {"Content-Range": f"bytes */{size}"}
        m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
        if m is None or not (m[1] or m[2]):
            raise _HubError(416, f"Unsupported Range header: {range_header}", headers=unsatisfiable)
        if m[1]:
            start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
        else:
            start, end = max(size - int(m[2]), 0), size - 1
        if start >= size or start > end:
            raise _HubError(416, "Requested range not satisfiable", headers=unsatisfiable)
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return start, end - start + 1, 206

    # ---- write API --------------------------------------------------------------------------------------------

    def _writable_branch(self, request: _Request, match: re.Match[str]) -> tuple[RepoRef, str]:
        """Repo and target branch of a write; pull requests (``create_pr``) are not supported."""
        repo, _ = self._open_repo(request, match)
        if request.query_flag("create_pr"):
            raise _HubError(400, "Pull requests are not supported by HubServer")
        branch = unquote(match["rev"]).removeprefix("refs/heads/")
        if branch not in self._storage.branches(repo):
            raise _revision_not_found(branch)
        return repo, branch

    def _preupload(self, request: _Request, match: re.Match[str]) -> _Response:
        """Decide regular vs LFS per file, and report the remote oid so unchanged files are skipped."""
        repo, branch = self._writable_branch(request, match)
        payload = request.json()
        files = self._storage.resolve(repo, branch)["files"]
        gitattributes = self._storage.read_text(files.get(".gitattributes"))
        gitignore = payload.get("gitIgnore")
        if gitignore is None:
            gitignore = self._storage.read_text(files.get(".gitignore"))
        answers = []
        for item in payload.get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample", ""))
            is_lfs = (
                _is_lfs_by_gitattributes(gitattributes, path)
                or item.get("size", 0) > LFS_SIZE_THRESHOLD
                or b"\0" in sample
            )
            answer: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if is_lfs else "regular",
                "shouldIgnore": _is_gitignored(gitignore, path),
            }
            if path in files:
                entry = files[path]
                answer["oid"] = entry["sha256"] if entry["lfs"] else entry["oid"]
            answers.append(answer)
        return _Response.json({"files": answers, "commitOid": self._storage.branches(repo)[branch]})

    def _commit(self, request: _Request, match: re.Match[str]) -> _Response:
        """Apply an NDJSON commit (header, file, lfsFile, deletedFile, deletedFolder lines) to a branch."""
        repo, branch = self._writable_branch(request, match)
        header, operations = self._parse_commit(request.body())
        staged = [self._stage_operation(key, value) for key, value in operations]

        def apply(files: dict[str, dict[str, Any]]) -> None:
            for key, path, entry in staged:
                if entry is not None:  # "file" / "lfsFile"
                    files[path] = entry
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _entry_not_found(f"{path} (A file with this name doesn't exist)")
                else:  # deletedFolder
                    doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                    if not doomed:
                        raise _entry_not_found(f"{path} (A folder with this name doesn't exist)")
                    for p in doomed:
                        del files[p]

        commit_id = self._storage.commit(
            repo,
            branch,
            apply,
            header.get("summary") or "",
            header.get("description") or "",
            self.username,
            header.get("parentCommit"),
        )
        return _Response.json(
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit_id}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    @staticmethod
    def _parse_commit(body: bytes) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise _HubError(400, f"Invalid NDJSON commit payload: {exc}") from exc
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "Commit payload must start with a 'header' line")
        return lines[0]["value"], [(line.get("key"), line.get("value") or {}) for line in lines[1:]]

    def _stage_operation(self, key: str | None, value: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None]:
        """Validate one commit line and store its content, before the branch lock is taken."""
        path = value.get("path")
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
            raise _HubError(400, f"Invalid path in commit operation: {path!r}")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise _HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
            content = base64.b64decode(value.get("content", ""))
            entry = self._storage.regular_entry(content)
            self._record_upload(entry["sha256"], len(content))
            return key, path, entry
        if key == "lfsFile":
            if value.get("algo", "sha256") != "sha256":
                raise _HubError(400, f"Unsupported LFS hash algorithm {value.get('algo')!r}")
            entry = self._storage.lfs_entry(str(value.get("oid")))
            if value.get("size") not in (None, entry["size"]):
                raise _HubError(422, f"LFS object size mismatch for {path}")
            return key, path, entry
        if key in ("deletedFile", "deletedFolder"):
            return key, path, None
        raise _HubError(400, f"Unsupported commit operation: {key!r}")

    def _branch(self, request: _Request, match: re.Match[str]) -> _Response:
        repo, _ = self._open_repo(request, match)
        branch = unquote(match["branch"])
        if request.method == "DELETE":
            self._storage.delete_branch(repo, branch)
        else:
            payload = request.json() or {}
            self._storage.create_branch(repo, branch, payload.get("startingPoint") or DEFAULT_BRANCH)
        return _Response.json({})

    # ---- LFS --------------------------------------------------------------------------------------------------

    def _lfs_signature(self, repo: RepoRef, oid: str, size: int) -> str:
        message = f"{repo.kind}:{repo.repo_id}:{oid}:{size}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def _lfs_batch(self, request: _Request, match: re.Match[str]) -> _Response:
        """git-lfs batch API: upload actions only for objects not stored yet (dedup across commits and repos)."""
        repo, _ = self._open_repo(request, match)
        payload = request.json()
        if payload.get("operation") != "upload":
            raise _HubError(400, "HubServer only implements the LFS 'upload' operation")
        git_url = f"{self._repo_url(repo)}.git/info/lfs/objects"
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid")), obj.get("size")
            if _SHA256.fullmatch(oid) is None or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": oid,
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
            elif self._storage.has_object(oid):
                objects.append({"oid": oid, "size": size})
            else:
                query = f"size={size}&sig={self._lfs_signature(repo, oid, size)}"
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": f"{git_url}/{oid}?{query}"},
                            "verify": {"href": f"{git_url}/verify"},
                        },
                    }
                )
        return _Response.json(
            {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_put(self, request: _Request, match: re.Match[str]) -> _Response:
        repo = self._repo_ref(match)
        oid = match["oid"]
        size_param = request.query.get("size", [""])[-1]
        signature = request.query.get("sig", [""])[-1]
        if not size_param.isdigit() or not hmac.compare_digest(
            signature, self._lfs_signature(repo, oid, int(size_param))
        ):
            raise _HubError(403, "Invalid or missing upload URL signature")
        size = self._storage.put_stream(request.iter_body(), oid, int(size_param))
        self._record_upload(oid, size)
        return _Response(headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self, request: _Request, match: re.Match[str]) -> _Response:
        self._open_repo(request, match)
        payload = request.json()
        oid = str(payload.get("oid"))
        if not self._storage.has_object(oid):
            raise _HubError(404, f"LFS object {oid} not found")
        if self._storage.object_path(oid).stat().st_size != payload.get("size"):
            raise _HubError(422, f"LFS object {oid} has a different size")
        return _Response.json({"success": True})


# --------------------------------------------------------------------------------------------------------------
# Pointing huggingface_hub at the server
# --------------------------------------------------------------------------------------------------------------

_TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HUGGINGFACE_CO_STAGING")


def _env_for(url: str, hf_home: Path, token: str | None) -> dict[str, str | None]:
    """Environment for the client (``None`` = unset): read by subprocesses and by fresh imports."""
    env: dict[str, str | None] = {name: None for name in _TOKEN_ENV_VARS}
    for name in ("NO_PROXY", "no_proxy"):  # a corporate HTTP(S)_PROXY must not intercept 127.0.0.1
        env[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
    env.update(
        {
            "HF_ENDPOINT": url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_ASSETS_CACHE": str(hf_home / "assets"),
            "HF_XET_CACHE": str(hf_home / "xet"),
            "HF_TOKEN_PATH": str(hf_home / "token"),
        }
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def _constants_for(url: str, hf_home: Path) -> dict[str, Any]:
    """``huggingface_hub.constants`` values that were computed from the environment at import time."""
    return {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }


@contextlib.contextmanager
def _patched_environ(values: dict[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@contextlib.contextmanager
def _patched_hf_hub(url: str, hf_home: Path) -> Iterator[None]:
    """Patch the import-time snapshots of the environment inside an already-imported ``huggingface_hub``."""
    from huggingface_hub import close_session, constants, hf_api

    overrides = {name: value for name, value in _constants_for(url, hf_home).items() if hasattr(constants, name)}
    originals = {name: getattr(constants, name) for name in overrides}
    patches: list[tuple[object, str, Any]] = []  # (owner, attribute, original value)

    def patch(owner: object, name: str, value: Any) -> None:
        patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    try:
        for name, value in overrides.items():
            patch(constants, name, value)
            # `from huggingface_hub.constants import X` copies (e.g. utils._cache_manager.HF_HUB_CACHE).
            for module_name, module in list(sys.modules.items()):
                copied = module_name.startswith("huggingface_hub.") and module is not constants
                if copied and name in vars(module) and vars(module)[name] is originals[name]:
                    patch(module, name, value)
        # Module-level functions (`upload_file`, `create_repo`, ...) are bound methods of this instance.
        if hf_api.api.endpoint == originals["ENDPOINT"]:
            patch(hf_api.api, "endpoint", url)
        close_session()  # pooled connections / proxy settings must not leak in
        yield
    finally:
        for owner, name, value in reversed(patches):
            setattr(owner, name, value)
        close_session()  # drop keep-alive connections to a server that is about to stop


@contextlib.contextmanager
def hub_env(
    server: HubServer, *, token: str | None = None, hf_home: str | os.PathLike[str] | None = None
) -> Iterator[Path]:
    """Point ``huggingface_hub`` (this process and its subprocesses) at ``server``; undo everything on exit.

    Yields the ``HF_HOME`` used (an isolated temporary directory unless ``hf_home`` is given), so the
    download cache never mixes with the user's real one.

    What must be set, and why both layers are needed:

    * Environment (for subprocesses and fresh imports): ``HF_ENDPOINT=server.url``, ``HF_HUB_DISABLE_XET=1``
      (the server speaks plain LFS, not Xet), ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_OFFLINE=0``,
      ``HF_HOME`` plus ``HF_HUB_CACHE``/``HF_ASSETS_CACHE``/``HF_XET_CACHE``/``HF_TOKEN_PATH`` under it (they
      would otherwise win over ``HF_HOME`` if the user set them), ``127.0.0.1`` appended to ``NO_PROXY``, and
      ``HF_TOKEN`` set to ``token`` - or removed, together with ``HUGGING_FACE_HUB_TOKEN``/``HF_OIDC_RESOURCE``,
      so a developer's real credentials are never sent to the test server.
    * In-process: ``huggingface_hub.constants`` reads ``HF_ENDPOINT`` & co. once, at import
      (``ENDPOINT = os.getenv("HF_ENDPOINT", ...)``, ``HUGGINGFACE_CO_URL_TEMPLATE`` built from it, cache
      paths, ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE``...), so changing ``os.environ`` later has no effect.
      We patch those ``constants`` attributes, the copies other ``huggingface_hub`` modules made with
      ``from ..constants import X``, and ``huggingface_hub.hf_api.api.endpoint`` (the module-level ``HfApi``
      behind ``upload_file``, ``create_repo``... captured ``ENDPOINT`` when it was built). ``HfApi()``
      instances created inside the context pick the patched endpoint up; instances created before keep
      theirs. The shared HTTP session is closed on entry and exit so no pooled connection crosses over.
      ``utils._http._HUB_ORIGINS`` is left alone: it only matters for redirects, and this server never
      redirects.
    """
    with contextlib.ExitStack() as stack:
        home = Path(hf_home) if hf_home is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        home.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_patched_environ(_env_for(server.url, home, token)))
        stack.enter_context(_patched_hf_hub(server.url, home))
        yield home


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Serve ``--root`` until interrupted (for manual testing and notebooks)."""
    parser = argparse.ArgumentParser(description="Local Hugging Face Hub-compatible server for tests.")
    parser.add_argument("--root", required=True, help="directory holding the repos (created if missing)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument(
        "--token",
        action="append",
        dest="tokens",
        help="accepted bearer token (repeatable); without it the server is open",
    )
    parser.add_argument("--username", default="test-user", help="user name reported by whoami")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = HubServer(args.root, tokens=args.tokens, username=args.username, host=args.host, port=args.port)
    with server:
        print(f"Hub server on {server.url} (root: {Path(args.root).resolve()})", flush=True)
        print(f"  export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
