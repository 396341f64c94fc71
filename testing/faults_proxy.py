"""An HTTP proxy that makes an S3 endpoint flaky, for fault-injection tests and `bench/faults.py`.

    proxy = FaultProxy("http://127.0.0.1:5000", every=5).start()   # s3fs endpoint_url=proxy.url
    ...
    proxy.stop(); proxy.injected  # Counter of faults per kind

Request n (1-based, counted over every request) is forwarded untouched unless n % every == 0;
then it gets the next fault of `FAULTS` in turn (a deterministic schedule):
- "slowdown": 503 with S3's SlowDown XML, the request never reaches the server;
- "internal": 500 InternalError XML, never reaches the server;
- "reset_after": forwarded (the server DID act on it), then the client's connection is reset
  instead of answering, as when a load balancer drops a connection: the retry repeats an
  operation that already happened.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset_after")
_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
    "<RequestId>FAULTPROXY{n}</RequestId></Error>"
)


class FaultProxy:
    def __init__(self, upstream: str, every: int = 5, faults: tuple[str, ...] = FAULTS):
        if every < 2:
            raise ValueError("every must be >= 2: with every=1 no request could ever succeed")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.every, self.faults = every, faults
        self.requests = 0
        self.injected: Counter = Counter()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None, "start() first"
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _next_fault(self) -> tuple[int, str | None]:
        with self.lock:
            self.requests += 1
            n = self.requests
            if n % self.every:
                return n, None
            fault = self.faults[(n // self.every - 1) % len(self.faults)]
            self.injected[fault] += 1
            return n, fault

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str, msg: str, n: int) -> None:
                body = _XML.format(code=code, msg=msg, n=n).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _handle(self) -> None:
                body = self._body()
                n, fault = proxy._next_fault()
                if fault == "slowdown":
                    return self._error(503, "SlowDown", "Please reduce your request rate.", n)
                if fault == "internal":
                    return self._error(500, "InternalError", "We encountered an internal error.", n)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if self.headers.get("Transfer-Encoding") or body:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault == "reset_after":
                    return self._reset()
                self.send_response(resp.status)
                head = self.command == "HEAD"  # keep the object's Content-Length
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (
                        head or k.lower() != "content-length"
                    ):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
