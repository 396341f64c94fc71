"""A small HTTP server with hostile answers, for the untrusted-manifest tests (issue 16).

    server = HostileHTTP("127.0.0.1").start()
    server.route("/a.png", body=png)                                  # 200
    server.route("/noai.png", body=png, headers={"X-Robots-Tag": "noai"})
    server.route("/to-internal", status=302, headers={"Location": "http://127.0.0.2:P/x"})
    server.route("/drip.png", body=png, drip_s=0.05)                  # one byte every 50 ms
    server.url("/a.png"); server.hits["/a.png"]; server.completed["/drip.png"]; server.stop()

Tests only bind loopback addresses (127.0.0.0/8); `127.0.0.2` plays the "internal" host.
Paths are matched without their query string, so signed variants of one URL hit one route.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drip_s: float = 0.0  # > 0: the body one byte at a time, this long between bytes


class HostileHTTP:
    def __init__(self, host: str = "127.0.0.1"):
        if not host.startswith("127."):
            raise ValueError(f"tests stay on 127.0.0.0/8, not {host}")
        self.host = host
        self.routes: dict[str, Route] = {}
        self.hits: Counter = Counter()
        self.completed: Counter = Counter()  # bodies written to the end (the client kept reading)
        self.ended: Counter = Counter()  # answers finished, whole or cut off by the client
        self.server: ThreadingHTTPServer | None = None

    def route(self, path: str, **kwargs) -> str:
        self.routes[path] = Route(**kwargs)
        return self.url(path)

    def url(self, path: str) -> str:
        assert self.server is not None, "start() first"
        return f"http://{self.host}:{self.server.server_address[1]}{path}"

    def start(self) -> HostileHTTP:
        routes, hits, completed, ended = self.routes, self.hits, self.completed, self.ended

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _head(self) -> Route:
                path = self.path.split("?", 1)[0]
                hits[path] += 1
                route = routes.get(path, Route(404, b"not found"))
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                return route

            def do_HEAD(self):  # fsspec asks for sizes first (a manifest served over HTTP)
                self._head()

            def do_GET(self):
                route = self._head()
                try:
                    if route.drip_s <= 0:
                        self.wfile.write(route.body)
                    else:
                        for i in range(len(route.body)):
                            self.wfile.write(route.body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(route.drip_s)
                    completed[self.path.split("?", 1)[0]] += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: that is what a dripping body is for
                finally:
                    ended[self.path.split("?", 1)[0]] += 1

        self.server = ThreadingHTTPServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def settle(self, path: str, timeout: float = 60.0) -> None:
        """Wait until every request of `path` has been answered or cut off (then `completed` is
        final: a body the client stopped reading is never counted)."""
        deadline = time.monotonic() + timeout
        while self.ended[path] < self.hits[path]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: {self.hits[path] - self.ended[path]} answers still running")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> HostileHTTP:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
