"""Fixtures of the preprocessing-job tests: one synthetic data set and one Ray instance per
session (`ray.init(num_cpus=2)`), shared by every test that runs the job in-process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "prep" / "tiny.yaml")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """9 good videos, 6 good images and the generator's broken files (`--bad`), plus
    `ten.parquet`: the 9 good videos with one corrupt video (random bytes) as row 4."""
    root = tmp_path_factory.mktemp("synthetic")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "preprocessing.synthetic",
            "--out",
            str(root),
            "--videos",
            "9",
            "--images",
            "6",
            "--bad",
            "--seconds",
            "2",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    videos = pd.read_parquet(root / "videos.parquet")
    good = videos[~videos.video.str.contains("/bad/")].reset_index(drop=True)
    corrupt = pd.DataFrame([{"video": str(root / "bad" / "random_bytes.mp4"), "caption": "a corrupt clip"}])
    pd.concat([good[:4], corrupt, good[4:]]).to_parquet(root / "ten.parquet", index=False)
    images = pd.read_parquet(root / "images.parquet")
    images[~images.image.str.contains("/bad/")].to_parquet(root / "good_images.parquet", index=False)
    return root


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _prep(*args: str, config: str | None = TINY) -> int:
    from pipeline.prep import main

    argv = [*args, "execution.progress=false"]
    if config:
        argv = ["--config", config, *argv]
    return main(argv)


@pytest.fixture
def prep():
    """`prep(*argv)`: run `python -m pipeline.prep` in this process with the tiny config."""
    return _prep


@pytest.fixture(scope="session")
def prep_once():
    """`prep` for module- and session-scoped fixtures."""
    return _prep


@pytest.fixture
def media_server(synthetic):
    """HTTP on 127.0.0.1: `/img/NAME` (200), `/missing.png` (404), `/flaky.png` (503 twice,
    then 200), `/stall.png` (headers and half the body, then silence for 4 s), `/files/NAME`
    (the bytes a test puts in `files[NAME]`). Yields (base URL, Counter of requests per path,
    files)."""
    import threading
    import time
    from collections import Counter
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    images = {p.name: p.read_bytes() for p in (synthetic / "images").iterdir()}
    good = next(iter(images.values()))
    hits: Counter = Counter()
    files: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _send(self, code: int, body: bytes, stall: bool = False, head: bool = False) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            if stall:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(4.0)
            self.wfile.write(body)

        def do_HEAD(self):
            name = self.path[len("/files/") :]
            self._send(200 if name in files else 404, files.get(name, b""), head=True)

        def do_GET(self):
            hits[self.path] += 1
            if self.path.startswith("/files/") and self.path[7:] in files:
                self._send(200, files[self.path[7:]])
            elif self.path.startswith("/img/") and self.path[5:] in images:
                self._send(200, images[self.path[5:]])
            elif self.path == "/flaky.png":
                busy = hits[self.path] <= 2
                self._send(503 if busy else 200, b"busy" if busy else good)
            elif self.path == "/stall.png":
                self._send(200, good, stall=True)
            else:
                self._send(404, b"not found")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits, files
    finally:
        server.shutdown()
        server.server_close()
