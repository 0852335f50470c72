"""Model-based (stateful) test of `CheckpointManager`: hypothesis plays whole training runs against a model of one.

A run is a sequence of rules: save (random metrics and extra state: missing, NaN, numpy,
0-d tensors, values JSON cannot hold, a negative step), crash (a real child process forked
by the fault suite's fork server, killed at a named fault point of a save or by a SIGKILL
after a random delay), restart with the same or changed retention settings or name
template, resume `auto` or `from_path` an older step (and keep saving: a new timeline), damage a committed
checkpoint (flip, truncate, extend or delete one of its files, plant a file, garble or
delete its training_info.json, delete it whole), and chdir (the checkpoint_dir may be relative).

The model (`Committed` per step) records what the design promises: a checkpoint's commit
order (the newest is the most recent commit, whatever its step), its metrics as recorded,
the retention settings it was saved under, its weights, and whether the test damaged it.
After every rule `check_run` asserts, in this order:

1. no leftovers: `.incomplete/` and `.trash/` are empty once a save returned or failed;
2. nothing disappeared silently: every committed checkpoint that is gone was deleted by
   the test or named in an eviction log line of the process that evicted it;
3. the directory is the model: the committed checkpoints on disk are exactly the model's,
   each still the commit the model knows (a re-save would change its training_info.json);
4. the most recent commit is there;
5. every view agrees with the model: the running manager's `latest()`, `best()` and
   `checkpoints()`, a fresh manager's `latest()` (started on a hard-link copy of the
   directory, so that its start repairs nothing for the run), `hf-rl-ckpt list` (`cli.list_rows`);
6. that fresh manager's `resume` (auto) loads the newest undamaged checkpoint, with the
   weights that were saved at that step;
7. every checkpoint the test did not damage passes `verify_checkpoint`; every damaged one fails it;
8. nothing was written relative to a directory the process chdir'ed into.

Each save also checks what it recorded (numpy/tensor scalars as numbers, non-finite
values as null, strict JSON), and each refused save that it refused before writing
anything; each crash that the child resumed where the model says and that no step it
reported committed vanished without an eviction line; each restart that it resumed where
the model says (a rollback warns naming the later steps) and that another name template is
refused while checkpoints carry the old one. Default: 16 short derandomized runs (about a
minute on two cores);
`--hypothesis-profile=soak` (registered in tests/conftest.py) runs many more, see
benchmarks/model_based_soak.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from hf_rl_ckpt import CheckpointConfig, CheckpointError, CheckpointManager, ConfigError, CorruptCheckpointError, verify_checkpoint
from hf_rl_ckpt.cli import list_rows
from hf_rl_ckpt.faultpoint import FAULT_POINTS
from hf_rl_ckpt.layout import INCOMPLETE_DIR, LOCK_FILE, TRAINING_INFO, TRASH_DIR, CheckpointLayout
from training_objects import make_training_objects

sys.path.insert(0, str(Path(__file__).with_name("faults")))
from faultlib import Zygote, reported  # noqa: E402

pytestmark = pytest.mark.logic

#: The default run: small enough for CI on two shared cores, derandomized so CI is reproducible.
DEFAULT_SETTINGS = settings(
    max_examples=16, stateful_step_count=25, deadline=None, derandomize=True, database=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ----------------------------------------------------------------- strategies
#: Few distinct numbers, so that metric ties (ranked by recency) are common.
NUMBERS = st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.5, -1.0])
FINITE = st.one_of(
    NUMBERS,
    NUMBERS.map(int),
    NUMBERS.map(np.float32),
    NUMBERS.map(np.float64),
    NUMBERS.map(lambda x: np.int64(int(x))),
    NUMBERS.map(np.array),  # a 0-d array
    NUMBERS.map(torch.tensor),  # a 0-d tensor
    NUMBERS.map(lambda x: torch.tensor(int(x))),
)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf]).flatmap(
    lambda x: st.sampled_from([x, np.float32(x), torch.tensor(x)])
)
#: Values no JSON file can hold as a number: a save must refuse them, naming the key, before writing anything.
UNRECORDABLE = st.one_of(
    st.builds(lambda: torch.tensor([1.0, 2.0])), st.builds(lambda: np.array([0.5, 0.25])), st.builds(lambda: {1, 2}), st.builds(object),
)
VALUES = st.sampled_from(["finite"] * 6 + ["missing", "non-finite", "unrecordable"]).flatmap(
    lambda kind: {"finite": FINITE, "missing": st.none(), "non-finite": NON_FINITE, "unrecordable": UNRECORDABLE}[kind]
)
METRIC_NAMES = st.sampled_from(["loss", "reward", "acc"])
METRICS = st.dictionaries(METRIC_NAMES, VALUES, max_size=3)
ORDINARY_METRICS = st.dictionaries(METRIC_NAMES, NUMBERS, max_size=2)
EXTRA_STATE = st.dictionaries(st.sampled_from(["tokens_seen", "ema"]), VALUES, max_size=2)

#: Picks one of a list that depends on the run's state (`pick`). Rules draw nothing whose shape depends on that state,
#: and have no preconditions: a crash's outcome varies with timing, and hypothesis replays draws as recorded.
PICK = st.integers(0, 2**16 - 1)
#: (keep_top_k, metric_name, higher_is_better), as a checkpoint records the settings it was saved under.
Retention = tuple[int | None, str | None, bool]
RETENTION = st.one_of(
    st.tuples(st.none(), st.sampled_from([None, "loss"]), st.just(True)),
    st.tuples(st.integers(1, 3), st.sampled_from(["loss", "reward", "step"]), st.booleans()),
)


def _supported_templates() -> list[str]:
    """Checkpoint name templates to run with: a format spec only where this version accepts and round-trips it."""
    templates = ["step_{step}", "ckpt-{step}-run"]
    try:
        CheckpointConfig(checkpoint_dir="unused", checkpoint_name_template="ckpt_{step:05d}")
    except ConfigError:
        return templates
    return templates + ["ckpt_{step:05d}"]


TEMPLATES = _supported_templates()
#: Where a crash kills the child: each named fault point of a save (at its 1st-3rd hit), or a SIGKILL after a random delay.
CRASH_POINTS = [point for point in FAULT_POINTS if point != "commit.before_hub_enqueue"] + ["sigkill"]
DAMAGES = ["flip", "truncate", "extend", "delete_file", "plant_file", "garble_info", "delete_info", "delete_checkpoint"]


def pick(options: list, which: int) -> Any:
    return options[which % len(options)]


def classify(value: Any) -> tuple[str, Any]:
    """("ok", the number or None a save records) | ("non-finite", None) | ("unrecordable", None)."""
    if value is None:
        return "ok", None
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0:
            return "unrecordable", None
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("ok", value) if math.isfinite(value) else ("non-finite", None)
    return "unrecordable", None


def fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def strict_json(path: Path) -> Any:
    """Parse like a strict JSON reader: bare NaN / Infinity are errors."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{path} holds a bare {constant}, which strict JSON parsers refuse")

    return json.loads(path.read_text(), parse_constant=refuse)


def mentions(text: str, *words: str) -> bool:
    """True when one of `words` appears in `text` as a whole word (step_1 is not step_10)."""
    return any(re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w-]|\.\d)", text) for word in words)


@dataclass
class Committed:
    """What the model knows of one committed checkpoint."""

    seq: int  # commit order: the highest is the most recent commit, the newest checkpoint
    metrics: dict[str, Any]  # as recorded in training_info.json
    retention: Retention  # the settings it was saved under
    signature: str  # sha256 of its training_info.json: a re-save of the step changes it
    weights: str | None  # fingerprint of the saved weights; None where a child process saved them
    damage: str | None = None  # what the test did to it


class _Records(logging.Handler):
    """Collects the `hf_rl_ckpt` log lines of this process."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name} {record.getMessage()}")


#: What every run of this module did, for the summary line (`benchmarks/model_based_soak.py` reads it).
STATS: Counter = Counter()


class CheckpointRun(RuleBasedStateMachine):
    """One training run's checkpoint directory, driven by hypothesis, checked against the model after every rule."""

    def __init__(self, zygote: Zygote, workdir: Path) -> None:
        super().__init__()
        STATS["examples"] += 1
        self.zygote = zygote
        self.work = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
        self.launch, self.elsewhere = self.work / "launch", self.work / "elsewhere"
        self.launch.mkdir()
        self.elsewhere.mkdir()
        self.root = self.launch / "ckpt"
        self.original_cwd = os.getcwd()
        os.chdir(self.launch)  # where the job was launched: every (re)start begins here
        self.records = _Records()
        self.library_logger = logging.getLogger("hf_rl_ckpt")
        self.previous_level = self.library_logger.level
        self.library_logger.addHandler(self.records)
        self.library_logger.setLevel(logging.INFO)  # eviction decisions are logged at INFO
        self.objects = make_training_objects(seed=0)
        self.batch = torch.randint(0, self.objects.model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
        self.scratch = make_training_objects(seed=1)  # what a fresh process resumes into
        self.committed: dict[int, Committed] = {}
        self.seq = 0
        self.step = 0
        self.manager: CheckpointManager | None = None
        self.last_commit: int | None = None  # the step of the most recent commit (None once the test deleted it)
        self.seen: dict[int, str] = {}  # step -> signature on disk at the last check
        self.removed_by_test: set[int] = set()  # since the last check
        self.child_lines: list[str] = []  # log lines of crashed children since the last check
        self.template = TEMPLATES[0]
        self.relative = False
        self.retention: Retention = (None, None, True)
        self.async_save = False
        self.resume_config: dict[str, Any] = {"mode": "auto"}
        self.resume_from: int | None = None  # the step a from_path restart resumes

    # ------------------------------------------------------------- plumbing
    def teardown(self) -> None:
        try:
            if self.manager is not None:
                self.manager.finalize()
        finally:
            self.library_logger.removeHandler(self.records)
            self.library_logger.setLevel(self.previous_level)
            os.chdir(self.original_cwd)
            shutil.rmtree(self.work, ignore_errors=True)

    @property
    def layout(self) -> CheckpointLayout:
        return CheckpointLayout(self.root, self.template)

    def _config_fields(self) -> dict[str, Any]:
        keep_top_k, metric_name, higher_is_better = self.retention
        return dict(
            checkpoint_name_template=self.template, keep_top_k=keep_top_k, metric_name=metric_name,
            higher_is_better=higher_is_better, async_save=self.async_save,
        )

    def _config(
        self, *, absolute: bool = False, resume: dict[str, Any] | None = None, template: str | None = None, root: Path | None = None,
    ) -> CheckpointConfig:
        directory = str(root or self.root) if absolute or not self.relative else os.path.relpath(self.root, self.launch)
        fields = {**self._config_fields(), **({"checkpoint_name_template": template} if template else {})}
        return CheckpointConfig(checkpoint_dir=directory, resume=resume or {"mode": "auto"}, **fields)

    def _disk(self) -> dict[int, str]:
        """Committed checkpoints on disk: step -> sha256 of its training_info.json."""
        return {
            step: hashlib.sha256((path / TRAINING_INFO).read_bytes()).hexdigest() for step, path in self.layout.committed_steps().items()
        }

    def _order(self, step: int) -> tuple[bool, int, int]:
        """The model's commit order: by commit; one whose training_info.json is garbled counts as newest (it cannot say)."""
        entry = self.committed[step]
        garbled = entry.damage == "garble_info"
        return garbled, 0 if garbled else entry.seq, step

    def _newest(self) -> int | None:
        return max(self.committed, key=self._order, default=None)

    def _newest_loadable(self) -> int | None:
        return max((step for step, entry in self.committed.items() if entry.damage is None), key=self._order, default=None)

    def _tree(self) -> dict[str, tuple[int, int]]:
        """Every path under the checkpoint dir with its size and mtime (the lock file excepted)."""
        tree = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                if path.name != LOCK_FILE:
                    stat = path.lstat()
                    tree[str(path.relative_to(self.root))] = (stat.st_size if name in filenames else 0, stat.st_mtime_ns)
        stat = self.root.stat()
        tree["."] = (0, stat.st_mtime_ns)
        return tree

    def _drain(self) -> None:
        """Wait for an async save in flight (and raise its failure): the checks look at committed state."""
        if self.manager is not None:
            self.manager.finalize(terminate=False)

    def _end_process(self) -> None:
        """The training process goes away (its lock share with it)."""
        if self.manager is not None:
            self.manager.finalize()
            self.manager = None

    def _open(self) -> None:
        """A new training process starts on the directory, from where the job was launched."""
        os.chdir(self.launch)
        self.manager = CheckpointManager(self._config(resume=self.resume_config))

    def _resume_and_check(self) -> None:
        """The new process resumes as configured; the model says from which step."""
        mode = self.resume_config["mode"]
        expected = self._newest_loadable() if mode == "auto" else self.resume_from
        newer = [step for step in self.committed if expected is not None and step > expected]
        mark = len(self.records.lines)
        state = self.manager.resume(**self.objects.as_kwargs())
        got = state.step if state is not None else None
        assert got == expected, f"resume ({mode}) loaded step {got}; the model's newest loadable checkpoint is {expected}"
        if expected is not None and self.committed[expected].weights is not None:
            assert fingerprint(self.objects.model) == self.committed[expected].weights, f"resume of step {expected} loaded other weights"
        if mode == "from_path":
            warnings = "\n".join(line for line in self.records.lines[mark:] if line.startswith("WARNING"))
            unnamed = [step for step in newer if not mentions(warnings, self.layout.step_name(step), str(step))]
            assert not unnamed, f"resumed from step {expected} while newer steps {newer} exist; no warning names {unnamed}:\n{warnings}"
        self.step = got or 0

    def _commit(self, step: int, metrics: dict[str, Any], retention: Retention, weights: str | None) -> None:
        """The model learns of a new commit of `step` (a save, or a re-save replacing the step)."""
        self.seq += 1
        signature = hashlib.sha256((self.layout.step_dir(step) / TRAINING_INFO).read_bytes()).hexdigest()
        self.committed[step] = Committed(self.seq, metrics, retention, signature, weights)
        self.last_commit = step

    def _rank_value(self, step: int) -> float | None:
        """The value that ranks `step` under the current settings (None: it cannot rank)."""
        _keep, metric_name, _higher = self.retention
        if metric_name == "step":
            return float(self.committed[step].seq)  # `metric_name: step` keeps the most recent commits
        value = self.committed[step].metrics.get(metric_name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None

    def _ranking(self) -> list[int]:
        """Steps that rank under the current settings, best first; ties: the more recent commit ranks higher."""
        ranked = [step for step in self.committed if self._rank_value(step) is not None]
        sign = -1.0 if self.retention[2] else 1.0
        return sorted(ranked, key=lambda step: (sign * self._rank_value(step), -self.committed[step].seq))

    def _expected_evictions(self, newest: int) -> set[int]:
        """What retention evicts after the commit of `newest`: not in the top k (ties: the more recent commit ranks
        higher), not `newest`, and saved under the current settings (retention never deletes what other settings kept)."""
        keep_top_k, _metric_name, _higher_is_better = self.retention
        if keep_top_k is None:
            return set()
        kept = set(self._ranking()[:keep_top_k]) | {newest}
        return {step for step, entry in self.committed.items() if step not in kept and entry.retention == self.retention}

    # ------------------------------------------------------------- rules
    @initialize(template=st.sampled_from(TEMPLATES), relative=st.booleans(), retention=RETENTION, async_save=st.booleans())
    def start(self, template: str, relative: bool, retention: Retention, async_save: bool) -> None:
        self.template, self.relative, self.retention, self.async_save = template, relative, retention, async_save
        self.resume_config = {"mode": "auto"}
        self._open()
        self._resume_and_check()

    @rule(jump=st.sampled_from([1, 1, 1, 2, 3]), metrics=ORDINARY_METRICS)
    def save(self, jump: int, metrics: dict[str, Any]) -> None:
        """A save as most loops make it: the next step, plain numbers (or none) as metrics."""
        self._save(self.step + jump, metrics, {})

    @rule(jump=st.sampled_from([0, 1, 2, "negative"]), metrics=METRICS, extra_state=EXTRA_STATE)
    def save_unusual_values(self, jump: int | str, metrics: dict[str, Any], extra_state: dict[str, Any]) -> None:
        """A save with numpy/tensor scalars, NaN, infinity or values JSON cannot hold; the same step again; a negative step."""
        self._save(-1 if jump == "negative" else self.step + jump, metrics, extra_state)

    def _save(self, step: int, metrics: dict[str, Any], extra_state: dict[str, Any]) -> None:
        STATS["save"] += 1
        self.objects.train_step(self.batch)
        _keep, metric_name, _higher = self.retention
        refusals = []
        for where, values in (("metrics", metrics), ("extra_state", extra_state)):
            for key, value in values.items():
                kind, _ = classify(value)
                ranking = where == "metrics" and key == metric_name
                if kind == "unrecordable" or (kind == "non-finite" and ranking):
                    refusals.append(key)
        if step < 0:
            refusals.append(str(step))
        before = self._tree()
        try:
            path = self.manager.save(step, **self.objects.as_kwargs(), metrics=metrics, extra_state=extra_state)
            self._drain()
        except CheckpointError as err:
            assert refusals, f"save of step {step} with metrics {metrics}, extra_state {extra_state} failed: {err!r}"
            assert any(mentions(str(err), key) or key in str(err) for key in refusals), f"the refusal does not name any of {refusals}: {err}"
            after = self._tree()
            changed = sorted(set(before.items()) ^ set(after.items()))
            assert not changed, f"a refused save (step {step}: {err}) changed the checkpoint dir: {changed}"
            STATS["save refused"] += 1
            return
        assert not refusals, f"save of step {step} accepted what it must refuse ({refusals}): metrics {metrics}, extra_state {extra_state}"
        assert path == self.layout.step_dir(step), f"save returned {path}, expected {self.layout.step_dir(step)}"
        assert (path / TRAINING_INFO).is_file(), f"the checkpoint just saved, {path.name}, is gone: the most recent commit was evicted"
        info = strict_json(path / TRAINING_INFO)
        strict_json(self.root / "checkpoints.json")
        for where, values, recorded in (("metrics", metrics, info["metrics"]), ("extra_state", extra_state, info["extra"])):
            expected = {key: classify(value)[1] for key, value in values.items()}
            assert recorded == expected, f"{where} {values} recorded as {recorded}, expected {expected}"
            for key, value in recorded.items():
                assert value is None or type(value) in (int, float), f"{where}[{key!r}] recorded as {type(value).__name__}"
        self._commit(step, info["metrics"], self.retention, fingerprint(self.objects.model))
        for evicted in self._expected_evictions(newest=step):
            del self.committed[evicted]
        self.step = step

    @rule(
        point=st.sampled_from(CRASH_POINTS), hit=st.integers(1, 3), saves=st.integers(1, 4), delay=st.floats(0.0, 0.6),
        restart_with=st.one_of(st.none(), RETENTION),
    )
    def crash(self, point: str, hit: int, saves: int, delay: float, restart_with: Retention | None) -> None:
        """The training process dies; a new one (a real child) resumes, saves and is killed; then the job restarts."""
        if self.committed and self._newest_loadable() is None:
            return  # nothing to resume from: a run whose every checkpoint is damaged cannot go on (see `damage`)
        STATS["crash"] += 1
        self._end_process()
        trial = self.work / f"child-{self.seq}-{time.monotonic_ns()}"
        ready, log = trial.with_suffix(".ready"), trial.with_suffix(".log")
        keep_top_k, metric_name, higher_is_better = self.retention
        expected_resume = self._newest_loadable()
        pid = self.zygote.run(
            self.root, ready, fault=None if point == "sigkill" else f"{point}@{hit}", seed=self.seq, config=self._config_fields(),
            metric=metric_name if metric_name in ("loss", "reward", "acc") else None, stop_after=saves, log=str(log),
        )
        if point == "sigkill":
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)  # a zombie until the fork server reaps it: never another process
        outcome = self.zygote.wait(pid)
        assert outcome in ({"signal": signal.SIGKILL}, {"exit_code": 0}), f"the child failed ({outcome}); its traceback is on stderr"
        STATS["crash killed" if "signal" in outcome else "crash not reached"] += 1
        lines = log.read_text().splitlines() if log.exists() else []
        self.child_lines += lines
        resumed = next((int(m.group(1)) for line in lines if (m := re.search(r"resumed from .* \(step (\d+)", line))), None)
        if resumed is not None or any("starting fresh" in line for line in lines):  # else killed before it got that far
            assert resumed == expected_resume, f"the child resumed step {resumed}; the model's newest loadable checkpoint is {expected_resume}"
        child_steps = range((resumed or 0) + 1, (resumed or 0) + saves + 1)
        child_retention = self.retention
        if restart_with is not None:
            self.retention = restart_with
        self.resume_config = {"mode": "auto"}
        self._open()  # its start finishes or undoes what the kill interrupted
        disk = self._disk()
        new = sorted(step for step, signature in disk.items() if step not in self.committed or self.committed[step].signature != signature)
        assert set(new) <= set(child_steps), f"steps {new} appeared, but the child saved only steps {list(child_steps)}"
        evictions = "\n".join(line for line in lines if "evict" in line.lower())
        committed = reported(ready)
        if self.async_save and "signal" in outcome:
            committed = committed[:-1]  # an async save returns before its commit: the next save (or finalize) waits for it
        lost = [step for step in committed if step not in disk and not mentions(evictions, self.layout.step_name(step))]
        assert not lost, f"the child reported steps {lost} committed; they are gone without an eviction naming them"
        for step in new:
            info = json.loads((self.layout.step_dir(step) / TRAINING_INFO).read_text())
            self._commit(step, info["metrics"], child_retention, None)
        for step in set(self.committed) - set(disk):
            del self.committed[step]  # check_run asserts that an eviction named it
        self._resume_and_check()

    @rule(
        restart_with=st.one_of(st.none(), RETENTION), template=st.one_of(st.none(), st.sampled_from(TEMPLATES)),
        from_path=st.booleans(), which=PICK,
    )
    def restart(self, restart_with: Retention | None, template: str | None, from_path: bool, which: int) -> None:
        """The job stops cleanly and starts again, maybe with other retention settings or another name template;
        it resumes auto, or from_path an older checkpoint (a new timeline)."""
        STATS["restart"] += 1
        self._end_process()
        if restart_with is not None:
            self.retention = restart_with
        if template is not None and template != self.template:
            self._change_template(template)
        loadable = sorted(step for step, entry in self.committed.items() if entry.damage is None)
        self.resume_from = pick(loadable, which) if from_path and loadable else None
        if self.resume_from is None:
            self.resume_config = {"mode": "auto"}
        else:
            STATS["restart from_path"] += 1
            self.resume_config = {"mode": "from_path", "resume_path": str(self.layout.step_dir(self.resume_from))}
        self._open()
        self._resume_and_check()
        self.resume_config = {"mode": "auto"}

    def _change_template(self, template: str) -> None:
        """A start with another checkpoint_name_template must not lose sight of the run's checkpoints: refused while
        the directory holds committed checkpoints named by the old one (then the job starts with the old one), else taken."""
        STATS["restart new template"] += 1
        os.chdir(self.launch)
        config = self._config(template=template)
        if not self.committed:
            self.template = template
            return
        before = self._tree()
        with pytest.raises(ConfigError, match="checkpoint_name_template") as refused:
            CheckpointManager(config)
        assert mentions(str(refused.value), self.template), f"the refusal does not name the run's template {self.template!r}: {refused.value}"
        assert self._tree() == before, "a start refused for its name template changed the checkpoint dir"
        STATS["restart new template refused"] += 1

    @rule(how=st.sampled_from(DAMAGES), which=PICK, which_file=PICK, which_byte=PICK)
    def damage(self, how: str, which: int, which_file: int, which_byte: int) -> None:
        """Something outside the library breaks a committed checkpoint (a disk error, a user's rm)."""
        removes = how in ("delete_info", "delete_checkpoint")
        loadable = {step for step, entry in self.committed.items() if entry.damage is None}
        # Keep something to resume from (a run whose every checkpoint is damaged cannot go on), unless nothing is left at all.
        targets = sorted(step for step in self.committed if loadable - {step} or (removes and len(self.committed) == 1))
        if not targets:
            return
        step = pick(targets, which)
        STATS[f"damage {how}"] += 1
        path = self.layout.step_dir(step)
        if how == "delete_checkpoint":
            shutil.rmtree(path)
        elif how in ("delete_info", "garble_info"):
            info = path / TRAINING_INFO
            info.unlink() if how == "delete_info" else info.write_text('{"format_version": 1, "manifest": {')
        elif how == "plant_file":
            (path / "model" / "planted.bin").parent.mkdir(parents=True, exist_ok=True)
            (path / "model" / "planted.bin").write_bytes(b"not written by hf_rl_ckpt")
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != TRAINING_INFO)
            if not files:
                return
            target = pick(files, which_file)
            content = target.read_bytes()
            if how == "delete_file":
                target.unlink()
            elif how == "truncate":
                target.write_bytes(content[: len(content) // 2])
            elif how == "extend":
                target.write_bytes(content + b"\0" * 8)
            elif content:
                offset = which_byte % len(content)
                target.write_bytes(content[:offset] + bytes([content[offset] ^ 0x40]) + content[offset + 1:])
            else:
                target.write_bytes(b"x")
        if removes:
            del self.committed[step]
            self.removed_by_test.add(step)
            if self.last_commit == step:
                self.last_commit = None
        else:
            entry = self.committed[step]
            entry.damage = "garble_info" if "garble_info" in (entry.damage, how) else how  # a garbled training_info.json stays so
            entry.signature = self._disk()[step]

    @rule()
    def chdir(self) -> None:
        """Hydra and others chdir after start: a relative checkpoint_dir must keep meaning the same directory."""
        STATS["chdir"] += 1
        os.chdir(self.elsewhere if Path.cwd() == self.launch else self.launch)

    # ------------------------------------------------------------- invariants
    @invariant()
    def check_run(self) -> None:
        if self.manager is None:  # before `start`
            return
        STATS["steps"] += 1
        self._drain()
        disk = self._disk()
        for leftovers in (self.root / INCOMPLETE_DIR, self.root / TRASH_DIR):
            assert not leftovers.is_dir() or not any(leftovers.iterdir()), f"left behind: {sorted(p.name for p in leftovers.iterdir())}"
        evictions = "\n".join(line for line in self.records.lines + self.child_lines if "evict" in line.lower())
        silent = [
            step for step in self.seen
            if step not in disk and step not in self.removed_by_test and not mentions(evictions, self.layout.step_name(step))
        ]
        assert not silent, f"committed step(s) {silent} disappeared without an eviction log line naming them"
        assert sorted(disk) == sorted(self.committed), f"committed on disk: {sorted(disk)}; the model says {sorted(self.committed)}"
        replaced = [step for step, entry in self.committed.items() if disk[step] != entry.signature]
        assert not replaced, f"step(s) {replaced} on disk are not the commits the model knows (rewritten behind its back)"
        if self.last_commit is not None:
            assert self.last_commit in disk, f"the most recent commit (step {self.last_commit}) is gone"
        self._check_views()
        self._check_verification()
        assert not any(self.elsewhere.iterdir()), f"written relative to a later cwd: {sorted(p.name for p in self.elsewhere.iterdir())}"
        self.seen = disk
        self.removed_by_test.clear()
        self.records.lines.clear()
        self.child_lines.clear()

    def _check_views(self) -> None:
        newest = self._newest()
        expected_latest = self.layout.step_name(newest) if newest is not None else None
        live_latest = self.manager.latest()
        live_rows = sorted(row.step for row in self.manager.checkpoints())
        cli_rows = sorted(row["step"] for row in list_rows(self.root))
        # A fresh process starts on a copy (hard links; a start may rewrite the registry and clean up): starting one on
        # the run's directory would repair what the running process left wrong before the next rule could trip on it.
        copy = self.work / "fresh-process"
        shutil.copytree(self.root, copy, copy_function=os.link, ignore=shutil.ignore_patterns(LOCK_FILE))
        fresh = CheckpointManager(self._config(absolute=True, root=copy))
        try:
            fresh_latest = fresh.latest()
            assert (live_latest and live_latest.name, fresh_latest and fresh_latest.name) == (expected_latest, expected_latest), (
                f"latest(): running manager {live_latest}, fresh manager {fresh_latest}; the most recent commit is {expected_latest}"
            )
            assert live_rows == cli_rows == sorted(self.committed), f"registry {live_rows}, `list` {cli_rows}, model {sorted(self.committed)}"
            ranking = self._ranking()
            expected_best = self.layout.step_name(ranking[0]) if ranking else expected_latest
            best = self.manager.best()
            assert (best and best.name) == expected_best, f"best(): {best}; by {self.retention[1]!r} the model says {expected_best}"
            expected = self._newest_loadable()
            state = fresh.resume(**self.scratch.as_kwargs())
            got = state.step if state is not None else None
            assert got == expected, f"a fresh process resumes step {got}; the newest undamaged checkpoint is {expected}"
            if expected is not None and self.committed[expected].weights is not None:
                assert fingerprint(self.scratch.model) == self.committed[expected].weights, f"resuming step {expected} gave other weights"
        finally:
            fresh.finalize()
            shutil.rmtree(copy)

    def _check_verification(self) -> None:
        for step, entry in self.committed.items():
            path = self.layout.step_dir(step)
            if entry.damage is None:
                verify_checkpoint(path)
            else:
                with pytest.raises(CorruptCheckpointError):
                    verify_checkpoint(path)


@pytest.fixture(scope="module")
def zygote():
    server = Zygote()
    yield server
    server.close()


def test_checkpoint_runs_match_the_model(zygote, tmp_path):
    # A profile chosen on the command line (--hypothesis-profile=soak) wins over the small default run. Hypothesis
    # loads its built-in "ci" profile by itself when the CI variable is set (100 runs of 50 steps, ten times the
    # default run's work): CI gets the default run too.
    run_settings = DEFAULT_SETTINGS if settings.get_current_profile_name() in ("default", "ci") else settings()
    STATS.clear()
    started = time.monotonic()
    try:
        run_state_machine_as_test(lambda: CheckpointRun(zygote, tmp_path), settings=run_settings)
    finally:  # also after a failure: how far the search got (benchmarks/model_based_soak.py reads this line)
        summary = {"profile": settings.get_current_profile_name(), **dict(sorted(STATS.items())), "seconds": round(time.monotonic() - started, 1)}
        print("\nMODEL_BASED_SUMMARY " + json.dumps(summary))
