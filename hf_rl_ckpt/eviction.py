"""The first after-commit subscriber: index the new checkpoint and evict what top-k retention does not keep.

`retention.RetentionPolicy` decides (pure); this module applies the decision to the run
directory, crash-safely: each evicted directory is first renamed into `.trash/` (one atomic
step: it stops being a checkpoint), then the index is rewritten, then the trash is deleted.
A crash in between leaves only trash, which the next start removes (`Committer.recover`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Iterable

from .atomic import fsync_dir
from .config import STEP_METRIC
from .errors import CheckpointError
from .events import CheckpointCommitted, CheckpointEvicted, Subscriber, Subscribers
from .faultpoint import faultpoint
from .layout import EVICTED_PREFIX, CheckpointLayout
from .records import CheckpointRecord
from .registry import Registry
from .retention import RetentionPolicy, metric_value

logger = logging.getLogger("hf_rl_ckpt")



def ranking_values(records: Iterable[CheckpointRecord], metric_name: str | None) -> dict[int, float | None]:
    """Step -> the value that ranks it, in the order of `records` (commit order for the policy).

    A recorded value that cannot rank (saved under another metric_name, or NaN written by an
    older version) counts as missing: it was not checked as a ranking metric when saved.
    """
    values: dict[int, float | None] = {}
    for record in records:
        try:
            values[record.step] = metric_value(record.metrics, metric_name, record.step)
        except CheckpointError:
            values[record.step] = None
    return values


def describe(policy: RetentionPolicy) -> str:
    return f"keep_top_k={policy.keep_top_k}, metric_name={policy.metric_name!r}, higher_is_better={policy.higher_is_better}"


class IndexAndRetention(Subscriber):
    """Records each commit in `checkpoints.json` and evicts what `policy` does not retain, announcing each eviction.

    The newest checkpoint is the most recent commit (the last row in commit order), so a
    save made after resuming from an older step is never evicted for its low step number.
    A checkpoint committed under other retention settings (`keep_top_k`, `metric_name`,
    `higher_is_better` changed on a restart) is never evicted: the new settings would
    re-rank it by a rule it was not saved under, so it is kept and named in a warning
    instead, for the user to delete by hand.
    """

    def __init__(self, layout: CheckpointLayout, registry: Registry, policy: RetentionPolicy, events: Subscribers) -> None:
        self.layout, self.registry, self.policy, self.events = layout, registry, policy, events
        self._reported_kept: set[int] = set()  # steps already named as kept under other settings

    def on_committed(self, event: CheckpointCommitted) -> None:
        try:
            with self.registry.lock:
                records = [record for record in self.registry.records() if record.step != event.step]
                records.append(CheckpointRecord.from_training_info(event.path.name, event.info))
                self.apply(records, history=(event.step, event.info.metrics))
        except OSError as err:  # the checkpoint is whole and in place; only its index lags, and the next start rebuilds that
            logger.error(
                "checkpoint step %d is committed at %s, but updating %s failed (%s); the index and top-k retention "
                "catch up at the next start", event.step, event.path, self.layout.registry_path, err,
            )

    def warn_about_other_settings(self) -> None:
        """At start: name the checkpoints saved under other retention settings that this run's would evict (they are kept)."""
        if self.policy.keep_top_k is None:
            return
        records = self.registry.records()
        values = ranking_values(records, self.policy.metric_name)
        self._saved_under_other_settings(records, evictable=set(values) - set(self.policy.top_k(values)))

    def apply(self, records: list[CheckpointRecord], *, history: tuple[int, dict] | None = None) -> list[int]:
        """Evict what the policy does not retain among `records` (commit order), logging why; rewrite the index with the rest."""
        values = ranking_values(records, self.policy.metric_name)
        ranking = self.policy.top_k(values)
        evictable = set(values) - self.policy.retained(values)
        evictable -= self._saved_under_other_settings(records, evictable)
        evicted = [record for record in records if record.step in evictable]
        reasons = {record.step: self._eviction_reason(record.step, values, ranking) for record in evicted}
        trash = []
        if evicted:
            self.layout.trash_root.mkdir(exist_ok=True)
            for record in evicted:
                logger.info("evicting %s: %s", self.layout.step_dir(record.step), reasons[record.step])
                target = self.layout.trash_root / f"{EVICTED_PREFIX}{self.layout.step_name(record.step)}"
                shutil.rmtree(target, ignore_errors=True)
                os.rename(self.layout.step_dir(record.step), target)
                trash.append(target)
            fsync_dir(self.layout.root)
            faultpoint("retention.after_trash")
        gone = {record.step for record in evicted}
        self.registry.write_records(
            [
                dataclasses.replace(record, top_k_rank=ranking.index(record.step) + 1 if record.step in ranking else None)
                for record in records if record.step not in gone
            ],
            self.policy, history=history,
        )
        faultpoint("retention.before_delete")
        for target in trash:
            shutil.rmtree(target)
        for record in evicted:
            self.events.evicted(CheckpointEvicted(record.step, self.layout.step_name(record.step), reasons[record.step]))
        return sorted(gone)

    def _eviction_reason(self, step: int, values: dict[int, float | None], ranking: list[int]) -> str:
        """Why retention evicts `step`, for the log line every eviction gets."""
        k, name = self.policy.keep_top_k, self.policy.metric_name
        if values[step] is None:
            return f"it has no metric '{name}' to rank by in keep_top_k={k}, and it is no longer the newest checkpoint"
        if name == STEP_METRIC:
            return f"keep_top_k={k} with metric_name 'step' keeps the {k} most recent checkpoint(s)"
        cutoff = ranking[-1]
        return (
            f"its {name}={values[step]:.6g} is not in the top {k} ({'higher' if self.policy.higher_is_better else 'lower'} is better; "
            f"the top {k} ends at step {cutoff} with {values[cutoff]:.6g}), and it is no longer the newest checkpoint"
        )

    def _saved_under_other_settings(self, records: list[CheckpointRecord], evictable: set[int]) -> set[int]:
        """The `evictable` steps committed under retention settings other than this run's: kept, and named once in a warning."""
        kept: dict[RetentionPolicy, list[int]] = {}
        for record in records:
            if record.step in evictable and record.retention is not None and record.retention != self.policy:
                kept.setdefault(record.retention, []).append(record.step)
        for saved_under, steps in kept.items():
            news = [step for step in steps if step not in self._reported_kept]
            if news:
                self._reported_kept.update(news)
                logger.warning(
                    "keeping %s although this run's retention settings (%s) would evict them: they were saved under "
                    "other settings (%s), and retention never deletes what earlier settings kept. Delete the ones you "
                    "no longer need by hand (rm -r %s); the registry catches up at the next start",
                    ", ".join(self.layout.step_name(step) for step in news), describe(self.policy),
                    describe(saved_under), " ".join(str(self.layout.step_dir(step)) for step in news),
                )
        return {step for steps in kept.values() for step in steps}
