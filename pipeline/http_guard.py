"""The guarded HTTP client's sockets (pipeline/fetch.py): a wall-clock `Deadline` that shuts a
socket down when it expires, and connections that resolve a host once, refuse blocked
addresses (docs/untrusted.md) and connect only to the address that was checked.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from functools import lru_cache

from core.shard_format import SampleError
from pipeline.untrusted import AddressPolicy, blocked_message


class Deadline:
    """One attempt's time budget. At expiry a watchdog shuts the current socket down, which ends
    any blocked connect/recv at once: a per-read timeout alone lets a dripping body run forever."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0 or self.expired:
            raise TimeoutError(f"over {self.seconds:g}s")
        return left

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                self._shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                self._shutdown(self._sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:  # the plain-socket shutdown: also unblocks an SSL read without touching its state
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


class GuardedConnector:
    """Resolves a host, refuses blocked addresses, connects to an allowed one (and re-checks the
    peer). One resolution per hop, and the socket goes to the address that was checked."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy

    def connect(self, host: str, port: int, deadline: Deadline, shown: str) -> socket.socket:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConnectionError(f"cannot resolve {host}: {exc.strerror}") from None
        refused, last_error = None, None
        for family, kind, proto, _, sockaddr in infos:
            network = self.policy.blocked_by(sockaddr[0])
            if network is not None:
                refused = refused or (sockaddr[0], network)
                continue
            sock = socket.socket(family, kind, proto)
            try:
                deadline.watch(sock)
                sock.settimeout(deadline.remaining())
                sock.connect(sockaddr)
                peer = sock.getpeername()[0]
                network = self.policy.blocked_by(peer)
                if network is not None:
                    raise SampleError("blocked_address", blocked_message(shown, host, peer, network))
                return sock
            except (OSError, SampleError) as exc:
                sock.close()
                if isinstance(exc, SampleError) or deadline.expired:
                    raise
                last_error = exc
        if refused is not None and last_error is None:
            raise SampleError("blocked_address", blocked_message(shown, host, *refused))
        raise last_error or ConnectionError(f"{host} has no address")


class GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int | None, connector: GuardedConnector, deadline, shown: str):
        super().__init__(host, port, timeout=deadline.seconds)
        self.connector, self.deadline, self.shown = connector, deadline, shown

    def connect(self) -> None:
        self.sock = self.connector.connect(self.host, self.port, self.deadline, self.shown)


@lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """One verifying context per process (loading the CA store for every download costs ms)."""
    return ssl.create_default_context()


class GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int | None, connector: GuardedConnector, deadline, shown: str):
        super().__init__(host, port, timeout=deadline.seconds, context=tls_context())
        self.connector, self.deadline, self.shown = connector, deadline, shown

    def connect(self) -> None:
        sock = self.connector.connect(self.host, self.port, self.deadline, self.shown)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        self.deadline.watch(self.sock)
