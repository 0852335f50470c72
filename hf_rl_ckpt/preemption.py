"""Saving on preemption: the signals that announce the end of a job, recorded and acted on at a step boundary.

SLURM (`--signal=USR1@120`, and SIGTERM at the time limit), Kubernetes (SIGTERM on pod
eviction) and spot/preemptible VMs (SIGTERM from the shutdown agent) warn a job before they
kill it. `PreemptionWatch` catches SIGTERM and SIGUSR1 and only records the signal: a
handler runs between two bytecodes of the training thread, where writing a checkpoint
(collectives, CUDA copies, locks held mid-step) is unsafe. The manager reads the record at
the next `should_save(step)`, where every rank agrees (`distributed.any_rank`) that one of
them was signalled, writes one checkpoint and reports `preempted`; integrations then stop
training. Handlers installed before ours are still called (chained), so a framework's own
SIGTERM handling keeps working. Further signals while the save runs are recorded again and
change nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger("hf_rl_ckpt")

#: What job schedulers and cloud providers send before killing a job.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Records the preemption signals this process receives, from `install()` until `uninstall()`.

    ```python
    >>> watch = PreemptionWatch()
    >>> watch.install()
    True
    >>> watch.signal_name is None
    True
    >>> watch.uninstall()
    ```
    """

    def __init__(self) -> None:
        self.received: int | None = None  # the last signal number received
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def install(self) -> bool:
        """Handle the preemption signals; False (with a warning) outside the main thread, where Python cannot."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("save_on_preemption: not in the main thread, so SIGTERM/SIGUSR1 cannot be handled here; no save on preemption")
            return False
        for signum in PREEMPTION_SIGNALS:
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._record)
        return True

    def uninstall(self) -> None:
        """Give the signals back to the handlers found at `install` (only where ours is still the one installed)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._record:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # nothing else here: the training thread is interrupted at an arbitrary bytecode
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
