"""Top-k retention: which checkpoints to keep. A pure policy, no I/O.

Kept separate from the deletion code so the rule can be tested over long metric sequences
in microseconds, and so the CLI, the Hub publisher (which mirrors the retained set as
branches) and the manager all compute the same set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .config import STEP_METRIC
from .errors import CheckpointError


def metric_value(metrics: Mapping[str, Any] | None, metric_name: str | None, step: int) -> float | None:
    """The value that ranks a checkpoint, or None when the metric was not recorded.

    `metric_name: step` always has a value (the step; `RetentionPolicy` ranks it by the
    order of the commits, which differs from the step order after a rollback). Names like
    `val:reward` (NeMo-RL) also match a nested `{"val": {"reward": ...}}` dict.
    """
    if metric_name is None:
        return None
    if metric_name == STEP_METRIC and (not metrics or STEP_METRIC not in metrics):
        return float(step)
    value: Any = None
    if metrics:
        if metric_name in metrics:
            value = metrics[metric_name]
        elif ":" in metric_name:
            outer, _, inner = metric_name.partition(":")
            nested = metrics.get(outer)
            if isinstance(nested, Mapping):
                value = nested.get(inner)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"metric '{metric_name}' must be a number, got {value!r} at step {step}.") from err
    if not math.isfinite(number):
        raise CheckpointError(
            f"metric '{metric_name}' is {'NaN' if math.isnan(number) else number} at step {step}; a NaN or infinite value "
            "cannot be ranked for keep_top_k. Fix the metric (e.g. skip the evaluation that produced it) or save without it."
        )
    return number


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the `keep_top_k` best checkpoints by `metric_name`, plus always the newest one.

    Every method takes `values`, each checkpoint's step -> metric value **in commit order**
    (oldest first): the last entry is the newest checkpoint, the most recent commit. After a
    resume from an older step that is the new timeline's save, not the highest step. The
    newest is kept so that resuming never loses progress. Ties rank the more recent commit
    higher (deterministic, and the newer weights saw more data); `metric_name: step` ranks
    by recency alone. Checkpoints without the metric cannot rank and are kept only while
    they are the newest.

    ```python
    >>> policy = RetentionPolicy(keep_top_k=2, metric_name="val_reward", higher_is_better=True)
    >>> sorted(policy.retained({10: 0.5, 20: 0.9, 30: 0.7, 40: 0.1}))
    [20, 30, 40]
    >>> sorted(policy.retained({10: 0.5, 20: 0.9, 30: 0.7, 15: 0.1}))  # resumed from step 10: step 15 is the newest
    [15, 20, 30]

    ```
    """

    keep_top_k: int | None
    metric_name: str | None
    higher_is_better: bool = True

    def ranking(self, values: Mapping[int, float | None]) -> list[int]:
        """Steps with a metric value, best first."""
        recency = {step: index for index, step in enumerate(values)}
        score = recency if self.metric_name == STEP_METRIC else values
        ranked = [step for step, value in values.items() if value is not None]
        sign = -1.0 if self.higher_is_better else 1.0
        return sorted(ranked, key=lambda step: (sign * score[step], -recency[step]))  # type: ignore[operator]

    def top_k(self, values: Mapping[int, float | None]) -> list[int]:
        """The best `keep_top_k` steps, best first (every ranked step when k is unset)."""
        ranking = self.ranking(values)
        return ranking if self.keep_top_k is None else ranking[: self.keep_top_k]

    def retained(self, values: Mapping[int, float | None]) -> set[int]:
        """Steps to keep: the top k plus the newest (the last of `values`). With no k, every step."""
        if not values:
            return set()
        if self.keep_top_k is None:
            return set(values)
        return set(self.top_k(values)) | {list(values)[-1]}
