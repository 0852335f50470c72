"""`checkpoints.json`: the index of committed checkpoints of one run.

The committed directories are the truth (a directory holding `training_info.json` is a
whole checkpoint); the registry is an index over them that also carries what directories
cannot: the top-k order and Hub publishing state. After a crash the two can disagree for
one step (a commit renamed in place but not yet indexed, or an eviction half done), so
`reconcile` re-derives the index from the directories on every start. The file is always
replaced atomically.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from .atomic import atomic_write_json
from .errors import CorruptCheckpointError
from .layout import COMMIT_SEQ, FORMAT_VERSION, TRAINING_INFO, CheckpointLayout, commit_order
from .retention import RetentionPolicy

logger = logging.getLogger(__name__)


class Registry:
    """Read and atomically rewrite `<checkpoint_dir>/checkpoints.json`.

    Other modules may keep their own top-level sections in the file (e.g. `hub`); the
    registry preserves keys it does not own. Writers in several threads of one process (a
    commit, the Hub publisher's worker) hold `lock` around each read-modify-write.
    """

    def __init__(self, layout: CheckpointLayout) -> None:
        self.layout = layout
        self.lock = threading.RLock()

    def read(self) -> dict[str, Any]:
        path = self.layout.registry_path
        if not path.exists():
            return {"format_version": FORMAT_VERSION, "checkpoints": []}
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptCheckpointError(
                path, f"not valid JSON ({err}); move it aside and restart: the index is rebuilt from the checkpoint directories"
            ) from err
        if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
            raise CorruptCheckpointError(path, "expected an object with a 'checkpoints' list; move it aside and restart to rebuild it")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CorruptCheckpointError(
                path, f"format_version {version!r} is newer than this hf_rl_ckpt understands ({FORMAT_VERSION}); upgrade hf_rl_ckpt"
            )
        return data

    def write(self, data: dict[str, Any]) -> None:
        data["format_version"] = FORMAT_VERSION
        data["name_template"] = self.layout.name_template  # what `CheckpointLayout.of_run` (the CLI) names checkpoints by
        data["checkpoints"] = in_commit_order(data["checkpoints"])
        atomic_write_json(self.layout.registry_path, data)

    def records(self) -> list[dict[str, Any]]:
        """Registry rows of committed checkpoints in commit order: oldest first, the newest (most recent commit) last."""
        return in_commit_order(self.read()["checkpoints"])

    def next_commit_seq(self) -> int:
        """The `commit_seq` of the next commit: above every commit of the run, as the checkpoints and this index know them.

        The index counts too: it keeps the order of a checkpoint whose training_info.json became
        unreadable, and the next commit must still come after that one, or retention takes the
        damaged checkpoint for the newest and evicts the save just made.
        """
        indexed = (commit_order(row["step"], row)[0] for row in self.read()["checkpoints"])
        return max(self.layout.next_commit_seq(), 1 + max(indexed, default=0))

    def reconcile(self) -> dict[str, Any]:
        """Bring the index in line with the committed directories and return it.

        Rows whose directory is gone are dropped; committed directories without a row are
        indexed from their `training_info.json`. Nothing is written when they agree.
        """
        with self.lock:
            return self._reconcile()

    def _reconcile(self) -> dict[str, Any]:
        data = self.read()
        committed = self.layout.committed_infos()
        rows = {row["step"]: row for row in data["checkpoints"] if isinstance(row, dict) and isinstance(row.get("step"), int)}
        changed = len(rows) != len(data["checkpoints"])
        for step in list(rows):
            if step not in committed:
                logger.info("registry: dropping step %d, its directory is gone", step)
                del rows[step]
                changed = True
        for step, info in committed.items():
            # A row of another commit of this step (a crash between a re-save's rename and its indexing) is re-derived too.
            if step not in rows or (info is not None and rows[step].get(COMMIT_SEQ) != info.get(COMMIT_SEQ)):
                rows[step] = record_from_training_info(step, self.layout.step_name(step), info or {})
                logger.info("registry: indexing committed checkpoint %s from its %s", self.layout.step_name(step), TRAINING_INFO)
                changed = True
        data["checkpoints"] = list(rows.values())
        if changed:
            self.write(data)
        return data


def in_commit_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Registry rows sorted by `layout.commit_order`: oldest commit first, the newest last."""
    return sorted(rows, key=lambda row: commit_order(row["step"], row))


def record_from_training_info(step: int, name: str, info: dict[str, Any]) -> dict[str, Any]:
    """The registry row of one checkpoint, derived from its training_info.json."""
    return {
        "step": step,
        "name": name,
        "epoch": info.get("epoch"),
        "metrics": info.get("metrics") or {},
        "created_at": info.get("created_at"),
        COMMIT_SEQ: info.get(COMMIT_SEQ),
        "retention": info.get("retention"),
        "size_bytes": sum(entry.get("size", 0) for entry in (info.get("manifest") or {}).values()),
    }


def retention_saved_under(row: dict[str, Any], data: dict[str, Any]) -> RetentionPolicy | None:
    """The retention settings a checkpoint was committed under, None when not recorded.

    Rows written before each checkpoint recorded its own settings take those the registry
    recorded at the run's last commit (every one of them was retained under those).
    """
    recorded = row.get("retention") if isinstance(row.get("retention"), dict) else data
    try:
        return RetentionPolicy(recorded["keep_top_k"], recorded["metric_name"], recorded["higher_is_better"])
    except KeyError:
        return None
