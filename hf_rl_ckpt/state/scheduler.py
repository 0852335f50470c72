"""LR scheduler state as JSON (schedulers hold numbers and lists, never anything that needs pickle)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError
from . import jsoncodec


def capture_scheduler(scheduler: Any) -> bytes:
    """The scheduler's state as the JSON bytes of `scheduler.json`, captured now (written later, maybe by another thread)."""
    return jsoncodec.dumps(scheduler.state_dict(), "scheduler")


def load_scheduler(scheduler: Any, path: str | os.PathLike) -> None:
    try:
        state = jsoncodec.loads(Path(path).read_bytes())
    except FileNotFoundError as err:
        raise CorruptCheckpointError(path, "missing: this checkpoint has no scheduler state; pass scheduler=None to skip it") from err
    except ValueError as err:
        raise CorruptCheckpointError(path, f"not valid JSON ({err})") from err
    scheduler.load_state_dict(state)
