"""ZeroMQ addresses as users type them: ``HOST:PORT`` or ``tcp://HOST:PORT`` to connect, ``HOST``
(optionally with a port) to bind; anything else is refused with the right form shown. Pure."""

from __future__ import annotations

import re
import socket

MAX_PORT = 65535
_HOST = re.compile(r"\*|[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\]")
_OTHER_TRANSPORTS = ("ipc://", "inproc://")


class AddressError(ValueError):
    """An address in a form ZeroMQ cannot use; the message shows the form to use."""


def _split(text: str) -> tuple[str, str | None]:
    """(host, port text or None) of ``[tcp://]HOST[:PORT]``; raises AddressError."""
    rest = text.strip()
    if rest.lower().startswith("tcp://"):
        rest = rest[len("tcp://") :]
    if "://" in rest or "/" in rest or not rest:
        raise AddressError(text)
    if rest.startswith("["):  # [IPv6]:PORT
        host, _, tail = rest.partition("]")
        host += "]"
        if tail and not tail.startswith(":"):
            raise AddressError(text)
        port = tail[1:] if tail else None
    elif rest.count(":") > 1:
        raise AddressError(text)  # a bare IPv6 address is ambiguous: it needs brackets
    else:
        host, sep, port_text = rest.partition(":")
        port = port_text if sep else None
    if not _HOST.fullmatch(host):
        raise AddressError(text)
    return host, port


def _port(text: str, original: str, allow_any: bool) -> str:
    if allow_any and text == "*":
        return text
    if not text.isdigit() or not 1 <= int(text) <= MAX_PORT:
        raise AddressError(original)
    return str(int(text))


def connect_address(text: str, example: str = "tcp://127.0.0.1:5555") -> str:
    """``HOST:PORT`` or ``tcp://HOST:PORT`` as ``tcp://HOST:PORT`` (``ipc://`` and ``inproc://``
    pass unchanged). Raises AddressError showing ``example``."""
    if text.strip().lower().startswith(_OTHER_TRANSPORTS):
        return text.strip()
    try:
        host, port = _split(text)
        if port is None or host == "*":
            raise AddressError(text)
        return f"tcp://{host}:{_port(port, text, allow_any=False)}"
    except AddressError:
        raise AddressError(
            f"{text!r} is not an address to connect to: use HOST:PORT or tcp://HOST:PORT, "
            f"e.g. {example}"
        ) from None


def bind_address(text: str, example: str = "tcp://127.0.0.1:*") -> str:
    """``HOST:PORT`` or ``tcp://HOST:PORT`` (PORT may be ``*``: any free port) as ``tcp://...``."""
    if text.strip().lower().startswith(_OTHER_TRANSPORTS):
        return text.strip()
    try:
        host, port = _split(text)
        if port is None:
            raise AddressError(text)
        return f"tcp://{host}:{_port(port, text, allow_any=True)}"
    except AddressError:
        raise AddressError(
            f"{text!r} is not an address to bind: use HOST:PORT or tcp://HOST:PORT (PORT * for "
            f"any free port), e.g. {example}"
        ) from None


def bind_host(text: str) -> tuple[str, int | None]:
    """An interface to bind, ``HOST`` or ``tcp://HOST``, with an optional ``:PORT``: (host, port
    or None). ``*`` and ``0.0.0.0`` mean every interface."""
    try:
        host, port = _split(text)
        return host, None if port is None else int(_port(port, text, allow_any=False))
    except AddressError:
        raise AddressError(
            f"{text!r} is not an interface to bind: use a host name or IP address such as "
            "127.0.0.1 (this machine only) or 0.0.0.0 (every interface), optionally with :PORT"
        ) from None


def tcp_host_port(addr: str) -> tuple[str, int] | None:
    """(host, port) of ``tcp://HOST:PORT``; None for another transport or port ``*``."""
    match = re.fullmatch(r"tcp://(.+):(\d+)", addr)
    return None if match is None else (match.group(1), int(match.group(2)))


def with_port_offset(addr: str, offset: int) -> str | None:
    """``tcp://HOST:PORT`` -> ``tcp://HOST:PORT+offset`` (the broker's layout), or None."""
    found = tcp_host_port(addr)
    if found is None or not 1 <= found[1] + offset <= MAX_PORT:
        return None
    return f"tcp://{found[0]}:{found[1] + offset}"


def port_taken(addr: str) -> str | None:
    """Why ``addr`` (``tcp://HOST:PORT``) cannot be bound now, or None when it looks free or
    cannot be checked. A quick probe before slow start-up work, not a reservation: ZeroMQ's own
    bind stays the authority. SO_REUSEADDR as libzmq sets it, so TIME_WAIT is not "taken"."""
    found = tcp_host_port(addr)
    if found is None:
        return None
    host, port = found
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("" if host in ("*", "0.0.0.0") else host, port))
        except socket.gaierror:
            return None  # a name ZeroMQ resolves its own way (an interface name): let it try
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
