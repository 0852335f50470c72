"""The background worker shared by network destinations: keyed jobs coalesce, transient failures are retried, nothing escapes."""

from __future__ import annotations

import logging
import threading

import pytest

from hf_rl_ckpt import CheckpointConfig, ConfigError
from hf_rl_ckpt.background import BackgroundWorker, RetryPolicy

pytestmark = pytest.mark.logic

NO_WAIT = RetryPolicy(attempts=3, initial_delay=0, max_delay=0)


class Flaky(Exception):
    """A failure worth retrying."""


def test_retry_policy_waits_grow_to_the_cap_and_transient_failures_are_retried() -> None:
    assert list(RetryPolicy(attempts=5, initial_delay=1, max_delay=5).delays()) == [1, 2, 4, 5]
    assert list(RetryPolicy(attempts=1).delays()) == []
    outcomes = iter([Flaky("1"), Flaky("2"), "done"])

    def attempt() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    retried = []
    assert NO_WAIT.call(attempt, transient=lambda err: isinstance(err, Flaky), on_retry=lambda err, delay: retried.append(str(err))) == "done"
    assert retried == ["1", "2"]
    with pytest.raises(Flaky, match="last"):  # the attempts run out: the last error is raised as is
        NO_WAIT.call(lambda: (_ for _ in ()).throw(Flaky("last")), transient=lambda err: True)
    calls = []
    with pytest.raises(KeyError):  # not transient: no retry
        NO_WAIT.call(lambda: calls.append(1) or {}["missing"], transient=lambda err: isinstance(err, Flaky))
    assert calls == [1]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"attempts": 0}, "hub_retry.attempts must be an integer >= 1"),
        ({"initial_delay": -1}, "hub_retry.initial_delay must be a number of seconds >= 0"),
        ({"factor": 0.5}, "hub_retry.factor must be >= 1"),
        ({"max_delay": "long"}, "hub_retry.max_delay must be a number of seconds"),
        ({"attemps": 3}, "unknown checkpoint config key 'hub_retry.attemps'. Did you mean 'hub_retry.attempts'"),
    ],
)
def test_hub_retry_is_validated_like_the_other_sub_blocks(block, message) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        CheckpointConfig.from_dict({"checkpointing": {"hub_retry": block}})


def test_hub_retry_loads_from_yaml_blocks(tmp_path) -> None:
    path = tmp_path / "ckpt.yaml"
    path.write_text("checkpointing:\n  hub_retry:\n    attempts: 3\n    max_delay: 10\n")
    config = CheckpointConfig.from_yaml(path)
    assert config.hub_retry == RetryPolicy(attempts=3, max_delay=10)
    assert config.to_dict()["hub_retry"] == {"attempts": 3, "initial_delay": 1.0, "max_delay": 10, "factor": 2.0}


def test_jobs_run_in_order_and_a_waiting_job_absorbs_a_resubmission() -> None:
    started, release, ran = threading.Event(), threading.Event(), []
    worker = BackgroundWorker("test-worker", retry=NO_WAIT)

    def blocking() -> None:
        started.set()
        release.wait(timeout=30)
        ran.append("first")

    worker.submit("first", blocking)
    assert started.wait(timeout=30)
    worker.submit("sync", lambda: ran.append("sync v1"))
    worker.submit("other", lambda: ran.append("other"))
    worker.submit("sync", lambda: ran.append("sync v2"))  # replaces v1, keeping its place before "other"
    assert not worker.idle
    release.set()
    worker.drain()
    assert worker.idle and ran == ["first", "sync v2", "other"]
    worker.stop()


def test_transient_failures_are_retried_and_a_failed_job_never_stops_the_worker(caplog) -> None:
    attempts, failures, ran = [], [], []

    def flaky() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise Flaky("try again")
        ran.append("flaky")

    worker = BackgroundWorker(
        "test-worker", retry=NO_WAIT, transient=lambda err: isinstance(err, Flaky), on_failure=lambda key, err: failures.append((key, str(err)))
    )
    worker.submit("flaky", flaky)
    worker.submit("broken", lambda: {}["missing"])
    worker.submit("always", lambda: (_ for _ in ()).throw(Flaky("still down")))
    worker.submit("after", lambda: ran.append("after"))
    worker.drain()
    assert len(attempts) == 3 and ran == ["flaky", "after"]
    assert failures == [("broken", "'missing'"), ("always", "still down")]
    worker.stop()

    logged = BackgroundWorker("test-logging")  # default: one ERROR line per failed job
    with caplog.at_level(logging.ERROR, logger="hf_rl_ckpt"):
        logged.submit("broken", lambda: {}["missing"])
        logged.drain()
    assert "test-logging: job 'broken' failed: KeyError" in caplog.text
    logged.stop()


def test_stop_runs_what_was_submitted_and_a_later_submit_starts_again() -> None:
    ran = []
    worker = BackgroundWorker("test-worker")
    worker.submit("a", lambda: ran.append("a"))
    worker.stop()
    assert ran == ["a"]
    worker.submit("b", lambda: ran.append("b"))
    worker.drain()
    worker.stop()
    assert ran == ["a", "b"]
