"""A picture of a run: the ranking metric over steps, the retained top-k and the published branches.

Reads only `checkpoints.json` (its `history` of every save, the retained rows and the Hub
section), so it works on a live run directory without touching a checkpoint.
matplotlib is imported on use; it is an optional dependency (`pip install matplotlib`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .layout import CheckpointLayout
from .registry import Registry
from .retention import metric_value


def _pick_metric(data: dict[str, Any], history: list[dict[str, Any]]) -> str:
    configured = data.get("metric_name")
    if configured:
        return configured
    for entry in history:
        for name, value in (entry.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return name
    raise CheckpointError("no numeric metric recorded in this run's checkpoints.json; pass --metric NAME")


def plot_run(directory: str | os.PathLike, out: str | os.PathLike, metric: str | None = None) -> Path:
    """Draw `metric` (default: the run's `metric_name`) vs step into the PNG `out`; return its path.

    ```python
    >>> plot_run("runs/ckpt", "runs/ckpt/metrics.png")        # doctest: +SKIP
    PosixPath('runs/ckpt/metrics.png')
    ```
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise CheckpointError("plotting needs matplotlib: pip install matplotlib") from err
    data = Registry(CheckpointLayout(directory)).read()
    history = data.get("history") or [{"step": row["step"], "metrics": row.get("metrics")} for row in data["checkpoints"]]
    if not history:
        raise CheckpointError(f"{directory} has no saved checkpoints to plot")
    name = metric or _pick_metric(data, history)
    points = sorted((e["step"], v) for e in history if (v := metric_value(e.get("metrics"), name, e["step"])) is not None)
    if not points:
        raise CheckpointError(f"metric '{name}' was never recorded in {directory}; recorded: "
                              + ", ".join(sorted({k for e in history for k in (e.get("metrics") or {})})))
    values = dict(points)
    ranked = sorted((row["top_k_rank"], row["step"]) for row in data["checkpoints"] if row.get("top_k_rank"))
    hub_steps = (data.get("hub") or {}).get("steps") or {}
    published = sorted(int(step) for step, entry in hub_steps.items() if entry.get("status") == "pushed")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([s for s, _ in points], [v for _, v in points], marker="o", color="0.55", label=f"{name} at each save")
    kept = [(step, values[step]) for _, step in ranked if step in values]
    if kept:
        ax.scatter(*zip(*kept), s=160, marker="*", color="tab:orange", zorder=3, label="retained top-k")
        for rank, step in ranked:
            if step in values:
                ax.annotate(f"#{rank}", (step, values[step]), textcoords="offset points", xytext=(0, 10), ha="center")
    newest = [(row["step"], values[row["step"]]) for row in data["checkpoints"] if not row.get("top_k_rank") and row["step"] in values]
    if newest:
        ax.scatter(*zip(*newest), s=90, marker="s", color="tab:green", zorder=3, label="kept as newest (for resume)")
    shown = [(step, values[step]) for step in published if step in values]
    if shown:
        ax.scatter(*zip(*shown), s=260, facecolors="none", edgecolors="tab:blue", linewidths=2, zorder=4,
                   label="published branch (step-N)")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(f"{Path(directory).name}: {name} ({'higher' if data.get('higher_is_better', True) else 'lower'} is better)")
    ax.margins(y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
