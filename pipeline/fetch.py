"""Getting media bytes: local paths, fsspec URLs (`s3://`, `gs://`...) and `http(s)://`.

Local files are not read here: the `Decoder` opens the path itself (the video decoder child
reads it directly, no bytes through a pipe). Remote media are downloaded by a small thread
pool per shard task (`http.max_concurrency`), ahead of decoding and in manifest order, so
decoding waits on the network only when the network is the bottleneck; within a byte budget
(`http.prefetch_bytes`), large files going to local temp files (`pipeline/prefetch.py`).

HTTP is spoken by `http.client` on sockets this module opens itself (docs/untrusted.md): the
host is resolved once per hop, each address is checked against `http.blocked_networks` before
connecting, the socket's peer is checked again, and the request goes to that very address, so
a DNS answer that changes between check and connect (rebinding) cannot reach an internal
host. Redirects are followed here, hop by hop, under the same rules. Environment proxies are
not used for media: a proxy would resolve names itself and the check would mean nothing.

HTTP failures are classified once, here (`core.shards.TRANSIENT_REASONS` says which codes a
plain `--retry-failed` redoes):
- 404, 410: permanent, no retry                                  -> `not_found`
- 403 and other 4xx, a TLS certificate, a bad URL, a redirect
  loop: permanent, no retry                                      -> `http_error`
- a body over `http.max_bytes`: permanent                        -> `too_large`
- 5xx, 408, 429, connection resets: retried with exponential
  backoff and +-50% jitter (`http.backoff_s`, doubling, capped) -> `download_error` if all fail
  (transient)
- an attempt longer than `http.timeout_s` in all (connect, headers
  and body together: a body dripping a byte at a time too): retried -> `timeout` if all fail
- an internal address (any hop)                                  -> `blocked_address`, no retry
- X-Robots-Tag with a disallowed directive (noai...)             -> `opted_out`, no retry
Messages carry the URL with its signatures redacted (`manifest.redact_query_params`).
"""

from __future__ import annotations

import base64
import http.client
import random
import ssl
import time
from collections.abc import Iterable, Iterator, Sequence
from http.client import HTTPException
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from core.shard_format import SampleError
from pipeline.config import HttpConfig
from pipeline.http_guard import Deadline, GuardedConnector, GuardedHTTPConnection, GuardedHTTPSConnection
from pipeline.prefetch import Body, Prefetch, Spilled
from pipeline.storage import url_to_fs
from pipeline.untrusted import (
    DEFAULT_REDACT_PARAMS,
    AddressPolicy,
    opted_out,
    redact_text,
    redact_url,
)
from pipeline.wds_input import MemberRef, read_member

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
NOT_FOUND_STATUS = {404, 410}
CHUNK = 1 << 20
URL_SAFE = "/%:@!$&'()*+,;=-._~?"  # left as they are when quoting a request target

Fetched = tuple[bytes | bytearray | Spilled | None, SampleError | None]


def is_remote(source: str) -> bool:
    return "://" in source


class HTTPStatusError(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(f"HTTP {code} {reason}")
        self.code, self.reason = code, reason


class Fetcher:
    """`fetch(source)` -> bytes for remote media, None for local paths; SampleError on failure."""

    def __init__(
        self,
        http: HttpConfig,
        storage_options: dict[str, Any] | None = None,
        redact_params: Sequence[str] = DEFAULT_REDACT_PARAMS,
    ):
        self.http = http
        self.options = storage_options or {}
        self.redact_params = tuple(redact_params)
        self.connector = GuardedConnector(
            AddressPolicy.from_config(http.blocked_networks, http.allowed_networks)
        )
        self._fs: dict[str, Any] = {}
        self.prefetcher: Prefetch | None = None  # the last `prefetch` (its budget's peak, spills)

    def shown(self, url: str) -> str:
        return redact_url(url, self.redact_params)

    def fetch(self, source: str | MemberRef, body: Body | None = None) -> bytes | bytearray | Spilled | None:
        """The bytes of a remote `source` (None for a local path). With `body`, they go there
        (RAM within its budget, or a temp file) and its `result()` is returned. A tar input's
        media member (`MemberRef`, pipeline/wds_input.py) is read whole: at most http.max_bytes."""
        if isinstance(source, MemberRef):
            return read_member(source, self._filesystem, self.http.max_bytes, self._http_range)
        if not is_remote(source):
            return None
        body = body if body is not None else Body()
        if source.startswith(("http://", "https://")):
            self._http(source, body)
        else:
            self._fsspec(source, body)
        return body.result()

    def _fsspec(self, url: str, body: Body) -> None:
        shown = self.shown(url)
        try:
            fs = self._filesystem(url)
            size = fs.size(url)
            if size is not None and size > self.http.max_bytes:
                raise SampleError(
                    "too_large", f"{shown}: {size} bytes is over http.max_bytes={self.http.max_bytes}"
                )
            body.start(size)
            if body.path is None:
                body.write(fs.cat_file(url))
                return
            with fs.open(url, "rb") as fh:  # over http.spill_bytes: streamed to the temp file
                while chunk := fh.read(CHUNK):
                    body.write(chunk)
        except FileNotFoundError:
            raise SampleError("missing_file", f"{shown}: no such object (check the manifest URL)") from None
        except PermissionError as exc:  # s3fs: AccessDenied; asking again will not help
            detail = redact_text(f"{type(exc).__name__}: {exc}", self.redact_params)
            raise SampleError("http_error", f"{shown}: access denied: {detail}") from None
        except SampleError:
            raise
        except Exception as exc:  # noqa: BLE001 - any storage failure is this sample's failure
            detail = redact_text(f"{type(exc).__name__}: {exc}", self.redact_params)
            raise SampleError("download_error", f"{shown}: {detail}") from None

    def _filesystem(self, url: str) -> Any:
        protocol = url.split("://", 1)[0]
        if protocol not in self._fs:
            self._fs[protocol] = url_to_fs(url, self.options)[0]
        return self._fs[protocol]

    def _http_range(self, url: str, byte_range: tuple[int, int]) -> bytes:
        """Just bytes (start, size) of `url`: an HTTP Range request under the same address checks,
        deadline and retries (a tar input's media member)."""
        body = Body()
        self._http(url, body, byte_range)
        return bytes(body.result())

    def _http(self, url: str, body: Body, byte_range: tuple[int, int] | None = None) -> None:
        shown = self.shown(url)
        attempts = self.http.retries + 1
        last_reason, last_detail = "download_error", ""
        for attempt in range(attempts):
            if attempt:
                delay = min(self.http.max_backoff_s, self.http.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * random.uniform(0.5, 1.5))
            body.reset()
            try:
                return self._http_once(url, body, byte_range)
            except HTTPStatusError as exc:
                last_reason, last_detail = "download_error", str(exc)
                if exc.code not in RETRY_STATUS:
                    reason = "not_found" if exc.code in NOT_FOUND_STATUS else "http_error"
                    raise SampleError(reason, f"{shown}: {last_detail} (not retried)") from None
            except TimeoutError:
                last_reason = "timeout"
                last_detail = f"download took over http.timeout_s={self.http.timeout_s:g}s"
            except ssl.SSLCertVerificationError as exc:
                raise SampleError(
                    "http_error", f"{shown}: TLS certificate: {exc.verify_message}"
                ) from None
            except (HTTPException, ConnectionError, OSError) as exc:
                last_reason, last_detail = "download_error", f"{type(exc).__name__}: {exc}"
        detail = redact_text(last_detail, self.redact_params)
        raise SampleError(last_reason, f"{shown}: {detail} (after {attempts} attempts)")

    def _http_once(self, url: str, body: Body, byte_range: tuple[int, int] | None = None) -> None:
        """One attempt: every hop of the redirect chain and the body, within one Deadline."""
        deadline = Deadline(self.http.timeout_s)
        first = url
        try:
            for _ in range(self.http.max_redirects + 1):
                conn, response = self._request(url, deadline, byte_range)
                try:
                    location = response.getheader("Location")
                    if response.status in REDIRECT_STATUS and location:
                        url = self._redirect(url, location)
                        continue
                    if response.status >= 300:
                        raise HTTPStatusError(response.status, response.reason)
                    self._check_opt_out(url, response)
                    if byte_range is not None and response.status != 206:  # would send the whole tar
                        raise SampleError("http_error", f"{self.shown(url)}: Range request not served")
                    return self._read_body(url, response, deadline, body)
                finally:  # the response holds the socket open until it is closed itself
                    response.close()
                    conn.close()
            raise SampleError(
                "http_error", f"{self.shown(url)}: more than http.max_redirects={self.http.max_redirects}"
            )
        except SampleError as exc:
            if url == first:
                raise
            raise SampleError(exc.reason, f"{self.shown(first)} redirected to {exc.detail}") from None
        except (OSError, HTTPException):
            if deadline.expired:  # the watchdog closed the socket: whatever broke, it is the clock
                raise TimeoutError from None
            raise
        finally:
            deadline.cancel()

    def _request(self, url: str, deadline: Deadline, byte_range: tuple[int, int] | None = None):
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = parts.port
            if not host.isascii():
                host = host.encode("idna").decode("ascii")
        except (ValueError, UnicodeError) as exc:
            raise SampleError("http_error", f"{self.shown(url)}: not a valid URL ({exc})") from None
        if not host:
            raise SampleError("http_error", f"{self.shown(url)}: the URL has no host")
        cls = GuardedHTTPSConnection if parts.scheme == "https" else GuardedHTTPConnection
        conn = cls(host, port, self.connector, deadline, self.shown(url))
        target = quote(parts.path or "/", safe=URL_SAFE) + (
            "?" + quote(parts.query, safe=URL_SAFE + "=") if parts.query else ""
        )
        headers = {"User-Agent": self.http.user_agent}
        if byte_range is not None:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"
        if parts.username is not None:  # https://user:password@host/ (stored redacted)
            token = f"{parts.username}:{parts.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        try:
            conn.request("GET", target, headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _redirect(self, url: str, location: str) -> str:
        target = urljoin(url, location.strip())
        if urlsplit(target).scheme not in ("http", "https"):
            raise SampleError(
                "forbidden_path", f"{self.shown(url)}: redirects to {self.shown(target)}, not an http(s) URL"
            )
        return target

    def _check_opt_out(self, url: str, response: http.client.HTTPResponse) -> None:
        values = response.headers.get_all("X-Robots-Tag") or []
        hit = opted_out(values, self.http.user_agent_token, self.http.disallowed_header_directives)
        if hit is not None:
            raise SampleError(
                "opted_out",
                f"{self.shown(url)}: X-Robots-Tag {hit!r} forbids this use "
                "(http.disallowed_header_directives)",
            )

    def _read_body(
        self, url: str, response: http.client.HTTPResponse, deadline: Deadline, body: Body
    ) -> None:
        if response.length is not None and response.length > self.http.max_bytes:  # before reading
            raise SampleError(
                "too_large",
                f"{self.shown(url)}: {response.length} bytes is over http.max_bytes={self.http.max_bytes}",
            )
        size = 0
        body.start(response.length)
        while chunk := response.read(CHUNK):
            size += len(chunk)
            if size > self.http.max_bytes:
                raise SampleError(
                    "too_large", f"{self.shown(url)}: larger than http.max_bytes={self.http.max_bytes}"
                )
            body.write(chunk)
            deadline.remaining()
        deadline.remaining()  # a watchdog shutdown reads as the end of the body
        if response.length:  # the server hung up before Content-Length bytes
            raise http.client.IncompleteRead(b"", response.length)

    def needs_fetch(self, source: str | MemberRef | None) -> bool:
        """Whether `prefetch` downloads `source` (remote, or a tar member); None and local paths
        pass through."""
        return isinstance(source, MemberRef) or (source is not None and is_remote(source))

    def prefetch(self, sources: Iterable[str | MemberRef | None]) -> Iterator[Fetched]:
        """Fetch results in input order, up to `max_concurrency` downloads ahead, within
        `http.prefetch_bytes` (pipeline/prefetch.py). A None source is passed through untouched."""
        http = self.http
        self.prefetcher = Prefetch(self, http.prefetch_bytes, http.spill_bytes, http.spill_dir)
        return self.prefetcher.run(sources)
