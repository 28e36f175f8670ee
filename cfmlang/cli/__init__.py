"""`cfmc`: the command line. Thin: every command calls the public API.

Exit codes: 0 ok, 1 user error (diagnostics printed, argparse's refusals included), 2
internal error, 130 interrupted, 128+N terminated by signal N (SIGTERM, SIGHUP), 141 when
stdout's reader closed the pipe. The parser is in parser.py, the commands in commands.py,
progress display in progress.py; third-party warnings and bars are shown only with
`--verbose` (quiet.py). Every command but `lsp` runs under a heartbeat (`args.heartbeat`):
with stderr not a terminal, a line at least every 10 s (CFM_HEARTBEAT_SECONDS) while it
works, unless `--quiet`.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import sys
import traceback

from cfmlang.artifact.write import InterruptedAfterWrite, Terminated, terminations_raised
from cfmlang.cli.commands import EXIT_INTERNAL, EXIT_USER, report
from cfmlang.cli.parser import UsageError, build_parser
from cfmlang.cli.progress import Heartbeat
from cfmlang.cli.quiet import third_party_output
from cfmlang.diagnostics import CompileError, error

__all__ = ["main", "build_parser"]


EXIT_BROKEN_PIPE = 128 + 13
"""The reader of stdout went away (`cfmc check --format json | head`): what a program
killed by SIGPIPE returns, and nothing more is printed."""


def main(argv: list[str] | None = None) -> int:
    try:
        code = run_command(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # stdout points at nothing from here on, so that exit's flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def run_command(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        report([error("E215", exc.message, None, " ".join(exc.usage.split()))], None)
        return EXIT_USER
    try:
        beating = not getattr(args, "quiet", False) and args.command != "lsp"
        with terminations_raised(), third_party_output(getattr(args, "verbose", False)), \
                Heartbeat(enabled=beating) as args.heartbeat:
            return args.run(args)
    except CompileError as exc:
        report(exc.diagnostics, args)
        return EXIT_USER
    except InterruptedAfterWrite as exc:
        print(f"interrupted after {exc.target} was written in full", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"terminated ({exc}); nothing was written", file=sys.stderr)
        return 128 + exc.number
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except OSError as exc:
        if exc.errno not in PATH_ERRORS:
            return internal_error(exc, args)
        report([error("E216", f"cannot use {exc.filename}: {exc.strerror}", None,
                      "shorten the path (a name may hold 255 bytes), or fix its permissions")], args)
        return EXIT_USER
    except ModuleNotFoundError as exc:
        if not is_dependency(exc.name):
            return internal_error(exc, args)
        report([missing_package(exc.name)], args)
        return EXIT_USER
    except Exception as exc:  # an internal error: never show a traceback by default
        return internal_error(exc, args)


PATH_ERRORS = (errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ELOOP)
"""Errors of a path the user gave (too long, not permitted, a link loop), wherever found."""


DISTRIBUTIONS = {"yaml": "pyyaml", "torch_tensorrt": "torch-tensorrt"}
"""Import names whose pip distribution is spelled otherwise."""


def is_dependency(module: str | None) -> bool:
    """Whether a module that failed to import belongs to another project that is not
    installed (not cfmlang's own, nor a submodule an installed package lacks: those are
    a broken install or a bug)."""
    top = (module or "").partition(".")[0]
    if not top or top == "cfmlang":
        return False
    try:
        return importlib.util.find_spec(top) is None
    except ValueError:          # its sys.modules entry is None: imports of it are refused
        return True


def missing_package(module: str):
    """E217: a package a command needs is not installed, with the pip command."""
    top = module.partition(".")[0]
    distribution = DISTRIBUTIONS.get(top, top.replace("_", "-"))
    return error("E217", f"the Python package `{top}` is not installed, and this command needs it", None,
                 f"install it: `pip install {distribution}` (a plain `pip install cfmlang` brings every package "
                 "the language needs; extras add optional ones)")


def internal_error(exc: Exception, args) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    else:
        print(f"internal error: {type(exc).__name__}: {exc}\n"
              "This is a bug in cfmlang. Please report it with the command you ran; "
              "rerun with --debug for the traceback.", file=sys.stderr)
    return EXIT_INTERNAL
