"""SIGTERM (TPU preemption / maintenance, Kubernetes eviction) -> stop at the next step boundary, save, exit 0.

The signal handler only sets a flag; the training loop asks ``should_stop()`` after each step, saves a checkpoint
with ``force=True`` and returns normally, so the process exits 0 and the scheduler reruns the same command, which
resumes (``checkpoint.restore_or_init``). On several processes the flag is OR-ed across processes at the check, so
all of them stop after the same step even if only one received the signal (a collective save needs everyone).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Iterable

import jax
import numpy as np

log = logging.getLogger(__name__)


class PreemptionHandler:
    """Install with ``with PreemptionHandler() as pre:``; in the loop: ``if pre.should_stop(): save; break``.

    ``sync_every``: on multiple processes, agree (one small all-gather) every this many checks; a signal is still
    acted on at the first agreed check after it arrives.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), sync_every: int = 1):
        self.signals = tuple(signals)
        self.sync_every = max(1, int(sync_every))
        self._flag = threading.Event()
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self._checks = 0
        self._installed = False

    def _handler(self, signum, frame):  # noqa: ARG002 - signal API
        self._received = signum
        self._flag.set()

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: not in the main thread; SIGTERM will not be caught")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            for s, prev in self._previous.items():
                signal.signal(s, prev)
            self._installed = False

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """This process received a stop signal (not yet agreed with the others)."""
        return self._flag.is_set()

    def request(self) -> None:
        """Ask for a stop as if a signal had arrived (tests, or a loop's own time limit)."""
        self._flag.set()

    def should_stop(self) -> bool:
        """Call once per step, at the step boundary, on every process. True on all processes together."""
        self._checks += 1
        if jax.process_count() == 1:
            stop = self._flag.is_set()
        else:
            if self._checks % self.sync_every:
                return False
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.asarray([self._flag.is_set()], np.int32))
            stop = bool(np.asarray(flags).any())
        if stop:
            name = signal.Signals(self._received).name if self._received else "a peer's signal"
            log.warning("preemption: %s received; stopping at this step boundary", name)
        return stop
