"""One writer per run folder: an exclusive lock file with its holder's pid, host and a heartbeat.

``<run>/.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+), holds
``{"pid", "host", "started", "token"}`` as JSON, and its mtime is the holder's heartbeat: a daemon thread
touches it every :data:`HEARTBEAT_S` seconds while the run trains. A second launch finds the file and
either refuses (one line naming the holder) or waits for it. A lock whose holder died is reclaimed:

* same host: the holder's pid no longer runs (or is a different process that reused the pid);
* another host: its heartbeat is older than :data:`STALE_S` seconds (node lost, or killed with -9).

``qexp runs`` applies the same rule to show a ``running`` run whose process died as ``dead``.
Reclaiming is serialised by a second O_EXCL file (``.lock.reclaim``), so two launches that find the
same dead holder cannot both take over.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexp.errors import QexpError

LOCK = ".lock"
#: how often the holder refreshes the lock's mtime
HEARTBEAT_S = 10.0
#: a lock (or a ``running`` run) whose heartbeat is older than this is taken as dead on another host
STALE_S = 120.0
#: how often a waiting launch looks at the lock again
POLL_S = 2.0


class LockBusy(QexpError):
    """Another live process holds the run folder (distinct from bad input: nothing was wrong with it)."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: float
    token: str
    heartbeat: float  # the lock file's mtime
    proc_start: str | None = None  # the holder's start time in ticks since boot (tells a reused pid apart)

    def describe(self, now: float | None = None) -> str:
        age = (time.time() if now is None else now) - self.heartbeat
        return f"pid {self.pid} on {self.host} (heartbeat {max(age, 0):.0f} s ago)"


def hostname() -> str:
    return socket.gethostname()


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from the state on (Linux); None elsewhere or when the pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, to tell a reused pid apart."""
    stat = _proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Does ``pid`` run (not a zombie), and is it the process that started at ``start``?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: trust kill(0)
    if stat[0] in ("Z", "X"):
        return False
    return start is None or len(stat) <= 19 or stat[19] == start


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None when there is no lock file."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        d = json.loads(text)
        return Holder(int(d["pid"]), str(d["host"]), float(d["started"]), str(d.get("token", "")), mtime,
                      d.get("proc_start"))
    except (ValueError, KeyError, TypeError):  # being written right now, or garbage: judge by age only
        return Holder(-1, "?", mtime, "", mtime)


def holder_alive(h: Holder, now: float | None = None) -> bool:
    """Same host: the pid decides. Another host (or an unreadable lock): the heartbeat's age decides."""
    now = time.time() if now is None else now
    if h.host == hostname() and h.pid > 0:
        return pid_alive(h.pid, h.proc_start)
    return now - h.heartbeat <= STALE_S


class RunLock:
    """The exclusive lock of one run folder; ``acquire()`` then ``release()`` (or use ``with``)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.held = False

    # ---- taking it ---------------------------------------------------------------------------------
    def try_acquire(self) -> Holder | None:
        """Take the lock if it is free or its holder is dead; else return the live holder."""
        while True:
            if self._create():
                return None
            h = read_holder(self.path)
            if h is None:
                continue  # released between our attempt and the read: try again
            if holder_alive(h):
                return h
            if not self._reclaim(h):
                continue

    def acquire(self, wait: bool = False, on_wait: Any = None) -> None:
        """Take the lock; raise LockBusy naming the holder, or (``wait``) poll until it is free."""
        announced = False
        while True:
            h = self.try_acquire()
            if h is None:
                break
            if not wait:
                raise LockBusy(f"{self.path.parent} is being trained by {h.describe()}; not starting a "
                               "second writer (lock=wait waits for it)")
            if not announced and on_wait is not None:
                on_wait(h)
                announced = True
            time.sleep(POLL_S)
        self.held = True
        self._beat = threading.Thread(target=self._heartbeat, name="qexp-lock-heartbeat", daemon=True)
        self._beat.start()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        me = {"pid": os.getpid(), "host": hostname(), "started": time.time(), "token": self.token,
              "proc_start": _proc_start(os.getpid())}
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _reclaim(self, dead: Holder) -> bool:
        """Remove a dead holder's lock, if it is still that holder's, under the reclaim guard."""
        guard = self.path.with_name(LOCK + ".reclaim")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:  # a reclaimer that died inside its (sub-second) critical section
                if time.time() - guard.stat().st_mtime > STALE_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.1)
            return False
        os.close(fd)
        try:
            now = read_holder(self.path)
            if now is not None and (now.token, now.pid, now.started) == (dead.token, dead.pid, dead.started):
                self.path.unlink(missing_ok=True)
            return True
        finally:
            guard.unlink(missing_ok=True)

    # ---- holding it --------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (only if it is still ours)."""
        if not self.held:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=1.0)
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def run_alive(run_dir: Path, now: float | None = None) -> bool | None:
    """For a run whose metrics.json says ``running``: is a live process still training it?

    True/False from its lock (see the module docstring); None for a folder without a lock file (a run
    from before locks existed, or one that has not started): the caller falls back to metrics.json's age.
    """
    h = read_holder(Path(run_dir) / LOCK)
    return None if h is None else holder_alive(h, now)
