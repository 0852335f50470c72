"""After-commit subscribers: what happens once a checkpoint is committed or evicted.

The commit itself (`commit.Committer`) only makes a checkpoint whole and puts it in place.
Everything that follows is a subscriber notified in order: the run's index and top-k
retention (`eviction.IndexAndRetention`, first: it decides what is evicted), then the Hub
publisher (`hub.publish.HubPublishing`). A new destination (a remote storage tier, a
weight-sync exporter) is one more subscriber, not another branch in the save path.

```python
class PrintCommits(Subscriber):
    def on_committed(self, event: CheckpointCommitted) -> None:
        print("committed", event.step, event.path)

manager = CheckpointManager(config, subscribers=[PrintCommits()])
```

Subscribers run in rank 0's committing thread (the training thread, or the background
thread of an async save), after the checkpoint is in place: one that raises is logged and
the others still run, because the checkpoint is already committed. Slow work (uploads)
belongs on a background worker (`hf_rl_ckpt.background`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .records import TrainingInfo

logger = logging.getLogger("hf_rl_ckpt")


@dataclass(frozen=True)
class CheckpointCommitted:
    """A checkpoint was renamed into place, whole and sealed by its manifest."""

    step: int
    path: Path
    info: TrainingInfo


@dataclass(frozen=True)
class CheckpointEvicted:
    """Retention removed a checkpoint (it is gone from disk and from the index)."""

    step: int
    name: str
    reason: str


class Subscriber:
    """Base class of after-commit subscribers; override what you need (every method defaults to doing nothing)."""

    def on_committed(self, event: CheckpointCommitted) -> None:
        """Called on rank 0 after each commit."""

    def on_evicted(self, event: CheckpointEvicted) -> None:
        """Called on rank 0 for each checkpoint retention evicts."""

    def drain(self) -> None:
        """Wait until background work started by earlier events is done (`CheckpointManager.finalize`)."""

    def close(self) -> None:
        """Stop background work for good (`finalize(terminate=True)`); a later event may start it again."""


class Subscribers:
    """The ordered subscribers of one run directory, and the one place events are dispatched."""

    def __init__(self, subscribers: Iterable[Subscriber] = ()) -> None:
        self._subscribers = list(subscribers)
        self._evictions: list[CheckpointEvicted] | None = None

    def extend(self, subscribers: Iterable[Subscriber]) -> None:
        """Add subscribers, notified after those added before."""
        self._subscribers.extend(subscribers)

    def committed(self, event: CheckpointCommitted) -> list[CheckpointEvicted]:
        """Notify every subscriber of a commit; return the evictions it caused (announced meanwhile by a subscriber)."""
        self._evictions = []
        try:
            for subscriber in self._subscribers:
                self._call(subscriber, "on_committed", event)
            return self._evictions
        finally:
            self._evictions = None

    def evicted(self, event: CheckpointEvicted) -> None:
        if self._evictions is not None:
            self._evictions.append(event)
        for subscriber in self._subscribers:
            self._call(subscriber, "on_evicted", event)

    def drain(self) -> None:
        for subscriber in self._subscribers:
            subscriber.drain()

    def close(self) -> None:
        for subscriber in self._subscribers:
            subscriber.close()

    @staticmethod
    def _call(subscriber: Subscriber, method: str, event: CheckpointCommitted | CheckpointEvicted) -> None:
        try:
            getattr(subscriber, method)(event)
        except Exception:  # the checkpoint is committed whatever a subscriber does; the others still run
            logger.exception("%s.%s failed for step %d (the checkpoint itself is committed)", type(subscriber).__name__, method, event.step)
