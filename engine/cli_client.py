"""`run.py generate` and `run.py chat`: prompts from the command line, stdin (``-``) or a file
(``@FILE``), sent through the client library; the client's errors said in the CLI's words."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine import cli_args
from engine.cli_base import (
    CommandError,
    UsageError,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed,
    utf8_text,
)
from engine.protocol import DEFAULT_MAX_TOKENS

DEFAULT_CONNECT = "tcp://127.0.0.1:5555"


def add_request_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `generate` and `chat`: where the broker is, sampling, limits."""
    p.add_argument(
        "--connect",
        type=cli_args.connect_arg(DEFAULT_CONNECT),
        default=DEFAULT_CONNECT,
        help="the broker's client address, HOST:PORT or tcp://HOST:PORT",
    )
    p.add_argument(
        "--system", type=utf8_text, default=None, help="a system message before the prompt"
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS,
        help="most tokens to generate",
    )
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling, in (0, 1]")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 disables it")
    p.add_argument(
        "--seed",
        type=seed,
        default=None,
        help="sampling seed, for reproducible sampling (default: none, a fresh draw each time)",
    )
    p.add_argument("--stop", type=_stop_string, action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate until --max-tokens")
    p.add_argument(
        "--timeout", type=positive_float, default=300.0, help="seconds for a whole answer"
    )
    p.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=5.0,
        help="seconds to wait for the broker to accept a request",
    )
    p.add_argument(
        "--resume-timeout",
        type=non_negative_float,
        default=30.0,
        help="seconds to wait for a broker that went away: the request then continues where "
        "it was (0: fail at once)",
    )
    cli_args.add_curve_client_flags(p)  # fmt: skip


def _stop_string(text: str) -> str:
    text = utf8_text(text)
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def read_prompt(text: str) -> str:
    """The prompt argument: ``-`` reads stdin, ``@FILE`` reads a file, anything else is the
    prompt itself. A single trailing newline (what ``echo`` and editors add) is dropped."""
    if text == "-":
        data, where = sys.stdin.buffer.read(), "stdin"
    elif text.startswith("@") and len(text) > 1:
        path = Path(text[1:]).expanduser()
        try:
            data, where = path.read_bytes(), str(path)
        except OSError as exc:
            raise UsageError(
                f"cannot read the prompt file {str(path)!r} ({exc.strerror}): pass an existing "
                "file after @, or pipe the prompt on stdin with -"
            ) from None
    else:
        prompt = _utf8(text, "the prompt")
        if not prompt.strip():
            raise UsageError("the prompt is empty: give some text, - for stdin or @FILE")
        return prompt
    try:
        prompt = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"the prompt from {where} is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
            f"{exc.start}): convert it, e.g. with iconv -t UTF-8"
        ) from None
    prompt = prompt[:-1] if prompt.endswith("\n") else prompt
    if not prompt.strip():
        raise UsageError(f"the prompt from {where} is empty")
    return prompt


def _utf8(text: str, what: str) -> str:
    try:
        return utf8_text(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{what} {exc}") from None


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or (),
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
    )


@contextmanager
def connected(args: argparse.Namespace) -> Iterator[Any]:
    """A Client on ``--connect``; the client's errors raised again as CommandError in the
    words of the command line (its flags, not the library's parameters)."""
    from engine.client import Client, Disconnected, RequestRejected, RequestTimeout

    curve = None
    if args.curve_key:
        from engine.curve import ClientKeys

        curve = ClientKeys.load(args.curve_key, args.broker_key or "")
    client = Client(
        args.connect,
        curve=curve,
        connect_timeout_s=args.connect_timeout,
        resume_timeout_s=args.resume_timeout or None,
    )
    try:
        yield client
    except RequestTimeout as exc:
        raise CommandError(_timeout_line(client, args, exc.num_received_tokens)) from None
    except Disconnected as exc:
        raise CommandError(_disconnected_line(args, exc.reason)) from None
    except RequestRejected as exc:
        raise CommandError(f"request rejected ({exc.code}): {exc.message}") from None
    finally:
        client.close()


def _timeout_line(client: Any, args: argparse.Namespace, num_tokens: int) -> str:
    line = (
        f"no whole answer within --timeout {args.timeout:g} s ({num_tokens} tokens received); "
        "the request was cancelled"
    )
    try:
        no_worker = client.stats(timeout_s=2.0).num_workers == 0
    except Exception:  # the answer is only a better hint
        no_worker = False
    if no_worker:
        return (
            f"{line}: the broker has no worker; start one (`run.py worker --connect HOST:PORT+1`)"
        )
    return f"{line}: pass a larger --timeout, or a smaller --max-tokens"


def _disconnected_line(args: argparse.Namespace, reason: str) -> str:
    addr, wait = args.connect, f"--connect-timeout {args.connect_timeout:g} s"
    if reason == "no_answer":
        return (
            f"the peer at {addr} accepted the connection but answered nothing within {wait}: "
            "is it the broker's client port (PORT, default 5555), not its workers' (PORT+1) or "
            "stats (PORT+2)?"
        )
    if reason == "lost":
        waited = f" and it did not come back within --resume-timeout {args.resume_timeout:g} s"
        return (
            f"lost the connection to the broker at {addr} during the request"
            f"{waited if args.resume_timeout else ''}: send it again once the broker is back"
        )
    if reason == "diverged":
        return (
            f"the broker at {addr} came back without the request and generated it again "
            "differently: send it again"
        )
    return (
        f"no broker answered at {addr} within {wait}: start one with `run.py serve`, or pass "
        "its client address with --connect"
    )


def _messages(args: argparse.Namespace, history: list[dict[str, str]]) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + history


def run_generate(args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        raise UsageError("--system needs the chat template: leave out --raw")
    text = read_prompt(args.prompt)
    prompt = (
        {"messages": _messages(args, [{"role": "user", "content": text}])}
        if args.chat
        else {"prompt": text}
    )
    with connected(args) as client:
        if args.stream:
            stream = client.stream(**prompt, **sampling(args))
            try:
                for delta in stream:
                    print(delta.text, end="", flush=True)
            finally:
                stream.close()  # Ctrl-C: cancel on the engine before leaving
            print()
            result = stream.result
        else:
            result = client.generate(**prompt, **sampling(args))
            print(result.text, flush=True)
    print(summary(result), file=sys.stderr)
    return 0


def summary(result: Any) -> str:
    u, t = result.usage, result.timings
    ttft = f"{t.first_token_s * 1000:.0f} ms" if t.first_token_s is not None else "n/a"
    return (
        f"[{result.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} completion "
        f"tokens; first token {ttft}; total {t.finished_s:.2f} s; {result.num_slices} slice(s)]"
    )


CHAT_HELP = "/reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C stops an answer"


def run_chat(args: argparse.Namespace) -> int:
    """A conversation: each line read is a user turn, answered in a stream; the history (and
    --system) goes with every turn. On a terminal a refused turn is reported and forgotten;
    from a pipe it ends the session with its status."""
    from engine.client import RequestRejected

    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"chat with {args.connect}: {CHAT_HELP}", file=sys.stderr)
    history: list[dict[str, str]] = []
    with connected(args) as client:
        while (line := _read_turn(interactive)) is not None:
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history.clear()
                print("(conversation forgotten)", file=sys.stderr)
                continue
            if not text:
                continue
            history.append({"role": "user", "content": _utf8(line, "the message")})
            try:
                answer = _answer(client, args, history, interactive)
            except KeyboardInterrupt:
                history.pop()
                print("\n(answer stopped; that turn is forgotten)", file=sys.stderr)
                continue
            except RequestRejected as exc:
                history.pop()
                if not interactive:
                    raise
                hint = ": /reset to start over" if exc.code == "prompt_too_long" else ""
                print(f"error: {exc.message}{hint}", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": answer})
    return 0


def _read_turn(interactive: bool) -> str | None:
    try:
        return input("you> " if interactive else "")
    except EOFError:
        if interactive:
            print(file=sys.stderr)
        return None
    except KeyboardInterrupt:  # Ctrl-C at the prompt leaves, as in a shell
        print(file=sys.stderr)
        return None


def _answer(client: Any, args: argparse.Namespace, history: list, interactive: bool) -> str:
    stream = client.stream(messages=_messages(args, history), **sampling(args))
    if interactive:
        print("model> ", end="", flush=True)
    try:
        for delta in stream:
            print(delta.text, end="", flush=True)
    finally:
        stream.close()
    print(flush=True)
    return stream.result.text if stream.result is not None else stream.text
