"""Untrusted manifests (issue 16), the HTTP client in-process: internal addresses refused after
DNS on every redirect hop and without DNS rebinding, the whole-download deadline (also over
TLS), X-Robots-Tag opt-outs, and no signature in any message.

Every server binds loopback: 127.0.0.1 is the "public" media host, 127.0.0.2 the "internal"
one, blocked with `http.blocked_networks=[127.0.0.2/32]`. Names like `*.test` are resolved by a
patched `socket.getaddrinfo` (no DNS query leaves the process)."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from core.config import load_config
from core.shard_format import SampleError
from pipeline.config import PrepConfig
from pipeline.fetch import Fetcher
from pipeline.untrusted import (
    AddressPolicy,
    opted_out,
)
from testing.hostile_http import HostileHTTP

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "prep" / "tiny.yaml")
INTERNAL_ONLY = "http.blocked_networks=[127.0.0.2/32]"  # 127.0.0.1 is the allowed media host


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def http_cfg(*overrides: str):
    return load_config(PrepConfig, TINY, ["http.retries=0", "http.timeout_s=1", *overrides]).http


@pytest.fixture
def servers():
    """(public server on 127.0.0.1, internal server on 127.0.0.2)."""
    with HostileHTTP("127.0.0.1") as public, HostileHTTP("127.0.0.2") as internal:
        internal.route("/secret", body=b"the metadata service's credentials")
        yield public, internal


def fail(fetcher: Fetcher, url: str) -> SampleError:
    with pytest.raises(SampleError) as info:
        fetcher.fetch(url)
    return info.value


# ------------------------------------------------------------------------- addresses


def test_default_blocklist_covers_internal_ranges_and_their_spellings():
    cfg = load_config(PrepConfig, TINY).http
    policy = AddressPolicy.from_config(cfg.blocked_networks, cfg.allowed_networks)
    internal = [
        "127.0.0.1", "127.8.9.10", "0.0.0.0", "10.1.2.3", "172.16.0.1", "172.31.255.254",
        "192.168.1.1", "169.254.169.254", "100.64.0.1", "100.100.100.200", "224.0.0.251",
        "255.255.255.255", "::1", "::", "fc00::1", "fd00:ec2::254", "fe80::1", "fe80::1%eth0",
        "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
        "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe", "::127.0.0.1",
    ]  # fmt: skip
    assert [a for a in internal if policy.blocked_by(a) is None] == []
    # Public addresses pass (a pure computation: nothing is contacted).
    public = ["93.184.216.34", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1", "::ffff:8.8.8.8"]
    assert [a for a in public if policy.blocked_by(a) is not None] == []
    assert str(policy.blocked_by("::ffff:169.254.169.254")) == "169.254.0.0/16"


def test_allowed_networks_carve_exceptions():
    policy = AddressPolicy.from_config(["127.0.0.0/8", "10.0.0.0/8"], ["127.0.0.1/32"])
    assert policy.blocked_by("127.0.0.1") is None and policy.blocked_by("::ffff:127.0.0.1") is None
    assert str(policy.blocked_by("127.0.0.2")) == "127.0.0.0/8"
    assert policy.blocked_by("10.0.0.1") is not None


def test_blocked_host_is_never_contacted(servers):
    public, internal = servers
    fetcher = Fetcher(http_cfg(INTERNAL_ONLY))
    for url in (
        internal.url("/secret"),
        internal.url("/secret").replace("127.0.0.2", "[::ffff:127.0.0.2]"),  # IPv4-mapped IPv6
        internal.url("/secret").replace("127.0.0.2", "2130706434"),  # 127.0.0.2 as one number
    ):
        error = fail(fetcher, url)
        assert error.reason == "blocked_address", (url, error.detail)
        assert "127.0.0.2" in error.detail and "http.allowed_networks" in error.detail
    assert internal.hits["/secret"] == 0


def test_redirect_to_internal_is_refused_on_every_hop(servers, monkeypatch):
    public, internal = servers
    port = internal.server.server_address[1]
    names = {"internal.test": "127.0.0.2", "cdn.test": "127.0.0.1"}
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real(names.get(host, host), *a, **k))
    png = png_bytes()
    public.route("/a.png", body=png)
    public.route("/hop1", status=302, headers={"Location": "/hop2"})
    public.route("/hop2", status=301, headers={"Location": internal.url("/secret")})
    public.route("/by-name", status=307, headers={"Location": f"http://internal.test:{port}/secret"})
    public.route(
        "/fine", status=302, headers={"Location": public.url("/a.png").replace("127.0.0.1", "cdn.test")}
    )
    public.route("/to-file", status=302, headers={"Location": "file:///etc/passwd"})
    fetcher = Fetcher(http_cfg(INTERNAL_ONLY))
    assert fail(fetcher, public.url("/hop1")).reason == "blocked_address"
    assert fail(fetcher, public.url("/by-name")).reason == "blocked_address"
    assert fail(fetcher, public.url("/to-file")).reason == "forbidden_path"
    assert internal.hits["/secret"] == 0
    assert fetcher.fetch(public.url("/fine")) == png  # redirects between allowed hosts still work


def test_dns_rebinding_cannot_reach_the_internal_host(servers, monkeypatch):
    """The name is resolved once per hop and the socket goes to the address that was checked:
    an answer that turns internal after the check is never used."""
    public, internal = servers
    png = png_bytes()
    public.route("/a.png", body=png)
    internal.route("/a.png", body=b"internal data")
    answers = ["127.0.0.1"]  # first answer public, every later one internal
    real = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        if host == "rebind.test":
            host = answers.pop(0) if answers else "127.0.0.2"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = public.server.server_address[1]
    fetcher = Fetcher(http_cfg(INTERNAL_ONLY))
    assert fetcher.fetch(f"http://rebind.test:{port}/a.png") == png
    assert internal.hits["/a.png"] == 0
    # Now it resolves to the internal address only: refused before connecting.
    assert fail(fetcher, f"http://rebind.test:{port}/a.png").reason == "blocked_address"
    assert internal.hits["/a.png"] == 0


def test_a_name_with_internal_and_public_addresses_connects_to_the_public_one(servers, monkeypatch):
    public, internal = servers
    png = png_bytes()
    public.route("/a.png", body=png)
    internal.route("/a.png", body=b"internal data")
    real = socket.getaddrinfo

    def both(host, port, *args, **kwargs):
        if host == "mixed.test":
            return real("127.0.0.2", port, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", both)
    port = public.server.server_address[1]
    assert Fetcher(http_cfg(INTERNAL_ONLY)).fetch(f"http://mixed.test:{port}/a.png") == png
    assert internal.hits["/a.png"] == 0


# ------------------------------------------------------------------------- deadline, opt-outs


def test_dripping_body_fails_timeout_within_the_whole_download_deadline(servers):
    public, _ = servers
    # 0.05 s between bytes never trips a per-read timeout of 1 s: only a whole-download bound can.
    public.route("/drip.png", body=png_bytes(), drip_s=0.05)
    error = fail(Fetcher(http_cfg(INTERNAL_ONLY)), public.url("/drip.png"))
    assert error.reason == "timeout" and "http.timeout_s=1" in error.detail
    public.settle("/drip.png")
    assert public.completed["/drip.png"] == 0  # the client hung up mid-body, it did not read on


def test_x_robots_tag_opt_outs_like_img2dataset():
    directives = ["noai", "noimageai", "noindex", "noimageindex"]
    cases = {
        "noai": True,
        "NoImageAI": True,
        "noindex, nofollow": True,
        "nofollow, noarchive": False,
        "higen-prep: noimageai": True,
        "HIGEN-PREP : noai": True,
        "otherbot: noai": False,
        "img2dataset: noai": False,
        "unavailable_after: 25 Jun 2010 15:00:00 PST": False,
        "max-image-preview: large, noai": True,
        "": False,
    }
    got = {v: opted_out([v], "higen-prep", directives) is not None for v in cases}
    assert got == cases
    assert (
        opted_out(["nofollow", "otherbot: noai", "noimageindex"], "higen-prep", directives) == "noimageindex"
    )
    assert opted_out(["noai"], "higen-prep", []) is None  # [] switches the check off
    assert opted_out(["img2dataset: noai"], "img2dataset", directives) == "img2dataset: noai"


def test_opted_out_reply_fails_and_is_not_retried(servers):
    public, _ = servers
    png = png_bytes()
    public.route("/noai.png", body=png, headers={"X-Robots-Tag": "noai"})
    public.route("/ours.png", body=png, headers={"X-Robots-Tag": "higen-prep: noimageai"})
    public.route("/theirs.png", body=png, headers={"X-Robots-Tag": "otherbot: noai"})
    fetcher = Fetcher(http_cfg(INTERNAL_ONLY, "http.retries=2"))
    assert fail(fetcher, public.url("/noai.png")).reason == "opted_out"
    assert fail(fetcher, public.url("/ours.png")).reason == "opted_out"
    assert public.hits["/noai.png"] == 1
    assert fetcher.fetch(public.url("/theirs.png")) == png
    off = Fetcher(http_cfg(INTERNAL_ONLY, "http.disallowed_header_directives=[]"))
    assert off.fetch(public.url("/noai.png")) == png


def test_fetch_messages_never_carry_the_signature(servers):
    public, _ = servers
    url = public.url("/missing.png") + "?X-Amz-Signature=topsecret&X-Amz-Credential=AKIAEXAMPLE"
    error = fail(Fetcher(http_cfg(INTERNAL_ONLY)), url)
    assert error.reason == "not_found" and "404" in error.detail
    assert "topsecret" not in error.detail and "AKIAEXAMPLE" not in error.detail
    assert "X-Amz-Signature=REDACTED" in error.detail


# ------------------------------------------------------------------------- TLS


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 / media.test signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    names = [x509.DNSName("media.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "media")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_https_checks_the_certificate_and_bounds_a_dripping_body(tmp_path, monkeypatch):
    import ssl

    import pipeline.http_guard as http_guard

    ca, cert, key = _tls_files(tmp_path)
    trusted = ssl.create_default_context(cafile=str(ca))
    monkeypatch.setattr(http_guard, "tls_context", lambda: trusted)  # trust the test CA only
    png = png_bytes()
    with HostileHTTP("127.0.0.1") as server:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        server.server.socket = server_ctx.wrap_socket(server.server.socket, server_side=True)
        server.route("/a.png", body=png)
        server.route("/drip.png", body=png, drip_s=0.05)
        base = server.url("").replace("http://", "https://")
        fetcher = Fetcher(http_cfg(INTERNAL_ONLY))
        assert fetcher.fetch(base + "/a.png") == png
        assert fail(fetcher, base + "/drip.png").reason == "timeout"
        server.settle("/drip.png")
        assert server.completed["/drip.png"] == 0  # the TLS socket was shut down mid-body
        real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", lambda h, *a, **k: real("127.0.0.1", *a, **k))
        assert fetcher.fetch(base.replace("127.0.0.1", "media.test") + "/a.png") == png  # SNI + name check
        wrong = fail(fetcher, base.replace("127.0.0.1", "other.test") + "/a.png")
        assert wrong.reason == "http_error" and "certificate" in wrong.detail


def test_a_declared_length_over_max_bytes_fails_before_the_body_is_read(servers):
    public, _ = servers
    public.route("/big.png", body=b"x" * 5000, drip_s=0.01)
    error = fail(Fetcher(http_cfg(INTERNAL_ONLY, "http.max_bytes=100")), public.url("/big.png"))
    assert error.reason == "too_large" and "http.max_bytes=100" in error.detail
    public.settle("/big.png")
    assert public.completed["/big.png"] == 0
