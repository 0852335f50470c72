"""Background work for destinations that talk to a network: a retry policy and one worker thread.

Every after-commit subscriber that reaches a remote service (the Hub publisher today, a
remote storage tier next) must never block or crash training, and must survive a flaky
network. Two pieces give that, configured by constructor arguments:

- `RetryPolicy`: how often and how patiently a transient failure is retried
  (`RetryPolicy.call` is the one retry loop; the config's `hub_retry` is one).
- `BackgroundWorker`: one thread that runs idempotent jobs in submission order. A job
  submitted under the key of a job still waiting replaces it, so a burst of requests
  coalesces into one run; a job that fails with a transient error is run again per the
  policy; a job that fails for good is reported to `on_failure` and the worker goes on.

```python
>>> worker = BackgroundWorker("hf_rl_ckpt-example", retry=RetryPolicy(attempts=3, initial_delay=0.01))
>>> worker.submit("sync", lambda: None)
>>> worker.drain(); worker.stop()

```
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from itertools import chain
from typing import Callable, Hashable, Iterator, TypeVar

from .errors import ConfigError

logger = logging.getLogger("hf_rl_ckpt")

_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient failures: `attempts` tries, waiting `initial_delay`, then `factor` times longer each time, at most `max_delay`.

    ```python
    >>> list(RetryPolicy(attempts=5, initial_delay=1.0, max_delay=5.0).delays())
    [1.0, 2.0, 4.0, 5.0]

    ```

    Raises:
        ConfigError: a field out of range (the message starts with the field's name).
    """

    attempts: int = 8
    initial_delay: float = 1.0
    max_delay: float = 30.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) or self.attempts < 1:
            raise ConfigError(f"attempts must be an integer >= 1 (got {self.attempts!r}); 1 means no retries.")
        for name in ("initial_delay", "max_delay", "factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a number of seconds >= 0 (got {value!r}).")
        if self.factor < 1:
            raise ConfigError(f"factor must be >= 1 (got {self.factor!r}): waits never shrink.")

    def delays(self) -> Iterator[float]:
        """The waits between consecutive attempts (one fewer than `attempts`)."""
        delay = self.initial_delay
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_delay)
            delay *= self.factor

    def call(
        self,
        fn: Callable[[], _T],
        *,
        transient: Callable[[Exception], bool],
        on_retry: Callable[[Exception, float], None] | None = None,
    ) -> _T:
        """`fn()`, run again after each failure `transient` accepts, until it succeeds or the attempts run out.

        `on_retry(error, delay)` runs before each wait (to log it). The last error, or the
        first one `transient` refuses, is raised as is.

        ```python
        >>> RetryPolicy(attempts=2, initial_delay=0).call(lambda: 42, transient=lambda err: True)
        42

        ```
        """
        for delay in chain(self.delays(), [None]):
            try:
                return fn()
            except Exception as err:
                if delay is None or not transient(err):
                    raise
                if on_retry is not None:
                    on_retry(err, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _log_failure(name: str) -> Callable[[Hashable, Exception], None]:
    def log(key: Hashable, error: Exception) -> None:
        logger.error("%s: job %r failed: %s: %s", name, key, type(error).__name__, error)

    return log


class BackgroundWorker:
    """One thread that runs idempotent jobs in order, retrying transient failures; never raises into the caller.

    Jobs are keyed: `submit` with the key of a job that is still waiting replaces that job
    (keeping its place), so requests made while the worker is busy coalesce. A job is
    retried per `retry` while `transient(error)` says the error may pass; any other failure,
    or the last one, goes to `on_failure(key, error)` (default: one ERROR log line) and the
    worker goes on with the next job. The thread starts at the first `submit`, and again at
    a `submit` after `stop`.

    ```python
    >>> calls = []
    >>> worker = BackgroundWorker("hf_rl_ckpt-example", retry=RetryPolicy(attempts=2, initial_delay=0))
    >>> worker.submit("push", lambda: calls.append("pushed"))
    >>> worker.drain()
    >>> calls
    ['pushed']
    >>> worker.stop()

    ```
    """

    def __init__(
        self,
        name: str,
        *,
        retry: RetryPolicy = RetryPolicy(),
        transient: Callable[[Exception], bool] = lambda error: False,
        on_failure: Callable[[Hashable, Exception], None] | None = None,
        daemon: bool = True,
    ) -> None:
        self.name = name
        self.retry = retry
        self.transient = transient
        self.on_failure = on_failure or _log_failure(name)
        self.daemon = daemon
        self._cond = threading.Condition()
        self._waiting: dict[Hashable, Callable[[], None]] = {}  # insertion order is run order
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, key: Hashable, job: Callable[[], None]) -> None:
        """Queue `job` under `key` (replacing a waiting job of the same key) and return at once."""
        with self._cond:
            self._waiting[key] = job
            self._cond.notify_all()
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=self.daemon)
                self._thread.start()

    @property
    def idle(self) -> bool:
        """True when no job is waiting or running."""
        with self._cond:
            return not self._waiting and not self._busy

    def drain(self, *, tick: Callable[[], None] | None = None, interval: float = 0.5) -> None:
        """Wait until every submitted job has run (succeeded or been given up); `tick()` runs every `interval` s meanwhile."""
        with self._cond:
            while (self._waiting or self._busy) and self._thread is not None and self._thread.is_alive():
                self._cond.wait(timeout=interval)
                if tick is not None:
                    tick()

    def stop(self) -> None:
        """Run the jobs already submitted, then end the thread (a later `submit` starts a new one)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting:
                    return
                key = next(iter(self._waiting))
                job = self._waiting.pop(key)
                self._busy = True
            try:
                self.retry.call(job, transient=self.transient, on_retry=lambda error, delay: self._log_retry(key, error, delay))
            except Exception as error:  # a job's failure must not end the worker (or reach training)
                self.on_failure(key, error)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _log_retry(self, key: Hashable, error: Exception, delay: float) -> None:
        logger.info("%s: job %r failed (%s: %s); retrying in %.1fs", self.name, key, type(error).__name__, error, delay)
