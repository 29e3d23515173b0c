"""The command line's one error path: every mistake is one line on stderr and a documented exit
status, never a traceback (unless --log-level DEBUG); and the parser that shows defaults.

Exit statuses (README, "Exit status"):
  0    done
  1    failed while running: a request refused or failed, no broker answered, a port taken,
       a model that would not load, a worker that exited
  2    usage: a flag, address, file or configuration to change (argparse's status)
  130  interrupted (Ctrl-C), as shells report it
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger(__name__)


class CommandError(Exception):
    """A failure the user can act on; its message is the whole line printed after "error: "."""

    status = EXIT_FAILED


class UsageError(CommandError):
    """Something on the command line to change (a flag value, a file, an address)."""

    status = EXIT_USAGE


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default after its help (not None, False, "", a suppressed one, one
    the help already states, nor that of an on/off flag: its help says what it does)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "(default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default in ("", [], argparse.SUPPRESS)
            or isinstance(action, argparse._VersionAction | argparse._StoreConstAction)
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})".strip()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: --port must be in 0..65535, got 70000``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.help_prog: str | None = None  # the command whose --help an error points to

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, except that an unknown argument after a command points to that
        command's --help (argparse reports it from the top parser)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            self.help_prog = f"{self.prog} {command}" if command else None
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        line = rephrase(message)
        if "COMMAND" in message:  # none given, or an unknown one
            line = f"choose a command: {', '.join(self._commands())}"
            if "invalid choice" in message:
                line = f"unknown command {message.split(':', 2)[2].split('(')[0].strip()}; {line}"
        elif "required" in message or "unrecognized" in message or "invalid choice" in message:
            line += f" (`{self.help_prog or self.prog} --help` lists them)"
        print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    def _commands(self) -> list[str]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return list(action.choices)
        return []


def rephrase(message: str) -> str:
    """argparse's "argument --port/-p: must be ..." as "--port must be ..."."""
    match = re.fullmatch(r"argument ([^:]+): (.*)", message, flags=re.S)
    if match is None:
        return message.replace("\n", " ")
    flag, text = match.group(1).split("/")[-1], match.group(2).replace("\n", " ")
    return (
        f"{flag}: {text}"
        if text.startswith(("invalid", "expected", "ignored"))
        else f"{flag} {text}"
    )


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand and turn whatever it raises into one line and an exit status."""
    from engine.models import ModelNotFoundError  # path logic only: no torch, no transformers

    debug = getattr(args, "log_level", "INFO") == "DEBUG"
    try:
        return func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, CommandError):
            status, line = exc.status, str(exc)
        elif isinstance(exc, ModelNotFoundError):
            status, line = EXIT_USAGE, str(exc)
        else:
            status, line = (
                EXIT_FAILED,
                f"{exc or type(exc).__name__} (`--log-level DEBUG` shows where)",
            )
        print(f"error: {line}", file=sys.stderr)
        return status


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def port(text: str) -> int:
    """0..65535 (0: any free port)."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def at_least_one(text: str) -> float:
    """A factor of 1 or more (a slowdown)."""
    value = _float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def probability(text: str) -> float:
    """(0, 1]: nucleus sampling's top_p."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def seed(text: str) -> int:
    value = non_negative_int(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def utf8_text(text: str) -> str:
    """A command-line string as the engine will send it: undecodable bytes (which Python keeps
    as surrogates) are refused here instead of failing in the msgpack encoder."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise argparse.ArgumentTypeError(
            f"is not valid UTF-8 text (byte {ord(text[exc.start]) & 0xFF:#04x} at character "
            f"{exc.start}): fix the terminal's or the file's encoding"
        ) from None
    return text
