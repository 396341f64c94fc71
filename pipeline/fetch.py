"""Getting media bytes: local paths, fsspec URLs (`s3://`, `gs://`...) and `http(s)://`.

Local files are not read here: the `Decoder` opens the path itself (the video decoder child
reads it directly, no bytes through a pipe). Remote media are downloaded by a small thread
pool per shard task (`http.max_concurrency`), ahead of decoding and in manifest order, so
decoding waits on the network only when the network is the bottleneck.

HTTP failures are classified once, here:
- 404, 403, 410 and other 4xx: permanent, no retry              -> `download_error`
- 5xx, 408, 429, connection resets: retried with exponential
  backoff and +-50% jitter (`http.backoff_s`, doubling, capped) -> `download_error` if all fail
- no byte for `http.timeout_s` (connect or a stalled body):
  retried like the above                                       -> `timeout` if all fail
"""

from __future__ import annotations

import random
import socket
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.client import HTTPException
from typing import Any

from core.shard_format import SampleError
from pipeline.config import HttpConfig
from pipeline.storage import url_to_fs

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 1 << 20

Fetched = tuple[bytes | None, SampleError | None]


def is_remote(source: str) -> bool:
    return "://" in source


class Fetcher:
    """`fetch(source)` -> bytes for remote media, None for local paths; SampleError on failure."""

    def __init__(self, http: HttpConfig, storage_options: dict[str, Any] | None = None):
        self.http = http
        self.options = storage_options or {}
        self._fs: dict[str, Any] = {}

    def fetch(self, source: str) -> bytes | None:
        if not is_remote(source):
            return None
        if source.startswith(("http://", "https://")):
            return self._http(source)
        return self._fsspec(source)

    def _fsspec(self, url: str) -> bytes:
        try:
            protocol = url.split("://", 1)[0]
            if protocol not in self._fs:
                self._fs[protocol] = url_to_fs(url, self.options)[0]
            fs = self._fs[protocol]
            size = fs.size(url)
            if size is not None and size > self.http.max_bytes:
                raise SampleError(
                    "download_error", f"{url}: {size} bytes is over http.max_bytes={self.http.max_bytes}"
                )
            return fs.cat_file(url)
        except FileNotFoundError:
            raise SampleError("missing_file", f"{url}: no such object (check the manifest URL)") from None
        except SampleError:
            raise
        except Exception as exc:  # noqa: BLE001 - any storage failure is this sample's failure
            raise SampleError("download_error", f"{url}: {type(exc).__name__}: {exc}") from None

    def _http(self, url: str) -> bytes:
        attempts = self.http.retries + 1
        last_reason, last_detail = "download_error", ""
        for attempt in range(attempts):
            if attempt:
                delay = min(self.http.max_backoff_s, self.http.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * random.uniform(0.5, 1.5))
            try:
                return self._http_once(url)
            except urllib.error.HTTPError as exc:
                last_reason, last_detail = "download_error", f"HTTP {exc.code} {exc.reason}"
                if exc.code not in RETRY_STATUS:
                    raise SampleError("download_error", f"{url}: {last_detail} (not retried)") from None
            except TimeoutError:
                last_reason, last_detail = "timeout", f"no data for {self.http.timeout_s:g}s"
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    last_reason, last_detail = "timeout", f"connect took over {self.http.timeout_s:g}s"
                else:
                    last_reason, last_detail = "download_error", f"connection failed: {exc.reason}"
            except (HTTPException, ConnectionError, OSError) as exc:
                last_reason, last_detail = "download_error", f"{type(exc).__name__}: {exc}"
        raise SampleError(last_reason, f"{url}: {last_detail} (after {attempts} attempts)")

    def _http_once(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": self.http.user_agent})
        # The timeout bounds the connect and every socket read: a stalled body raises.
        with urllib.request.urlopen(request, timeout=self.http.timeout_s) as response:
            chunks, size = [], 0
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > self.http.max_bytes:
                    raise SampleError(
                        "download_error", f"{url}: larger than http.max_bytes={self.http.max_bytes}"
                    )
                chunks.append(chunk)
        return b"".join(chunks)

    def safe_fetch(self, source: str | None) -> Fetched:
        if source is None:
            return None, None
        try:
            return self.fetch(source), None
        except SampleError as exc:
            return None, exc

    def prefetch(self, sources: Iterable[str | None]) -> Iterator[Fetched]:
        """Fetch results in input order, with up to `max_concurrency` downloads running ahead.

        A None source is passed through untouched (rows that need no fetch)."""
        window = self.http.max_concurrency
        with ThreadPoolExecutor(window, thread_name_prefix="fetch") as pool:
            pending: deque[Future | Fetched] = deque()
            for source in sources:
                if source is not None and is_remote(source):
                    pending.append(pool.submit(self.safe_fetch, source))
                else:
                    pending.append((None, None))
                while len(pending) > window or (pending and not isinstance(pending[0], Future)):
                    head = pending.popleft()
                    yield head.result() if isinstance(head, Future) else head
            while pending:
                head = pending.popleft()
                yield head.result() if isinstance(head, Future) else head
