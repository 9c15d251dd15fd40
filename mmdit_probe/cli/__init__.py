"""``mmdit-probe`` command line: ``demo``, ``record``, ``plot``, ``show``, ``sweep``, ``describe``, the
shapes scripts (+ registered extras). The library never imports this package.

Extra subcommands are registered with :func:`register_subcommand` before :func:`main` runs::

    from mmdit_probe.cli import register_subcommand
    register_subcommand("hello", add_arguments=lambda p: p.add_argument("name", help="who"),
                        run=lambda args: print(args.name) or 0, help="say hello")

``run(args)`` returns the exit code (None = 0); raising :class:`CLIError` (or another user error,
see :func:`user_errors`) prints ``error: ...`` and exits with code 2, without a traceback. Any other
exception prints one ``internal error`` line and exits with 1; warnings print as one ``warning:`` line.
``mmdit-probe --debug <command> ...`` (or ``--debug`` after the command) shows tracebacks and warnings as
Python prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Any, Callable, Iterator, Sequence

from .. import MapBudgetError, ResultsFileError, __version__
from . import commands, describe, explore, shapes, study, sweep
from .common import PROG, CLIError, HelpFormatter, Subcommand

__all__ = ["main", "build_parser", "register_subcommand", "SUBCOMMANDS", "Subcommand", "CLIError", "PROG"]

#: name -> Subcommand, in the order shown by ``--help``.
SUBCOMMANDS: dict[str, Subcommand] = {**commands.COMMANDS, **sweep.COMMANDS, **describe.COMMANDS, **explore.COMMANDS,
                                       **study.COMMANDS, **shapes.COMMANDS}


def register_subcommand(name: str, add_arguments: Callable[[argparse.ArgumentParser], Any],
                        run: Callable[[argparse.Namespace], int | None], help: str = "",
                        description: str | None = None, *, replace: bool = False) -> None:
    """Add ``mmdit-probe <name>``; ``replace=True`` overrides an existing one."""
    if name in SUBCOMMANDS and not replace:
        raise ValueError(f"subcommand {name!r} is already registered (pass replace=True to override)")
    SUBCOMMANDS[name] = Subcommand(add_arguments, run, help, description)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions reported as ``error: <message>`` (exit code 2) instead of a traceback."""
    from ..models import WeightsNotAvailableError  # heavy (diffusers pipelines): only once an error is raised

    return (CLIError, OSError, ResultsFileError, WeightsNotAvailableError, MapBudgetError, KeyError, ValueError)


DEBUG_HELP = "show Python tracebacks and warnings instead of one-line messages (for bug reports)"


def build_parser() -> argparse.ArgumentParser:
    """The full parser (built-in and registered subcommands)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mechanistic interpretability for MMDiT diffusion transformers (SD3 / SD3.5, Flux.1, Chroma, Qwen-Image, Flux.2): record exact "
                    "per-head joint attention, plot quadrant maps and word heatmaps, run ablation sweeps.",
        epilog=f"Run `{PROG} <command> --help` for the options of each command. Start with `{PROG} demo`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subs = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, sub in SUBCOMMANDS.items():
        p = subs.add_parser(name, help=sub.help, description=sub.description or sub.help,
                            formatter_class=HelpFormatter)
        sub.add_arguments(p)
        if not any("--debug" in a.option_strings for a in p._actions):
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        p.set_defaults(_run=sub.run)
    return parser


def _exit_code(exit_: SystemExit) -> int:
    return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2


@contextlib.contextmanager
def _one_line_warnings(command: str, debug: bool) -> Iterator[None]:
    """Warnings as ``mmdit-probe <command>: warning: <message>`` (as Python prints them with ``debug``)."""
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = lambda message, *a, **k: print(f"{PROG} {command}: warning: {message}",
                                                                  file=sys.stderr)
        yield


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        with _one_line_warnings(args.command, debug):
            return int(args._run(args) or 0)
    except SystemExit as exit_:  # a forwarded script's argparse (--help: 0, bad options: 2)
        return _exit_code(exit_)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as err:
        if debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not a user mistake: one line, the traceback with --debug
        if debug:
            raise
        text = " ".join(str(err).split()) or "(no message)"
        print(f"{PROG} {args.command}: error: internal error ({type(err).__name__}: {text}); rerun with --debug for "
              f"the traceback and report it", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmdit-probe``; returns the exit code (0 ok, 1 internal error, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    parser = build_parser()
    try:
        if argv and argv[0] in shapes.DELEGATED:  # options are the shapes script's own (its --help lists them)
            args = argparse.Namespace(command=argv[0], _run=lambda a: shapes.run_delegated(argv[0], argv[1:]))
        else:
            args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help / --version (0) and argparse errors (2)
        return _exit_code(exit_)
    return _run(args, debug or bool(getattr(args, "debug", False)))


def __getattr__(name: str) -> Any:
    """``mmdit_probe.cli.default_pipeline`` / ``default_run_kwargs``: old location, kept for existing code;
    use ``mmdit_probe.default_pipeline`` (they live in :mod:`mmdit_probe.shapes.model`)."""
    if name in ("default_pipeline", "default_run_kwargs"):
        from .. import shapes  # diffusers pipelines: heavy, so only on request

        return getattr(shapes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
