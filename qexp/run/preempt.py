"""Preemption: turn the signals a scheduler sends into "checkpoint at the next step, then exit".

SLURM sends SIGTERM (or the signal named by ``--signal``, often SIGUSR1) before it kills a job.
submitit (hydra's SLURM launcher) installs its own SIGUSR2 handler that requeues the job and exits at
once; we take that signal over only while training, let the loop write its checkpoint first, and then
call submitit's handler, so the requeued job resumes from this step instead of the last epoch.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("qexp")

#: always handled while training (SIGINT: Ctrl-C does what SIGTERM does, and the run exits 130)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: handled only when someone (submitit) already has a Python handler for it, which is then chained
CHAINED_ONLY = (signal.SIGUSR2,)

# Once a stop was asked for, it stays asked for in this process: a local sequential sweep must not
# start its next job after SIGTERM.
_requested = threading.Event()
_by_user = threading.Event()
#: the first stop signal this process received (a sweep exits 128 + it: 130 after Ctrl-C, 143 after SIGTERM)
_first_signal: list[int] = []


def requested() -> bool:
    return _requested.is_set()


def interrupted_by_user() -> bool:
    """Was the stop a Ctrl-C (SIGINT)? Then the process exits 130, as a shell expects."""
    return _by_user.is_set()


def stop_signal() -> int | None:
    """The first stop signal this process received, or None."""
    return _first_signal[0] if _first_signal else None


def signal_name(signum: int) -> str:
    """``Ctrl-C`` for SIGINT, else the signal's name (``SIGTERM``)."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def note_signal(signum: int) -> None:
    """A stop signal arrived (SIGINT: a Ctrl-C): no new run starts in this process."""
    if not _first_signal:
        _first_signal.append(int(signum))
    if signum == signal.SIGINT:
        _by_user.set()
    _requested.set()


def note_user_interrupt() -> None:
    """A Ctrl-C that arrived outside :func:`stop_on_signals` (as KeyboardInterrupt): stop the sweep too."""
    note_signal(signal.SIGINT)


def reset() -> None:
    """Forget an earlier stop request (tests, or a long-lived process that means to go on)."""
    _requested.clear()
    _by_user.clear()
    _first_signal.clear()


@contextmanager
def stop_on_signals(forward: Callable[[int], None] | None = None) -> Iterator[threading.Event]:
    """While inside, the stop signals set the yielded event (and call ``forward``) instead of killing.

    On leaving, handlers that were there before are restored, and the Python ones among them (e.g.
    submitit's requeue) are called for the signals that arrived, after the checkpoint was written.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    signals = list(STOP_SIGNALS) + [s for s in CHAINED_ONLY if callable(signal.getsignal(s))]
    old = {s: signal.getsignal(s) for s in signals}
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        # no logging here: a signal that lands while this thread writes a log line (or a second signal
        # while this handler logs) re-enters the same file and printed a "Logging error" traceback
        received.append(signum)
        note_signal(signum)
        stop.set()
        if forward is not None:
            forward(signum)

    if _requested.is_set():
        stop.set()
    for s in signals:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if received:
            log.warning("received signal %s: checkpointed and stopped",
                        ", ".join(str(s) for s in dict.fromkeys(received)))
        for s in dict.fromkeys(received):
            if callable(old[s]) and old[s] is not signal.default_int_handler:  # not: raise KeyboardInterrupt
                old[s](s, None)
