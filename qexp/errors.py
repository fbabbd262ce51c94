"""User-facing errors: raised for bad input, printed as one message without a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn


class QexpError(Exception):
    """A problem with the user's input or environment (not a bug in qexp).

    The entry points print ``str(err)`` and exit non-zero; anything else is a genuine bug and keeps
    its traceback.
    """


class ForeignRun(QexpError):
    """A run folder holds another configuration's run: refused, and the folder is left as it is (no
    failure is recorded into it)."""


def _fmt(v: object) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                strict_lo: bool = False, why: str = "") -> Any:
    """``value`` itself when ``lo <= value <= hi`` (``lo < value`` with ``strict_lo``; a bound of None is
    open), else one clear :class:`QexpError`: ``method.alpha=-1 is out of range; allowed: > 0``."""
    low_ok = lo is None or (value > lo if strict_lo else value >= lo)
    if low_ok and (hi is None or value <= hi):
        return value
    if lo is not None and hi is not None and not strict_lo:
        allowed = f"{_fmt(lo)}..{_fmt(hi)}"
    else:
        parts = [] if lo is None else [f"{'>' if strict_lo else '>='} {_fmt(lo)}"]
        parts += [] if hi is None else [f"<= {_fmt(hi)}"]
        allowed = " and ".join(parts)
    raise QexpError(f"{name}={_fmt(value)} is out of range; allowed: {allowed}" + (f" ({why})" if why else ""))


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` itself when it is one of ``choices``, else one clear :class:`QexpError`:
    ``method.budget='x' is not allowed; choose from: epochs, updates``."""
    choices = list(choices)
    if value in choices:
        return value
    raise QexpError(f"{name}={_fmt(value)} is not allowed; choose from: {', '.join(map(str, choices))}")


def argument_error(prog: str, message: str) -> str:
    """A bad command-line argument as one line: ``qexp table: unrecognized arguments: --bogus (qexp table
    --help)`` (the subcommands' parsers and ``qexp train``'s Hydra flags)."""
    return f"{prog}: {message} ({prog} --help)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the subcommands, with a bad argument reported as one line (exit 2,
    :func:`argument_error`) instead of the usage block and the error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {argument_error(self.prog, message)}", file=sys.stderr)
        raise SystemExit(2)


def path_arg(text: str) -> Path:
    """A path argument of a subcommand: an empty one would be the current folder (``qexp plot ""`` read
    the current folder and wrote ./plots), so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names nothing (write . for the current folder)")
    return Path(text)
