"""JSON documents from disk (a checkpoint's training_info.json, a run's checkpoints.json), read as untrusted input.

A run directory or a checkpoint may come from elsewhere. Whatever such a file holds, reading
it raises `CorruptCheckpointError` naming the file and what is wrong, never a Python error
from deep inside the parser: so `resume: auto` can fall back past it and `list` can report it.
Bounded before parsing (size), while parsing (nesting depth: Python's own recursion limit,
caught; NaN and Infinity, which JSON does not have), and after (an object, not a list).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpointError

#: The largest JSON document a checkpoint or run directory holds by design (a manifest of ~10^5 files is a few MB).
MAX_DOCUMENT_BYTES = 64 * 2**20


def refuse_constant(name: str) -> Any:
    """`json.loads(..., parse_constant=)`: NaN, Infinity and -Infinity are refused (JSON has no such numbers)."""
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json_document(raw: bytes | str, path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `raw` (the content of `path`); CorruptCheckpointError for anything else."""
    try:
        data = json.loads(raw, parse_constant=refuse_constant)
    except RecursionError as err:
        raise CorruptCheckpointError(path, "not valid JSON (nested too deeply to be one hf_rl_ckpt writes)") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, and NaN / Infinity
        raise CorruptCheckpointError(path, f"not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CorruptCheckpointError(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def read_json_document(path: str | os.PathLike, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> dict[str, Any]:
    """The JSON object `path` holds, read whole only when its size is within `max_bytes`.

    Raises:
        FileNotFoundError: there is no such file (the caller knows what that means).
        CorruptCheckpointError: the file is a symlink, too large, not JSON or not an object.
    """
    path = Path(path)
    if path.is_symlink():
        raise CorruptCheckpointError(path, f"is a symlink (to {os.readlink(path)}); hf_rl_ckpt writes its files itself and does not follow links")
    size = path.stat().st_size
    if size > max_bytes:
        raise CorruptCheckpointError(path, f"{size} bytes, more than the {max_bytes} hf_rl_ckpt reads from such a file")
    return parse_json_document(path.read_bytes(), path)
