"""CURVE on the daemon's ZeroMQ sockets, and counting of the peers they refuse.

With `security.curve_server_secret` set, every ingest socket and the results stream is a CURVE
server (whichever side binds): traffic is encrypted, and only clients whose public key is in
`security.curve_authorized_dir` get through. pyzmq's ZAP authenticator checks the keys, one
per ZMQ context. A monitor on each socket counts the peers refused during the handshake
(a key not authorised, no CURVE at all, not ZMTP) and the peers that went away after a
handshake (`ZMQ_MAXMSGSIZE` drops a peer that sends a part over `max_message_bytes`).
Producers and consumers use `curve_client` with their own key pair and the daemon's public key.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import uuid
from pathlib import Path
from typing import Iterable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from .config import Config, SecurityConfig
from .ingest import socket_endpoint

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def load_key_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file as `peaknet-keygen` writes it."""
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file, not the .key)")
    return public, secret


def load_public_key(path: str | os.PathLike) -> bytes:
    return zmq.auth.load_certificate(path)[0]


def curve_client(sock: zmq.Socket, client_secret_file: str | os.PathLike,
                 server_public_file: str | os.PathLike) -> None:
    """Make `sock` a CURVE client (before bind/connect): a producer or a results consumer."""
    public, secret = load_key_pair(client_secret_file)
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = load_public_key(server_public_file)


class SocketGuard:
    """CURVE for the sockets of one ZMQ context, and the counts of refused and dropped peers.

    `secure(sock)` before bind/connect; `close()` before the context is terminated."""

    def __init__(self, cfg: SecurityConfig, ctx: zmq.Context):
        self.curve = bool(cfg.curve_server_secret)
        self.ctx = ctx
        self.auth_failures = 0
        self._disconnected = 0
        self._lock = threading.Lock()
        self._monitors: list[zmq.Socket] = []
        self._stop = threading.Event()
        self._auth: ThreadAuthenticator | None = None
        if self.curve:
            if not cfg.curve_authorized_dir or not Path(cfg.curve_authorized_dir).is_dir():
                raise ValueError(f"security.curve_authorized_dir {cfg.curve_authorized_dir!r} is not a folder")
            self._public, self._secret = load_key_pair(cfg.curve_server_secret)
            self._auth = ThreadAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=cfg.curve_authorized_dir)
        self._thread = threading.Thread(target=self._watch, name="socket-guard", daemon=True)
        self._thread.start()

    @property
    def disconnects(self) -> int:
        """Peers gone after a completed handshake (libzmq reports a disconnect after every
        failed handshake too; those are auth_failures)."""
        with self._lock:
            return max(0, self._disconnected - self.auth_failures)

    def secure(self, sock: zmq.Socket) -> None:
        """CURVE server options (when configured) and a monitor; call before bind/connect."""
        if self.curve:
            sock.curve_publickey, sock.curve_secretkey = self._public, self._secret
            sock.curve_server = True
        monitor = sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED,
                                          addr=f"inproc://guard-{uuid.uuid4().hex}")
        with self._lock:
            self._monitors.append(monitor)

    def _watch(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                monitors = list(self._monitors)
            poller = zmq.Poller()
            for m in monitors:
                poller.register(m, zmq.POLLIN)
            for m, _ in poller.poll(100) if monitors else []:
                self._read(m)
            if not monitors:
                self._stop.wait(0.1)

    def _read(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            with self._lock:
                if event & HANDSHAKE_FAILED:
                    self.auth_failures += 1
                elif event == zmq.EVENT_DISCONNECTED:
                    self._disconnected += 1

    def close(self) -> None:
        """Stop watching and the authenticator; the context can then be terminated."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            monitors, self._monitors = self._monitors, []
        for m in monitors:
            self._read(m)  # events still queued (a refusal just before the stop) count too
            m.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


# ------------------------------------------------------------------------------------------------
# Start-up checks
# ------------------------------------------------------------------------------------------------

def _bound_host(endpoint: str) -> str | None:
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: reachable from the network


def exposure_warnings(cfg: Config) -> list[str]:
    """One line per socket the daemon binds on a non-loopback address without CURVE."""
    if cfg.security.curve_server_secret:
        return []
    bound: Iterable[str] = [socket_endpoint(s, 0) for s in cfg.ingest.sockets if s.mode == "bind"]
    if cfg.output.results_endpoint and cfg.output.results_bind:
        bound = [*bound, cfg.output.results_endpoint]
    out = []
    for endpoint in bound:
        host = _bound_host(endpoint)
        if host is not None and not is_loopback(host):
            out.append(f"{endpoint} is bound on a non-loopback address without CURVE: any host that "
                       f"reaches it can send frames or read results (set security.curve_server_secret)")
    return out


def keygen_main(argv: list[str] | None = None) -> int:
    """`peaknet-keygen DIR NAME`: a CURVE key pair, DIR/NAME.key (public, share it) and
    DIR/NAME.key_secret (keep it; mode 0600)."""
    import argparse

    p = argparse.ArgumentParser(prog="peaknet-keygen", description=keygen_main.__doc__.splitlines()[0])
    p.add_argument("dir", help="folder for the key files (created)")
    p.add_argument("name", help="file name stem, e.g. daemon or producer-epix")
    args = p.parse_args(argv)
    key_dir = Path(args.dir)
    key_dir.mkdir(parents=True, exist_ok=True)
    if (key_dir / f"{args.name}.key_secret").exists():
        print(f"peaknet-keygen: {key_dir / args.name}.key_secret exists; not overwritten")
        return 1
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(key_dir, args.name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0
