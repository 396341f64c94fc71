"""Message framing between the worker and its decoder child: a JSON header plus raw bytes.

Frame = `!IQ` (header length, payload length) + UTF-8 JSON header + payload. Payloads are
received with `socket.recv_into` straight into the destination numpy buffer: one copy, no
pickles, and the GIL is released while waiting. (multiprocessing's Connection re-buffers
every message through BytesIO: twice the copies for 20 MB of frames.)
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

_PREFIX = struct.Struct("!IQ")


def send(sock: socket.socket, header: dict[str, Any], payload=None) -> None:
    body = json.dumps(header).encode("utf-8")
    view = memoryview(payload).cast("B") if payload is not None else b""
    sock.sendall(_PREFIX.pack(len(body), len(view)) + body)
    if len(view):
        sock.sendall(view)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise EOFError("peer closed the connection")
        got += n


def recv_header(sock: socket.socket) -> tuple[dict[str, Any], int]:
    """(header, payload length); the caller must then read the payload with `recv_payload`."""
    prefix = bytearray(_PREFIX.size)
    _recv_exact(sock, memoryview(prefix))
    n_head, n_payload = _PREFIX.unpack(prefix)
    body = bytearray(n_head)
    _recv_exact(sock, memoryview(body))
    return json.loads(body), n_payload


def recv_payload(sock: socket.socket, out) -> None:
    """Fill the writable, C-contiguous buffer `out` (bytearray or numpy array) exactly."""
    _recv_exact(sock, memoryview(out).cast("B"))
