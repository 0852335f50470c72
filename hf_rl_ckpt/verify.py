"""Manifests and verification of a checkpoint directory.

`training_info.json` lists every file of a checkpoint with its size and digest (`digest`). Sizes are
checked on every load (a stat per file, free), hashes on `verify` and on resume when
`verify_on_resume` is set. Verification also refuses files the manifest does not list
(a planted pickle must not ride along), paths that escape the checkpoint, and safetensors
files whose header does not describe the file (checked even when the hashes match: whoever
can rewrite a file can rewrite the manifest too).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Collection, Mapping

from .atomic import hash_file, map_file
from .digest import ALGORITHMS, Digests, FileDigest, hexdigest, recorded_digest
from .errors import CorruptCheckpointError
from .documents import read_json_document
from .layout import ADAPTER_DIR, CONSOLIDATED_DIR, FORMAT_VERSION, OPTIM_DIR, SHARDED_DIR, TRAINING_INFO, safe_join
from .records import OptimizerFormat, WeightsFormat
from .state.safetensors_io import check_safetensors_header

Manifest = dict[str, dict[str, Any]]


def list_files(root: str | os.PathLike) -> list[str]:
    """Relative paths of every entry below `root` except folders and training_info.json, sorted: files, and links to folders
    (listed, never followed, so that verification sees them)."""
    root = Path(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [name for name in dirnames if os.path.islink(os.path.join(dirpath, name))]:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != TRAINING_INFO:
                files.append(rel)
    return sorted(files)


def build_manifest(root: str | os.PathLike, known: Digests | None = None) -> Manifest:
    """Size and digest of every file under `root`.

    `known` holds the digests that writers computed while writing; those files are not
    read again unless their size on disk disagrees.
    """
    known = known or {}
    manifest: Manifest = {}
    for rel in list_files(root):
        size = os.path.getsize(Path(root, rel))
        digest = known.get(rel)
        if digest is None or digest.size != size:
            digest = FileDigest(size, hash_file(Path(root, rel)))
        manifest[rel] = digest.entry()
    return manifest


_NUMBER = (int, float)
#: training_info.json's fields and the JSON types each may hold (None: may be null or absent); `step` and `manifest` are required.
_INFO_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format_version": ((int,), False), "step": ((int,), False), "manifest": ((dict,), False),
    "commit_seq": ((int,), True), "policy_version": ((int,), True), "world_size": ((int,), True), "epoch": (_NUMBER, True),
    "save_seconds": (_NUMBER, True), "created_at": ((str,), True), "metrics": ((dict,), True), "extra": ((dict,), True),
    "versions": ((dict,), True), "model": ((dict,), True), "retention": ((dict,), True), "contents": ((dict,), True),
}
_CONTENTS_FLAGS = ("consolidated", "scheduler", "dataloader", "rng", "rollout")
_CONTENTS_VALUES = {"weights": {None, *(f.value for f in WeightsFormat)}, "optimizer": {None, *(f.value for f in OptimizerFormat)}}


def _field_problem(info: Mapping[str, Any]) -> str | None:
    """What is wrong with the fields of a training_info.json document, or None: the types every reader relies on."""
    for name, (types, optional) in _INFO_FIELDS.items():
        value = info.get(name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{name} is {value!r:.80}, expected {' or '.join(t.__name__ for t in types)}" + (" or null" if optional else "")
    if info["step"] < 0 or (info.get("world_size") is not None and info["world_size"] < 1):
        return f"step {info['step']} / world_size {info.get('world_size')} out of range"
    contents = info.get("contents") or {}
    for key, allowed in _CONTENTS_VALUES.items():
        if not isinstance(value := contents.get(key), (str, type(None))) or value not in allowed:
            return f"contents.{key} is {value!r:.80}, expected one of {sorted(v for v in allowed if v)}"
    for key in _CONTENTS_FLAGS:
        if key in contents and not isinstance(contents[key], bool):
            return f"contents.{key} is {contents[key]!r:.80}, expected true or false"
    if contents.get("weights") == WeightsFormat.CONSOLIDATED.value and contents.get("consolidated") is False:
        return "contents says the weights are consolidated and that there is no consolidated folder"
    if not isinstance(dtype := contents.get("consolidated_dtype"), (str, type(None))):
        return f"contents.consolidated_dtype is {dtype!r:.80}, expected a dtype name or null"
    if "contents" in info and info["contents"] is not None:  # what it says it holds is what its manifest lists
        claims = {
            CONSOLIDATED_DIR: bool(contents.get("consolidated")), ADAPTER_DIR: contents.get("weights") == WeightsFormat.ADAPTER.value,
            SHARDED_DIR: contents.get("weights") == WeightsFormat.SHARDED.value, OPTIM_DIR: contents.get("optimizer") is not None,
        }
        for folder, claimed in claims.items():
            if claimed != any(isinstance(rel, str) and rel.startswith(folder + "/") for rel in info["manifest"]):
                return f"contents says {folder}/ is {'there' if claimed else 'not there'}, the manifest {'lists no' if claimed else 'lists'} files in it"
    for rel, entry in info["manifest"].items():
        if not isinstance(entry, dict) or isinstance(entry.get("size"), bool) or not isinstance(entry.get("size"), int) or entry["size"] < 0:
            return f"manifest entry {rel!r:.200} is {entry!r:.80}, expected an object with a non-negative integer size"
    return None


def read_training_info(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and check a checkpoint's training_info.json: JSON within bounds (`documents`), each field of the type readers rely on.

    Raises `CorruptCheckpointError` naming the file and the first problem, whatever the file holds.
    """
    path = Path(ckpt_dir) / TRAINING_INFO
    try:
        info = read_json_document(path)
    except FileNotFoundError as err:
        raise CorruptCheckpointError(path, "missing: this directory is not a committed hf_rl_ckpt checkpoint") from err
    if not isinstance(info.get("manifest"), dict):
        raise CorruptCheckpointError(path, "expected an object with a 'manifest' mapping")
    version = info.get("format_version")
    if not isinstance(version, int):
        raise CorruptCheckpointError(path, f"format_version is {version!r}, expected an integer")
    if version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            path, f"written in checkpoint format {version}, newer than this hf_rl_ckpt reads ({FORMAT_VERSION}); upgrade hf_rl_ckpt"
        )
    if (problem := _field_problem(info)) is not None:
        raise CorruptCheckpointError(path, problem)
    return info


def _digest_mismatches(ckpt_dir: Path, manifest: Manifest, skip: Collection[str]) -> set[str]:
    """The manifest's files that exist with the listed size but not the recorded digest (hashed in parallel, one per core, biggest first)."""
    todo = []
    for rel, entry in manifest.items():
        path = safe_join(ckpt_dir, rel)
        if rel not in skip and isinstance(entry, dict) and path.is_file() and not path.is_symlink() and path.stat().st_size == entry.get("size"):
            todo.append((entry["size"], rel, path, recorded_digest(entry)))
    if not todo:
        return set()
    todo.sort(key=lambda item: -item[0])
    with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1), thread_name_prefix="hf_rl_ckpt-verify") as pool:
        futures = {rel: pool.submit(hash_file, path, recorded[0]) for _size, rel, path, recorded in todo if recorded is not None}
        return {rel for _size, rel, _path, recorded in todo if recorded is None or futures[rel].result() != recorded[1]}


def _digest_problem(entry: Mapping[str, Any]) -> str:
    recorded = recorded_digest(entry)
    if recorded is None:
        return f"manifest entry records no digest this hf_rl_ckpt knows ({', '.join(ALGORITHMS)}); upgrade hf_rl_ckpt"
    return f"{recorded[0]} does not match the manifest (the file was modified or bit-flipped)"


def _within(rel: str, parts: Collection[str] | None) -> bool:
    return parts is None or any(rel == part or rel.startswith(part + "/") for part in parts)


def verify_checkpoint(
    ckpt_dir: str | os.PathLike, *, checksums: bool = True, deferred: Collection[str] = (), only: Collection[str] | None = None
) -> dict[str, Any]:
    """Check a checkpoint against its manifest; return its training_info.

    Raises `CorruptCheckpointError` naming the first bad file, with every problem found
    in the message: a file missing, of the wrong size, with the wrong digest (when
    `checksums`), not listed in the manifest, or a path escaping the checkpoint.
    `deferred` names files whose digest the caller checks itself while reading them for
    loading (`read_verified`), so that resuming reads each byte once. `only` restricts
    the checks to these files and folders (relative paths), for a reader that needs no
    more (`export` reads the model folder, not the training state).

    ```python
    >>> verify_checkpoint("runs/ckpt/step_40")        # doctest: +SKIP
    ```
    """
    ckpt_dir = Path(ckpt_dir)
    info = read_training_info(ckpt_dir)
    manifest: Manifest = {rel: entry for rel, entry in info["manifest"].items() if _within(rel, only)}
    problems: list[tuple[Path, str]] = []
    mismatches = _digest_mismatches(ckpt_dir, manifest, deferred) if checksums else set()
    for rel, entry in manifest.items():
        path = safe_join(ckpt_dir, rel)
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            problems.append((path, "manifest entry has no integer size"))
        elif path.is_symlink():
            problems.append((path, "is a symlink; checkpoints hold regular files only"))
        elif not path.is_file():
            problems.append((path, "missing"))
        elif (size := path.stat().st_size) != entry["size"]:
            problems.append((path, f"size {size} bytes, manifest says {entry['size']} (truncated or modified)"))
        elif rel in mismatches:
            problems.append((path, _digest_problem(entry)))
        elif path.suffix == ".safetensors":
            try:
                check_safetensors_header(path)
            except CorruptCheckpointError as err:
                problems.append((path, err.reason))
    for rel in list_files(ckpt_dir):
        if rel not in manifest and _within(rel, only):
            if (ckpt_dir / rel).is_symlink():
                problems.append((ckpt_dir / rel, "is a symlink, and checkpoints hold regular files only; remove it (it was not written by hf_rl_ckpt)"))
            else:
                problems.append((ckpt_dir / rel, "not listed in the manifest; remove it (it was not written by hf_rl_ckpt)"))
    if problems:
        detail = "; ".join(f"{p}: {why}" for p, why in problems)
        raise CorruptCheckpointError(problems[0][0], problems[0][1] + (f" (all problems: {detail})" if len(problems) > 1 else ""))
    return info


def read_verified(ckpt_dir: str | os.PathLike, manifest: Manifest, relpaths: Collection[str]) -> dict[str, memoryview]:
    """Map the files `relpaths` of a checkpoint into memory (`map_file`) and check each one's digest.

    Returns their bytes by absolute path. Every file is checked before this returns, so a
    caller that loads only afterwards still modifies nothing when any file is damaged; the
    loaders then copy the tensors straight out of the page cache the check just filled,
    with no copy of the files of our own in between. Files are hashed in parallel, one per
    CPU core, biggest first. Raises `CorruptCheckpointError` for a file whose bytes do not match.
    """
    ckpt_dir = Path(ckpt_dir)
    ordered = sorted(relpaths, key=lambda rel: -int(manifest[rel].get("size") or 0))

    def read(rel: str) -> memoryview:
        path, entry = safe_join(ckpt_dir, rel), manifest[rel]
        recorded = recorded_digest(entry)
        if recorded is None:
            raise CorruptCheckpointError(path, _digest_problem(entry))
        try:
            data = map_file(path, entry.get("size"))
        except OSError as err:
            raise CorruptCheckpointError(path, f"cannot be read ({err})") from err
        if hexdigest(data, recorded[0]) != recorded[1]:
            raise CorruptCheckpointError(path, _digest_problem(entry))
        return data

    if not ordered:
        return {}
    with ThreadPoolExecutor(min(len(ordered), os.cpu_count() or 1), thread_name_prefix="hf_rl_ckpt-verify") as pool:
        futures = {rel: pool.submit(read, rel) for rel in ordered}
        return {str(safe_join(ckpt_dir, rel)): future.result() for rel, future in futures.items()}
