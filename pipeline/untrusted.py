"""Rules for manifests written by strangers (docs/untrusted.md): one place, called by every row
resolver (manifest rows now; tar inputs and `source_template` use the same calls).

A row may name a local path, an fsspec URL or an http(s) URL. Before any byte is read:
- `SourcePolicy.check`: the protocol must be in `manifest.allowed_protocols`, and a local path,
  resolved with `realpath` (`..` and symlinks), must lie inside `manifest.allowed_roots`
  -> `forbidden_path`.
- `AddressPolicy.blocked_by`: every address an http(s) download connects to (each redirect hop,
  after DNS resolution, and the socket's actual peer) must be outside `http.blocked_networks`
  (or inside an exception of `http.allowed_networks`) -> `blocked_address`.
- `opted_out`: an `X-Robots-Tag` reply header with a directive of
  `http.disallowed_header_directives` (img2dataset's semantics) -> `opted_out`.
- `redact_url` / `redact_text`: query parameters that carry signatures, credentials or tokens
  (`manifest.redact_query_params`) and URL passwords become `REDACTED` in every stored field and
  message; the sample key is computed from the redacted URL, so a re-signed URL keeps its key.

These apply to the media a row names. The job's own endpoints (the manifest URL, the output
root, `storage.options.client_kwargs.endpoint_url`) are the operator's choice and not checked.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote_plus

from core.shard_format import SampleError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PROTOCOLS = ("file", "s3", "gs", "http", "https")
LOCAL_PROTOCOLS = ("file", "local")  # fsspec names of the local filesystem

DEFAULT_BLOCKED_NETWORKS = (
    "0.0.0.0/8",  # "this network": a connect to 0.0.0.0 reaches the local host
    "127.0.0.0/8",  # loopback
    "10.0.0.0/8",  # RFC 1918
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",  # link-local: cloud metadata services at 169.254.169.254
    "100.64.0.0/10",  # CGNAT (RFC 6598): some clouds' internal services live here
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and broadcast 255.255.255.255
    "::1/128",  # IPv6 loopback
    "::/128",  # unspecified
    "fc00::/7",  # IPv6 ULA (AWS's IPv6 metadata fd00:ec2::254)
    "fe80::/10",  # IPv6 link-local
    "ff00::/8",  # IPv6 multicast
)

# img2dataset's defaults (`--disallowed_header_directives`).
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")

# Query parameters redacted from stored URLs. The list (signatures, credentials, tokens),
# plus the AWS/GCS date and lifetime parameters: not secret, but they change with every signing
# and the key of a re-signed URL must not.
DEFAULT_REDACT_PARAMS = (
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "X-Amz-Date",
    "X-Amz-Expires",
    "AWSAccessKeyId",
    "X-Goog-Signature",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "GoogleAccessId",
    "Signature",
    "sig",
    "se",
    "sp",
    "token",
    "Expires",
    "Key-Pair-Id",
)
REDACTED = "REDACTED"

# X-Robots-Tag directives that carry a value after a colon (`unavailable_after: DATE`): the word
# before the colon is then a directive, not a user-agent token.
VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
_UA_PREFIX = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*:(.*)$", re.S)


# ------------------------------------------------------------------------- networks


def parse_network(value: object) -> IPNetwork:
    """One CIDR (`10.0.0.0/8`, `fd00::/8`, a bare address = /32 or /128); ValueError names it."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a CIDR string (write e.g. 10.0.0.0/8 or fd00::/8)")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(
            f"{value!r} is not a CIDR network ({exc}); write e.g. 10.0.0.0/8 or fd00::/8"
        ) from None


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address stands for: mapped (::ffff:a.b.c.d), IPv4-compatible
    (::a.b.c.d), 6to4 (2002::/16) and NAT64 (64:ff9b::/96). A blocked IPv4 network blocks these
    spellings too, so `::ffff:169.254.169.254` is not a way around `169.254.0.0/16`."""
    if ip.version != 6:
        return []
    out = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    as_int = int(ip)
    if as_int >> 32 == 0 and as_int > 1:  # ::a.b.c.d (deprecated IPv4-compatible form)
        out.append(ipaddress.IPv4Address(as_int & 0xFFFFFFFF))
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        out.append(ipaddress.IPv4Address(as_int & 0xFFFFFFFF))
    return out


@dataclass(frozen=True)
class AddressPolicy:
    """`http.blocked_networks` minus the exceptions of `http.allowed_networks`."""

    blocked: tuple[IPNetwork, ...]
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_config(cls, blocked: Iterable[str], allowed: Iterable[str] = ()) -> AddressPolicy:
        return cls(tuple(parse_network(v) for v in blocked), tuple(parse_network(v) for v in allowed))

    def blocked_by(self, address: str) -> IPNetwork | None:
        """The blocked network holding `address` (or one of its IPv4 forms), None if allowed."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id (fe80::1%eth0)
        forms: list[IPAddress] = [ip, *embedded_ipv4(ip)]
        hit = next((n for n in self.blocked for f in forms if f.version == n.version and f in n), None)
        if hit is None:
            return None
        if any(f.version == n.version and f in n for n in self.allowed for f in forms):
            return None
        return hit


def blocked_message(shown: str, host: str, address: str, network: IPNetwork) -> str:
    where = address if host == address else f"{host} ({address})"
    prefix = ipaddress.ip_address(address.split("%", 1)[0]).max_prefixlen
    return (
        f"{shown}: {where} is inside http.blocked_networks entry {network} (an internal address); "
        f"to fetch from it anyway add {address}/{prefix} to http.allowed_networks"
    )


# ------------------------------------------------------------------------- local paths, protocols


def url_protocols(source: str) -> list[str]:
    """fsspec protocols of a URL, outermost first: `simplecache::s3://b/k` -> [simplecache, s3].
    http(s) URLs are fetched by our own client, never chained: `::` there is an IPv6 literal."""
    if source.startswith(("http://", "https://")):
        return [source.split("://", 1)[0]]
    return [part.split("://", 1)[0] if "://" in part else part for part in source.split("::")]


def default_roots(manifest_path: str, is_dir: bool, files: Sequence[str]) -> tuple[str, ...]:
    """A local manifest's own folder: the folder given, or the folder of each manifest file."""
    if is_dir:
        return (os.path.realpath(manifest_path),)
    return tuple(sorted({os.path.dirname(os.path.realpath(f)) for f in files}))


def configured_roots(values: Sequence[str]) -> tuple[str, ...]:
    """`manifest.allowed_roots` as real paths; ValueError names a value that is not a folder."""
    roots = []
    for value in values:
        real = os.path.realpath(os.path.expanduser(value))
        if not os.path.isdir(real):
            raise ValueError(f"manifest.allowed_roots entry {value!r} is not an existing folder")
        roots.append(real)
    return tuple(roots)


@dataclass(frozen=True)
class SourcePolicy:
    """What a manifest row may name: protocols, and the folders local paths must lie in."""

    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
    roots: tuple[str, ...] = ()  # real paths; empty: no local file at all (a remote manifest)

    def check(self, source: str) -> None:
        """Raise SampleError("forbidden_path") unless `source` may be read."""
        if "://" not in source:
            self.check_local(source)
            return
        protocols = url_protocols(source)
        refused = [p for p in protocols if p not in self.protocols]
        if refused:
            raise SampleError(
                "forbidden_path",
                f"{source}: protocol {refused[0]!r} is not in manifest.allowed_protocols "
                f"{list(self.protocols)}; add it there to allow it",
            )
        if any(p in LOCAL_PROTOCOLS for p in protocols):
            for part in source.split("::"):
                protocol, _, path = part.partition("://")
                if protocol in LOCAL_PROTOCOLS:
                    self.check_local(path)

    def check_local(self, path: str) -> None:
        if not self.roots:
            raise SampleError(
                "forbidden_path",
                f"{path}: local paths are not allowed in this manifest (a remote manifest's rows may "
                "only name URLs); set manifest.allowed_roots=[FOLDER] to allow a folder",
            )
        real = os.path.realpath(path)
        for root in self.roots:
            if real == root or real.startswith(root.rstrip("/") + "/"):
                return
        shown = path if real == path else f"{path} (resolves to {real})"
        raise SampleError(
            "forbidden_path",
            f"{shown}: outside manifest.allowed_roots {list(self.roots)}; add its folder to "
            "manifest.allowed_roots to allow it",
        )


# ------------------------------------------------------------------------- opt-outs


def opted_out(values: Iterable[str], user_agent_token: str, directives: Iterable[str]) -> str | None:
    """The first `X-Robots-Tag` value that forbids our use, or None (img2dataset's rules).

    Each header value is `directive, directive...` (applies to every crawler) or
    `useragent: directive, ...` (applies only when `useragent` is our token); case-insensitive.
    """
    disallowed = {d.strip().lower() for d in directives}
    token = user_agent_token.strip().lower()
    if not disallowed:
        return None
    for value in values:
        agent, rest = None, value
        match = _UA_PREFIX.match(value)
        if match and match.group(1).lower() not in VALUED_DIRECTIVES:
            agent, rest = match.group(1).lower(), match.group(2)
        if agent is not None and agent != token:
            continue
        names = {d.split(":", 1)[0].strip().lower() for d in rest.split(",")}
        if names & disallowed:
            return value
    return None


# ------------------------------------------------------------------------- redaction


@lru_cache(maxsize=16)
def _lowered(params: tuple[str, ...]) -> frozenset[str]:
    return frozenset(p.lower() for p in params)


def redact_url(url: str, params: Iterable[str] = DEFAULT_REDACT_PARAMS) -> str:
    """`url` with the values of `params` (case-insensitive) and any password replaced by
    REDACTED; everything else byte for byte. Local paths ("?" is part of a file name) unchanged."""
    if "://" not in url or ("?" not in url and "@" not in url):  # most rows: nothing to redact
        return url
    names = _lowered(tuple(params))
    scheme, rest = url.split("://", 1)
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    if query and names:
        parts = []
        for part in query.split("&"):
            name, eq, _ = part.partition("=")
            parts.append(f"{name}={REDACTED}" if eq and unquote_plus(name).lower() in names else part)
        query = "&".join(parts)
    return f"{scheme}://{netloc}{slash}{path}{question}{query}{hash_}{fragment}"


@lru_cache(maxsize=16)
def _text_pattern(params: tuple[str, ...]) -> re.Pattern | None:
    if not params:
        return None
    names = "|".join(re.escape(p) for p in params)
    # Already-redacted values match as themselves: the text around them is left as it was.
    return re.compile(rf"(?i)(?<=[?&;])({names})=(?:{REDACTED}|[^&#\s\"'<>]*)")


_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/\s:@?#]*:)[^/\s@?#]+@")


def redact_text(text: str, params: Iterable[str] = DEFAULT_REDACT_PARAMS) -> str:
    """Redact the same parameters inside free text (error messages, log lines)."""
    if not text:
        return text
    pattern = _text_pattern(tuple(sorted(params)))
    if pattern is not None:
        text = pattern.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    return _PASSWORD.sub(rf"\1{REDACTED}@", text)
