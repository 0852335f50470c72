"""`hf-rl-ckpt export CKPT OUT.tar`: a checkpoint's deployable model as one archive, like a `.nemo` file.

The archive holds one folder, named after the archive it was written as (`model.tar` ->
`model/`; renaming the file later changes nothing inside it), with what
serving needs and nothing that needs pickle: `config.json`, the safetensors weights (or the
PEFT adapter), `generation_config.json`, the tokenizer files, the model card `README.md`,
and `hf_rl_ckpt_bundle.json` (the source step and metrics, and the size and sha256 of every
file). So both of these work:

    tar -xf model.tar && python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('model')"
    hf-rl-ckpt verify model.tar          # or extract_bundle("model.tar", "dest") in Python

The model folder is produced by `hf_rl_ckpt.export.export_checkpoint` (which verifies the
checkpoint first and can merge a LoRA adapter). The name decides the compression: `.tar` is
a plain tar, `.tar.gz` and `.tgz` are gzip-compressed. Extraction uses tarfile's `data`
filter and additionally refuses anything but regular files and directories inside the one
folder, so a hostile archive can write nowhere else; the files are then checked against
`hf_rl_ckpt_bundle.json`. Archives are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from .atomic import commit_file, hash_file
from .errors import CheckpointError, CorruptCheckpointError
from .export import export_checkpoint
from .layout import MODEL_CARD, safe_join
from .verify import list_files, verify_checkpoint

BUNDLE_INFO = "hf_rl_ckpt_bundle.json"
BUNDLE_FORMAT = "hf_rl_ckpt-bundle"
BUNDLE_VERSION = 1
_GZIP_SUFFIXES = (".tar.gz", ".tgz")
_SUFFIXES = _GZIP_SUFFIXES + (".tar",)


def bundle_name(archive: str | os.PathLike) -> str:
    """The folder `export_bundle` puts in a new archive: its file name without `.tar`, `.tar.gz` or `.tgz`."""
    name = Path(archive).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise CheckpointError(f"{archive}: a bundle's name must end in {', '.join(_SUFFIXES)}")


def is_bundle_path(path: str | os.PathLike) -> bool:
    """True for a path named like a bundle archive (what `export` writes as a single file)."""
    return str(path).endswith(_SUFFIXES)


def is_compressed_bundle_path(path: str | os.PathLike) -> bool:
    """True for a bundle name that `export_bundle` writes gzip-compressed (`.tar.gz`, `.tgz`; `.tar` is plain)."""
    return str(path).endswith(_GZIP_SUFFIXES)


def export_bundle(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    merge_lora: bool = False,
    base: str | None = None,
) -> Path:
    """Write the model of `checkpoint` as the archive `out`, gzip-compressed when its name ends in `.tar.gz` or `.tgz`."""
    checkpoint, out = Path(checkpoint), Path(out)
    name = bundle_name(out)
    if out.exists():
        raise CheckpointError(f"export target {out} already exists; choose a new file or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    info = verify_checkpoint(checkpoint, only=[MODEL_CARD])  # the model card goes in too; export_checkpoint checks the model
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        folder = export_checkpoint(checkpoint, Path(work) / name, merge_lora=merge_lora, base=base)
        if (checkpoint / MODEL_CARD).is_file() and not (folder / MODEL_CARD).exists():
            shutil.copyfile(checkpoint / MODEL_CARD, folder / MODEL_CARD)
        # sha256, not the checkpoints' faster digest: a bundle is shipped to people who check it with `sha256sum`.
        files = {rel: {"size": os.path.getsize(folder / rel), "sha256": hash_file(folder / rel, "sha256")} for rel in list_files(folder)}
        description = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "source": {key: info.get(key) for key in ("step", "epoch", "metrics", "created_at", "model", "versions")},
            "merged_lora": merge_lora,
            "files": files,
        }
        (folder / BUNDLE_INFO).write_text(json.dumps(description, indent=2) + "\n")
        partial = Path(work) / out.name
        with tarfile.open(partial, "w:gz" if is_compressed_bundle_path(out) else "w") as archive:
            archive.add(folder, arcname=name, recursive=False, filter=_normalised)
            for rel in sorted(files) + [BUNDLE_INFO]:
                archive.add(folder / rel, arcname=f"{name}/{rel}", filter=_normalised)
        commit_file(partial, out)
    return out


def _normalised(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """Archive entries without the exporting user's identity (root-owned, plain permissions)."""
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    member.mode = 0o755 if member.isdir() else 0o644
    return member


def _check_member(archive: Path, name: str, member: tarfile.TarInfo) -> None:
    parts = Path(member.name).parts
    if not member.isfile() and not member.isdir():
        raise CorruptCheckpointError(archive, f"refusing member {member.name!r}: bundles hold regular files only, not links or devices")
    if member.name.startswith("/") or ".." in parts or not parts or parts[0] != name:
        raise CorruptCheckpointError(archive, f"refusing member {member.name!r}: it would land outside {name}/")


def _bundle_folder(archive: Path, members: list[tarfile.TarInfo]) -> str:
    """The one folder a bundle holds, taken from the archive itself (as `tar -xf` does): the file may have been renamed."""
    if not members:
        raise CorruptCheckpointError(archive, "the archive is empty: not an hf_rl_ckpt bundle")
    parts = Path(members[0].name).parts
    return parts[0] if parts else members[0].name  # every member, this one included, is then checked to lie inside it


def extract_bundle(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Safely extract the bundle `archive` into the directory `dest`; return the model folder, checked against its file list.

    The folder is the one the archive holds (`model/` for a bundle exported as `model.tar`,
    whatever the archive's file is called now).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            name = _bundle_folder(archive, members)
            for member in members:
                _check_member(archive, name, member)
            if (dest / name).exists():
                raise CheckpointError(f"{dest / name} already exists; extract {archive} into another directory")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError) as err:  # FilterError, ReadError, truncated gzip stream
        raise CorruptCheckpointError(archive, f"not a readable bundle archive ({err})") from err
    folder = dest / name
    verify_bundle_folder(folder, archive)
    return folder


def verify_bundle_folder(folder: str | os.PathLike, source: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check an extracted bundle folder against its `hf_rl_ckpt_bundle.json`; return that description."""
    folder = Path(folder)
    where = Path(source) if source is not None else folder / BUNDLE_INFO
    try:
        description = json.loads((folder / BUNDLE_INFO).read_text())
    except FileNotFoundError as err:
        raise CorruptCheckpointError(where, f"no {BUNDLE_INFO}: not an hf_rl_ckpt bundle") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(where, f"{BUNDLE_INFO} is not valid JSON ({err})") from err
    if not isinstance(description, dict) or description.get("format") != BUNDLE_FORMAT or not isinstance(description.get("files"), dict):
        raise CorruptCheckpointError(where, f"{BUNDLE_INFO} does not describe an hf_rl_ckpt bundle")
    version = description.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_VERSION:
        raise CorruptCheckpointError(where, f"bundle format {version!r} is newer than this hf_rl_ckpt reads ({BUNDLE_VERSION}); upgrade hf_rl_ckpt")
    listed = description["files"]
    for rel, entry in listed.items():
        path = safe_join(folder, rel)
        if not path.is_file() or path.stat().st_size != entry.get("size") or hash_file(path, "sha256") != entry.get("sha256"):
            raise CorruptCheckpointError(where, f"{rel} does not match the bundle's file list (missing, truncated or modified)")
    unlisted = sorted(set(list_files(folder)) - set(listed) - {BUNDLE_INFO})
    if unlisted:
        raise CorruptCheckpointError(where, f"files not in the bundle's file list: {', '.join(unlisted)}")
    return description


def verify_bundle(archive: str | os.PathLike) -> dict[str, Any]:
    """Extract `archive` into a temporary directory and check every file; return its description."""
    with tempfile.TemporaryDirectory() as tmp:
        return verify_bundle_folder(extract_bundle(archive, tmp), archive)
