"""CurveZMQ for the engine's sockets: key pair files (private ones mode 0600), the client side
of a connection, and the broker's ZAP handler that admits only allowed keys and logs refusals.

Layout of a broker's key directory (``run.py keys DIR`` creates it)::

    DIR/broker.key, DIR/broker.key_secret     the broker's pair (clients need broker.key)
    DIR/clients/*.key                         public keys allowed on the client and stats sockets
    DIR/workers/*.key                         public keys allowed on the worker and stats sockets

A ``*.key_secret`` file is a private key: it stays on the host that uses it, mode 0600.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from engine.cli_base import UsageError

log = logging.getLogger(__name__)

ZAP_ADDR = "inproc://zeromq.zap.01"
DOMAINS = {"clients": ("clients",), "workers": ("workers",), "stats": ("clients", "workers")}
_LOG_EVERY_S = 10.0  # a refused key is logged at most this often (a peer retries every second)


class CurveError(UsageError, ValueError):
    """A key file that is missing or unreadable; the message names the file and the fix (a
    usage error: exit status 2)."""


def create_key_pair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (private, mode 0600) in ``directory``;
    refuses to overwrite an existing pair. Returns (public file, secret file)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public_file, secret_file):
        if path.exists():
            raise CurveError(f"{path} exists already: remove it first, or choose another name")
    public, secret = zmq.curve_keypair()
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    _write(public_file, _certificate(stamp, public, None), 0o644)
    _write(secret_file, _certificate(stamp, public, secret), 0o600)
    return public_file, secret_file


def _certificate(stamp: str, public: bytes, secret: bytes | None) -> str:
    """ZeroMQ's certificate format, the one zmq.auth.load_certificate reads."""
    kind = "Secret" if secret else "Public"
    lines = [
        f"#   ****  Generated on {stamp} by scls-engine  ****",
        f"#   ZeroMQ CURVE {kind} Certificate",
    ]
    if secret:
        lines.append("#   Private: keep this file on this host, mode 0600.")
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf8") as f:
        f.write(text)
    os.chmod(path, mode)  # O_CREAT's mode is reduced by the umask; this one is not


def load_pair(secret_file: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``*.key_secret`` file."""
    public, secret = _load(secret_file)
    if secret is None:
        raise CurveError(f"{secret_file} holds no secret key: pass the *.key_secret file")
    return public, secret


def load_public(public_file: str | os.PathLike[str]) -> bytes:
    return _load(public_file)[0]


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(
            f"cannot read the CURVE key file {path} ({exc}): create keys with `run.py keys DIR`"
        ) from None


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a peer (client or worker) needs to connect to a CURVE broker."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, secret_file: str | os.PathLike[str], server_key_file: str | os.PathLike[str]):
        if not str(server_key_file):
            raise CurveError(
                "--curve-key needs --broker-key too: pass the broker's public key file, "
                "--broker-key DIR/broker.key"
            )
        public, secret = load_pair(secret_file)
        return cls(public, secret, load_public(server_key_file))

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client; call before connect()."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public


class Authenticator(threading.Thread):
    """The broker's ZAP handler: a thread answering libzmq's authentication requests for the
    sockets made CURVE servers with ``serve_on``. Allow-lists are re-read when their directory
    changed, so adding or removing a key file needs no restart."""

    def __init__(self, ctx: zmq.Context, key_dir: str | os.PathLike[str]) -> None:
        super().__init__(name="zap", daemon=True)
        self.key_dir = Path(key_dir)
        self.public, self.secret = load_pair(self.key_dir / "broker.key_secret")
        self._ctx = zmq.Context.shadow(ctx.underlying)  # a sync view of the broker's context
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.bind(ZAP_ADDR)  # before any CURVE socket binds
        self._allowed: dict[str, set[bytes]] = {}
        self._loaded_stamp: tuple[int, ...] = ()
        self._logged: dict[tuple[str, bytes], float] = {}
        self._stopping = threading.Event()
        self.num_refused = 0
        self._reload()

    def serve_on(self, sock: zmq.Socket, domain: str) -> None:
        """Make ``sock`` a CURVE server whose peers are checked against ``domain``'s list."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = domain.encode()

    def _stamp(self) -> tuple[int, ...]:
        """Modification times of the allow-list directories (a new key file changes them)."""
        folders = (self.key_dir / "clients", self.key_dir / "workers")
        return tuple(f.stat().st_mtime_ns if f.is_dir() else 0 for f in folders)

    def _reload(self) -> None:
        self._loaded_stamp = self._stamp()
        for kind in ("clients", "workers"):
            folder = self.key_dir / kind
            keys = zmq.auth.load_certificates(folder) if folder.is_dir() else {}
            self._allowed[kind] = set(keys)

    def allows(self, domain: str, public_z85: bytes) -> bool:
        """Checked at every handshake; the lists are re-read when a directory changed, so a key
        file added or removed takes effect at the next connection (existing ones stay)."""
        if self._stamp() != self._loaded_stamp:
            self._reload()
        return any(public_z85 in self._allowed[k] for k in DOMAINS.get(domain, ()))

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._sock.poll(100):
                    self._answer(self._sock.recv_multipart())
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                log.exception("the CURVE authenticator failed: new connections will hang")
        finally:
            self._sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> None:
        if len(frames) < 9:
            log.error("dropped a ZAP request of %d frames (libzmq sends at least 9)", len(frames))
            return
        ident, _, version, request_id, domain, address, _, mechanism, *creds = frames
        name = domain.decode(errors="replace")
        key = z85.encode(creds[0]) if mechanism == b"CURVE" and creds else b""
        if key and self.allows(name, key):
            reply = [b"200", b"OK", key]
        else:
            self.num_refused += 1
            self._log_refusal(name, address.decode(errors="replace"), mechanism, key)
            reply = [b"400", b"key not allowed", b""]
        self._sock.send_multipart([ident, b"", version, request_id, *reply, b""])

    def _log_refusal(self, domain: str, address: str, mechanism: bytes, key: bytes) -> None:
        now = time.monotonic()
        if now - self._logged.get((domain, key), -_LOG_EVERY_S) < _LOG_EVERY_S:
            return
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged[(domain, key)] = now
        lists = " or ".join(str(self.key_dir / k) for k in DOMAINS.get(domain, ()))
        log.warning(
            "refused a %s connection on the %s socket from %s: public key %s is not allowed "
            "(to allow it, copy its .key file into %s)",
            mechanism.decode(errors="replace"), domain, address, key.decode() or "-", lists,
        )  # fmt: skip

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=2.0)
