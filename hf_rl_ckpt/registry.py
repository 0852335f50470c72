"""`checkpoints.json`: the index of committed checkpoints of one run.

The committed directories are the truth (a directory holding `training_info.json` is a
whole checkpoint); the registry is an index over them that also carries what directories
cannot: the top-k order and Hub publishing state. After a crash the two can disagree for
one step (a commit renamed in place but not yet indexed, or an eviction half done), so
`reconcile` re-derives the index from the directories on every start. The file is always
replaced atomically.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .atomic import atomic_write_json
from .documents import read_json_document
from .errors import CorruptCheckpointError
from .layout import COMMIT_SEQ, FORMAT_VERSION, TRAINING_INFO, CheckpointLayout, commit_order
from .records import CheckpointRecord, TrainingInfo, policy_from_json
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
            data = read_json_document(path)
        except CorruptCheckpointError as err:
            raise CorruptCheckpointError(path, f"{err.reason}; move it aside and restart: the index is rebuilt from the checkpoint directories") from err
        if not isinstance(data.get("checkpoints"), list):
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
        data["checkpoints"] = sorted(data["checkpoints"], key=lambda row: commit_order(row["step"], row))
        atomic_write_json(self.layout.registry_path, data)

    def records(self) -> list[CheckpointRecord]:
        """The committed checkpoints it indexes, in commit order: oldest first, the newest (most recent commit) last."""
        data = self.read()
        return in_commit_order([CheckpointRecord.from_json(row, policy_from_json(data)) for row in _rows(data)])

    def write_records(self, records: list[CheckpointRecord], policy: RetentionPolicy, *, history: tuple[int, dict[str, Any]] | None = None) -> None:
        """Replace the index with `records`, retained under `policy`; `history` appends a (step, metrics) point for `plot`."""
        with self.lock:
            data = self.read()
            data["checkpoints"] = [record.to_json() for record in records]
            if history is not None:
                data.setdefault("history", []).append({"step": history[0], "metrics": history[1]})
            data.update(metric_name=policy.metric_name, higher_is_better=policy.higher_is_better, keep_top_k=policy.keep_top_k)
            self.write(data)

    def next_commit_seq(self) -> int:
        """The `commit_seq` of the next commit: above every commit of the run, as the checkpoints and this index know them.

        The index counts too: it keeps the order of a checkpoint whose training_info.json became
        unreadable, and the next commit must still come after that one, or retention takes the
        damaged checkpoint for the newest and evicts the save just made.
        """
        indexed = (record.order[0] for record in self.records())
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
        rows = {row["step"]: row for row in _rows(data)}
        changed = len(rows) != len(data["checkpoints"])
        for step in list(rows):
            if step not in committed:
                logger.info("registry: dropping step %d, its directory is gone", step)
                del rows[step]
                changed = True
        for step, info in committed.items():
            # A row of another commit of this step (a crash between a re-save's rename and its indexing) is re-derived too.
            if step not in rows or (info is not None and rows[step].get(COMMIT_SEQ) != info.get(COMMIT_SEQ)):
                name = self.layout.step_name(step)
                record = CheckpointRecord.from_training_info(name, TrainingInfo.from_json(info)) if info else CheckpointRecord(step, name)
                rows[step] = record.to_json()
                logger.info("registry: indexing committed checkpoint %s from its %s", self.layout.step_name(step), TRAINING_INFO)
                changed = True
        data["checkpoints"] = list(rows.values())
        if changed:
            self.write(data)
        return data


def in_commit_order(records: list[CheckpointRecord]) -> list[CheckpointRecord]:
    """Records sorted by `layout.commit_order`: oldest commit first, the newest last."""
    return sorted(records, key=lambda record: record.order)


def _rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The well-formed rows of a registry (a row without an integer step is dropped; `reconcile` re-derives it)."""
    return [row for row in data["checkpoints"] if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row.get("step"), bool)]
