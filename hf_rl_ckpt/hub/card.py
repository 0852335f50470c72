"""The model card (README.md) of a checkpoint, built with `huggingface_hub.ModelCard`.

One renderer serves two places: the README.md written into every checkpoint before it is
committed (so the card is in the manifest, with the leaderboard as of that save), and the
README.md the Hub publisher commits to each branch (re-rendered with the leaderboard as of
the push). Everything the card says is read from the checkpoint folder itself (model
config or adapter config, the redacted `config.yaml`) plus the leaderboard, so the same
checkpoint and leaderboard always give the same bytes: `main` and the best `step-<N>`
branch carry identical cards, and re-pushing an unchanged card costs no commit.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..redact import redact_secrets
from ..layout import ADAPTER_DIR, CONFIG_YAML, CONSOLIDATED_DIR
from ..records import Contents
from ..retention import RetentionPolicy, metric_value

LIBRARY_TAG = "hf_rl_ckpt"

#: Training settings worth a line in the card's summary, looked up anywhere in the training config.
SUMMARY_KEYS = (
    "learning_rate", "lr", "per_device_train_batch_size", "train_batch_size", "global_batch_size",
    "gradient_accumulation_steps", "num_train_epochs", "max_steps", "max_num_steps", "warmup_steps", "warmup_ratio",
    "lr_scheduler_type", "optim", "weight_decay", "max_grad_norm", "seed", "bf16", "fp16", "beta",
    "num_generations", "max_length", "max_completion_length",
)
_AUTO_CLASSES = {
    "ForCausalLM": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForQuestionAnswering": "AutoModelForQuestionAnswering",
    "ForConditionalGeneration": "AutoModelForSeq2SeqLM",
}
_PEFT_AUTO_CLASSES = {"CAUSAL_LM": "AutoPeftModelForCausalLM", "SEQ_CLS": "AutoPeftModelForSequenceClassification"}


def branch_for(step: int) -> str:
    """The Hub branch of the checkpoint of `step` (`vllm serve REPO --revision step-<N>`)."""
    return f"step-{step}"


@dataclass(frozen=True)
class LeaderboardEntry:
    """One published checkpoint: its step, ranking metric (None when it has none), rank (1 = best) and branch."""

    step: int
    value: float | None
    rank: int | None
    branch: str


@dataclass(frozen=True)
class Leaderboard:
    """The checkpoints a run publishes, best first, and `main`: the step the `main` branch holds.

    Published are the `keep_top_k` best by the metric; the newest checkpoint that retention
    also keeps (for resume) is not a serving candidate unless it ranks. With no `keep_top_k`
    every checkpoint is kept and published; with no metric the newest one is `main`.

    ```python
    >>> from hf_rl_ckpt.retention import RetentionPolicy
    >>> rows = [{"step": s, "metrics": {"acc": a}} for s, a in [(1, 0.2), (2, 0.9), (3, 0.5), (4, 0.1)]]
    >>> board = Leaderboard.from_rows(rows, RetentionPolicy(keep_top_k=2, metric_name="acc"))
    >>> [e.step for e in board.entries], board.main
    ([2, 3], 2)

    ```
    """

    metric_name: str | None
    higher_is_better: bool
    entries: tuple[LeaderboardEntry, ...]
    main: int | None

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], policy: RetentionPolicy) -> "Leaderboard":
        """The leaderboard of registry rows (`{"step": N, "metrics": {...}}`, in commit order) under `policy`."""
        values = {row["step"]: metric_value(row.get("metrics"), policy.metric_name, row["step"]) for row in rows}  # commit order
        ranking = policy.top_k(values)
        entries = [LeaderboardEntry(step, values[step], rank, branch_for(step)) for rank, step in enumerate(ranking, start=1)]
        if policy.keep_top_k is None:
            unranked = [step for step in reversed(values) if step not in ranking]  # the most recent commit first
            entries += [LeaderboardEntry(step, None, None, branch_for(step)) for step in unranked]
        main = ranking[0] if ranking else (entries[0].step if entries else None)
        return cls(policy.metric_name, policy.higher_is_better, tuple(entries), main)

    @classmethod
    def single(cls, step: int, metrics: Mapping[str, Any], policy: RetentionPolicy, *, branch: str) -> "Leaderboard":
        """The leaderboard of one checkpoint pushed by hand to `branch` (`main` holds it only when `branch` is main)."""
        value = metric_value(metrics, policy.metric_name, step)
        entry = LeaderboardEntry(step, value, 1 if value is not None else None, branch)
        return cls(policy.metric_name, policy.higher_is_better, (entry,), step if branch == "main" else None)

    @property
    def steps(self) -> list[int]:
        return [e.step for e in self.entries]


def card_rows(rows: Sequence[Mapping[str, Any]], step: int, metrics: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Registry rows as they will be once the checkpoint of `step` (with `metrics`) is committed."""
    return [row for row in rows if row.get("step") != step] + [{"step": step, "metrics": dict(metrics)}]


@dataclass(frozen=True)
class ModelInfo:
    """What the checkpoint's model folder says about the model (read from its config files)."""

    folder: str  # CONSOLIDATED_DIR or ADAPTER_DIR
    architectures: tuple[str, ...]
    model_type: str | None
    base_model: str | None
    peft_type: str | None
    peft_task: str | None

    @property
    def is_adapter(self) -> bool:
        return self.folder == ADAPTER_DIR

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads this model (by its architecture's suffix)."""
        for arch in self.architectures:
            for suffix, auto in _AUTO_CLASSES.items():
                if arch.endswith(suffix):
                    return auto
        return "AutoModelForCausalLM" if self.peft_task == "CAUSAL_LM" else "AutoModel"

    @property
    def pipeline_tag(self) -> str | None:
        return "text-generation" if self.auto_class == "AutoModelForCausalLM" else None


def read_model_info(ckpt_dir: str | os.PathLike, contents: Contents | None = None) -> ModelInfo:
    """Architecture, base model and adapter type from a checkpoint's `model/adapter` or `model/consolidated` folder.

    `contents` is what the checkpoint holds; by default, what its training_info.json records
    (a checkpoint being written passes its plan's).

    ```python
    >>> read_model_info("runs/ckpt/step_40").auto_class      # doctest: +SKIP
    'AutoModelForCausalLM'
    ```
    """
    ckpt_dir = Path(ckpt_dir)
    if (contents or Contents.of(ckpt_dir)).deployable_dir == ADAPTER_DIR:
        adapter = _read_json(ckpt_dir / ADAPTER_DIR / "adapter_config.json")
        return ModelInfo(
            folder=ADAPTER_DIR,
            architectures=(),
            model_type=None,
            base_model=_hub_id_or_none(adapter.get("base_model_name_or_path")),
            peft_type=adapter.get("peft_type"),
            peft_task=adapter.get("task_type"),
        )
    config = _read_json(ckpt_dir / CONSOLIDATED_DIR / "config.json")
    return ModelInfo(
        folder=CONSOLIDATED_DIR,
        architectures=tuple(config.get("architectures") or ()),
        model_type=config.get("model_type"),
        base_model=_hub_id_or_none(config.get("_name_or_path")),
        peft_type=None,
        peft_task=None,
    )


def render_model_card(
    ckpt_dir: str | os.PathLike,
    *,
    step: int,
    metrics: Mapping[str, Any],
    leaderboard: Leaderboard,
    repo_id: str | None = None,
    revision: str | None = None,
    local_path: str | os.PathLike | None = None,
    contents: Contents | None = None,
) -> ModelCard:
    """The card of the checkpoint of `step`, as published on branch `revision` of `repo_id`.

    Without `repo_id` (a run that does not publish) the usage snippets point at the local
    model folder instead, under `local_path` (where the checkpoint lives once committed;
    default `ckpt_dir`); `contents` as in `read_model_info`. The metadata holds `base_model` (when the config names a Hub
    model), `library_name`, tags and a `model-index` with one `EvalResult` per numeric
    metric of this checkpoint.

    ```python
    >>> from hf_rl_ckpt.retention import RetentionPolicy
    >>> board = Leaderboard.from_rows([{"step": 40, "metrics": {"acc": 0.9}}], RetentionPolicy(2, "acc"))
    >>> card = render_model_card("runs/ckpt/step_40", step=40, metrics={"acc": 0.9}, leaderboard=board,
    ...                          repo_id="alice/run", revision="step-40")   # doctest: +SKIP
    >>> card.data.eval_results[0].metric_value                             # doctest: +SKIP
    0.9
    ```
    """
    ckpt_dir = Path(ckpt_dir)
    local_path = Path(local_path or ckpt_dir)
    info = read_model_info(ckpt_dir, contents)
    numbers = _numeric_metrics(metrics)
    title = repo_id or f"{local_path.resolve().parent.name}/{local_path.name}"
    tags = [LIBRARY_TAG, "checkpoint"] + [t.lower() for t in (info.model_type, info.peft_type) if t]
    data = ModelCardData(
        base_model=info.base_model,
        library_name="peft" if info.is_adapter else "transformers",
        pipeline_tag=info.pipeline_tag,
        tags=tags,
        model_name=title,
        eval_results=[
            EvalResult(
                task_type=info.pipeline_tag or "other",
                dataset_type="custom",
                dataset_name=f"evaluation at step {step}",
                metric_type=name,
                metric_name=name,
                metric_value=value,
            )
            for name, value in numbers.items()
        ]
        or None,
    )
    sections = [
        f"# {title}",
        _intro(step, repo_id, leaderboard, numbers),
        _leaderboard_section(leaderboard, step, repo_id),
        _metrics_section(numbers),
        _usage_section(info, repo_id, revision, local_path / info.folder),
        _config_section(ckpt_dir / CONFIG_YAML, full=repo_id is None),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


# ---------------------------------------------------------------------- sections
def _intro(step: int, repo_id: str | None, board: Leaderboard, metrics: Mapping[str, float]) -> str:
    metric = board.metric_name
    lines = [f"Checkpoint of step **{step}**, written by `hf_rl_ckpt`."]
    if metric and metric in metrics:
        lines[0] += f" `{metric}` = {_fmt(metrics[metric])}."
    if repo_id and board.main is not None:
        order = "higher" if board.higher_is_better else "lower"
        ranked_by = f"by `{metric}` ({order} is better)" if metric else "(the newest)"
        lines.append(f"Each checkpoint listed below is a branch of this repository; `main` holds the best one {ranked_by}.")
        if board.main == step:
            lines.append("**This checkpoint is the current best (`main`).**")
    return "\n\n".join(lines)


def _leaderboard_section(board: Leaderboard, step: int, repo_id: str | None) -> str:
    if not board.entries:
        return ""
    metric = board.metric_name or "metric"
    header = ["rank", "step", f"`{metric}`"] + (["branch"] if repo_id else [])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in board.entries:
        cells = [str(entry.rank) if entry.rank else "-", f"**{entry.step}**" if entry.step == step else str(entry.step), _fmt(entry.value)]
        if repo_id:
            on_main = entry.step == board.main and entry.branch != "main"
            cells.append(f"`{entry.branch}`" + (" = `main`" if on_main else ""))
        rows.append("| " + " | ".join(cells) + " |")
    return "## Checkpoints\n\n" + "\n".join(rows)


def _metrics_section(metrics: Mapping[str, float]) -> str:
    if not metrics:
        return ""
    rows = ["| metric | value |", "|---|---|"] + [f"| `{name}` | {_fmt(value)} |" for name, value in metrics.items()]
    return "## Metrics of this checkpoint\n\n" + "\n".join(rows)


def _usage_section(info: ModelInfo, repo_id: str | None, branch: str | None, local_folder: Path) -> str:
    ref = repo_id or str(local_folder)
    pinned = bool(repo_id and branch and branch != "main")
    revision = f', revision="{branch}"' if pinned else ""
    cli_revision = f" --revision {branch}" if pinned else ""
    blocks = ["## Usage"]
    if info.is_adapter:
        peft_auto = _PEFT_AUTO_CLASSES.get(info.peft_task or "", "AutoPeftModel")
        base = info.base_model or "<base model>"
        adapter_path = f"adapter-{branch or 'main'}" if repo_id else ref
        download = f"hf download {repo_id}{cli_revision} --local-dir {adapter_path}\n" if repo_id else ""
        blocks += [
            "This is a LoRA/PEFT adapter; it loads on top of its base model"
            + (f" `{info.base_model}`." if info.base_model else " (the base was not a Hub model; pass your local copy)."),
            "### transformers (with peft installed)",
            f'```python\nfrom transformers import {info.auto_class}, AutoTokenizer\n\n'
            f'model = {info.auto_class}.from_pretrained("{ref}"{revision})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{ref}"{revision})\n```',
            "### PEFT",
            f'```python\nfrom peft import {peft_auto}\n\nmodel = {peft_auto}.from_pretrained("{ref}"{revision})\n```',
            "### vLLM",
            f"```bash\n{download}vllm serve {base} --enable-lora --lora-modules {branch or 'adapter'}={adapter_path}\n```",
        ]
    else:
        blocks += [
            "### transformers",
            f'```python\nfrom transformers import {info.auto_class}, AutoTokenizer\n\n'
            f'model = {info.auto_class}.from_pretrained("{ref}"{revision})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{ref}"{revision})\n```',
            "### PEFT (fine-tune further with a LoRA adapter)",
            f'```python\nfrom peft import LoraConfig, get_peft_model\nfrom transformers import {info.auto_class}\n\n'
            f'base = {info.auto_class}.from_pretrained("{ref}"{revision})\n'
            f'model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))\n```',
            "### vLLM",
            f"```bash\nvllm serve {ref}{cli_revision}\n```",
        ]
    return "\n\n".join(blocks)


def _config_section(config_yaml: Path, *, full: bool) -> str:
    """The training configuration: a summary, and (`full`, a card that is not pushed) the whole redacted config.yaml.

    A pushed card never carries the whole configuration: it names local paths, storage URLs
    and whatever else a training script put there. It travels to the Hub only as
    `training_state/config.yaml`, when the run pushes its training state.
    """
    try:
        document = yaml.safe_load(config_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    document = redact_secrets(document)  # config.yaml is redacted when written; a card must never depend on that alone
    checkpoint = document.get("checkpoint") or {}
    summary = {key: checkpoint[key] for key in ("metric_name", "higher_is_better", "keep_top_k", "save_period") if checkpoint.get(key) is not None}
    found: dict[str, Any] = {}
    _collect(document.get("training") or {}, found)
    summary.update((key, found[key]) for key in SUMMARY_KEYS if key in found)
    lines = ["## Training configuration"]
    if summary:
        lines.append("\n".join(f"- `{key}`: {value}" for key, value in summary.items()))
    if full:
        whole = yaml.safe_dump(document, sort_keys=False).strip()
        lines.append(f"<details><summary>Full configuration (secrets redacted)</summary>\n\n```yaml\n{whole}\n```\n\n</details>")
    return "\n\n".join(lines)


# ---------------------------------------------------------------------- helpers
def _collect(tree: Any, found: dict[str, Any]) -> None:
    """First scalar value of every key of a nested config (depth-first), for the summary lookup."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if isinstance(value, (Mapping, list)):
                _collect(value, found)
            elif value is not None and isinstance(key, str):
                found.setdefault(key, value)
    elif isinstance(tree, list):
        for value in tree:
            _collect(value, found)


def _numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a (possibly nested, NeMo-RL style) metrics dict; nested names joined with ':'."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(_numeric_metrics(value, prefix=f"{key}:"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = value
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _hub_id_or_none(name: Any) -> str | None:
    """`name` when it reads as a Hub repo id (`org/model`), None for an empty value or a local path."""
    if not isinstance(name, str) or not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name
