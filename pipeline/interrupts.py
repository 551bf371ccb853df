"""SIGTERM and SIGINT (a scheduler's pre-emption, Ctrl-C) stop a run cleanly.

``handled()`` (around the entry point's run) turns both signals into ``Interrupted``, a ``BaseException``: the run
record says ``interrupted``, nothing half-written is published (a stage computes in ``<key>.partial``),
and the process exits with 128 + the signal's number. Inside ``deferred()`` (the training loop, one
process) the first signal only asks to stop: the loop finishes the step it is in, writes a checkpoint
and then raises, so the rerun resumes from that step; a second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal arrived; ``signal_name`` says which, ``exit_code`` is 128 + its number."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + int(signum)
        super().__init__(f"{self.signal_name} received")


_pending: int | None = None
_deferring = 0


def handle(signum: int, frame) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        print(f"[run] {signal.Signals(signum).name}: finishing the current step, then checkpointing and stopping "
              "(send it again to stop at once)", flush=True)
        return
    raise Interrupted(signum)


@contextmanager
def handled():
    """SIGTERM and SIGINT raise ``Interrupted`` within this block (main thread only: elsewhere signals
    cannot be set, and the block changes nothing); the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handle) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


@contextmanager
def deferred():
    """Within this block a first signal is only recorded: ``stop_requested`` reports it."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring:
            _pending = None


def stop_requested() -> Interrupted | None:
    """The exception to raise at the next safe point, when a signal arrived inside ``deferred``."""
    return Interrupted(_pending) if _pending is not None else None
