"""What every lorakit command shares: exit statuses, help layout, and a quiet exit when stdout's reader
goes away (`lorakit inspect DIR | head -1`).

Exit statuses (listed in every --help):
    0    success
    2    usage or input error, as argparse uses it: one line on stderr, no traceback
    1    an unexpected failure: a bug in lorakit, whose traceback is kept
    130  interrupted (Ctrl-C)
    141  stdout closed early (128 + SIGPIPE, what a shell reports for a process a pipe killed)
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import sys
from collections.abc import Callable

from lorakit.errors import LorakitError

EXIT_USAGE = 2
# What the machine refused, not a bug: a full disk or quota, no permission, a read-only file system.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG})
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

EXIT_STATUS_EPILOG = """\
exit status:
  0    success
  2    usage or input error (bad or missing flag, missing file or model, an adapter that does not
       fit the base...), or a write the machine refused (disk full, no permission): one line on stderr
  1    unexpected failure, i.e. a bug in lorakit (the traceback is printed)
  130  interrupted (Ctrl-C)
  141  stdout was closed early (e.g. piped into `head`): output stops quietly"""

NO_STRICT_HELP = ("load an adapter that only partly fits the base: skip its modules the base lacks and warn, "
                  "instead of failing, when its LoRA-XS / VeRA basis fingerprints differ (e.g. a quantized base)")


class UsageError(LorakitError, ValueError):
    """A command-line argument is missing or malformed, names nothing that exists, or would overwrite files."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and appends "(default: X)" to options whose default says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.nargs == 0 or action.default in (None, False, [], argparse.SUPPRESS)  # nargs 0: a switch
        if "%(default)" in text or quiet or not action.option_strings or text == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts, lengths), refused with the value it got."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 often meaning "the default")."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def run_command(command: Callable[[], int], prog: str) -> int:
    """Run one command and turn the ways it can end into an exit status (see the module docstring).

    argparse's SystemExit (--help, usage errors) passes through, after its buffered text is flushed.
    """
    try:
        status = command()
        sys.stdout.flush()  # a closed pipe shows up here for output still in the buffer
        return status
    except BrokenPipeError:
        if not stdout_closed():
            raise  # a pipe of the command's own (a socket, a subprocess) broke: not ours to hide
        return silence_stdout()
    except LorakitError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"{prog}: error: {where}{err.strerror or err} (errno {err.errno})", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except SystemExit:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return silence_stdout()
        raise


def stdout_closed() -> bool:
    """True when stdout is a pipe whose reading end is closed (poll reports an error on the writing end)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError):  # replaced stdout (tests), or no poll() on this platform
        return True
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def silence_stdout() -> int:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise again; returns 141."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE
