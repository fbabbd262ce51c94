"""``qexp``: dispatch to subcommands. ``train`` hands its arguments to Hydra untouched."""

from __future__ import annotations

import importlib
import sys

# name -> (module with a ``main(argv) -> int``, one-line help). ``train`` is Hydra's and takes overrides.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("qexp.run.train", "train/evaluate/log one config or a --multirun grid (Hydra overrides)"),
    "eval": ("qexp.run.evaluate", "re-evaluate a run folder (post-hoc analyses: --integer, --ptq-bits)"),
    "table": ("qexp.report.table", "paper-style table of the runs below DIR (mean ± std over seeds; md/latex/csv)"),
    "plot": ("qexp.report.plot", "PNG plots of the runs below DIR: error curves, bit allocations, PTQ accuracy"),
    "export": ("qexp.run.export", "the quantized model as integer codes + per-layer scales, loadable without qexp"),
    "runs": ("qexp.report.runs", "one line per run below DIR: status, method, bits, seed, epochs, error, time"),
}

USAGE = """usage: qexp COMMAND [ARGS]

Quantized-training experiments: compose dataset x model x method x bits, train, tabulate.

commands:
{commands}

`qexp COMMAND --help` explains each one; `qexp train --help` lists the config groups;
`qexp --version` prints the installed version.
"""


def version() -> str:
    """The installed distribution's version (the package's own when run from a plain checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("qexp")
    except PackageNotFoundError:
        from qexp import __version__

        return __version__


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = "\n".join(f"  {c.ljust(width)}  {h}" for c, (_, h) in COMMANDS.items())
    return USAGE.format(commands=lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command; Ctrl-C before a command takes it over (importing, composing) exits 130 quietly."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"qexp {version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-sc", "--shell-completion") or (cmd == "train" and rest[:1] in (["-sc"], ["--shell-completion"])):
        return _completion(argv[1:] if cmd == "train" else argv)
    if cmd not in COMMANDS:
        print(f"error: qexp: unknown command {cmd!r}; the commands are {', '.join(COMMANDS)} (qexp --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    if cmd == "train":
        sys.argv = ["qexp train", *rest]
        module.main()
        return 0
    from qexp.errors import QexpError

    try:
        return int(module.main(rest) or 0)
    except QexpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:  # a file or folder this user may not read or write: theirs to fix, not a bug
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


def _completion(args: list[str]) -> int:
    """Tab completion: ``eval "$(qexp -sc install=bash)"``.

    Hydra's script calls ``qexp -sc query=bash`` with the typed line in COMP_LINE. The first word after
    ``qexp`` completes to a command; after ``train``, Hydra completes the overrides (the ``train`` word
    removed from the line so that it sees only overrides; config folders that are data for other
    commands, such as ``reference/``, left out); after the other commands, paths (their run folders).
    """
    import contextlib
    import io
    import os

    from qexp.run.config import INTERNAL_GROUPS
    from qexp.run.train import main as train_main

    line = os.environ.get("COMP_LINE")
    if line is not None and "query=bash" in args:
        point = int(os.environ.get("COMP_POINT", len(line)))
        words = line[:point].split(" ")
        if len(words) <= 2:  # the command itself
            print(" ".join(c for c in COMMANDS if c.startswith(words[-1])))
            return 0
        if words[1] != "train":  # a run folder or an output file
            print(" ".join(_paths(words[-1])))
            return 0
        os.environ["COMP_LINE"] = " ".join(words[:1] + words[2:])
        os.environ["COMP_POINT"] = str(max(0, point - len(" train")))
    sys.argv = ["qexp", *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_main()
    hidden = tuple(f"{g}{c}" for g in INTERNAL_GROUPS for c in "=.")
    print(" ".join(w for w in out.getvalue().split() if not w.lstrip("+~").startswith(hidden))
          if line is not None else out.getvalue(), end="" if line is None else "\n")
    return 0


def _paths(prefix: str) -> list[str]:
    """Files and folders starting with ``prefix`` (folders with a trailing ``/``; hidden ones only when
    the prefix starts with a dot, glob's rule)."""
    import glob
    import os

    return sorted(p + "/" if os.path.isdir(p) else p for p in glob.glob(glob.escape(prefix) + "*"))


if __name__ == "__main__":
    sys.exit(main())
