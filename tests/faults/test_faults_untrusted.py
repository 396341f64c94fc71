"""Hostile corpus, untrusted rows (issue 16): a manifest written by a stranger, through the real
job (`python -m pipeline.prep` in a subprocess, tiny config). Rows that read outside the
manifest's folder, use a refused protocol, reach an internal address (directly or through a
redirect), drip their body, opt out with X-Robots-Tag, or carry signatures. Each bad row fails
with its reason, the job goes on, every row is accounted for, the internal host is never
contacted, and no signature reaches any output file or the job's log.

Loopback only: 127.0.0.1 serves the media (allowed), 127.0.0.2 plays the internal host
(`http.blocked_networks=[127.0.0.2/32]`)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.shard_format import REASONS, sample_key
from pipeline.untrusted import redact_url
from testing.hostile_http import HostileHTTP
from testing.prep_job import check_members, prep_cmd, run, status_rows, tar_members

pytestmark = pytest.mark.slow

SECRETS = ("SECRETSIG1", "SECRETSIG2", "AKIASECRETKEY", "SECRETSAS3", "SECRETTOKEN4")


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def build_untrusted_rows(root: Path, public: HostileHTTP, internal: HostileHTTP) -> dict:
    """Media, routes and manifests under `root`. Returns {"images": manifest, "videos": manifest
    URL (served over HTTP: a remote manifest), "expect": {kind: [expectation per row]}}; an
    expectation is "ok" or "failed:<reason>"."""
    media, private = root / "media", root / "private"
    media.mkdir(parents=True)
    private.mkdir()
    for i in range(3):
        (media / f"good{i}.png").write_bytes(_png(i))
    (private / "secret.png").write_bytes(_png(9))  # a valid image: only the rules keep it out
    os.symlink(private / "secret.png", media / "link_out.png")
    os.symlink(media / "good1.png", media / "link_in.png")
    png = _png(3)
    internal.route("/latest/meta-data/iam", body=png)
    public.route("/a.png", body=png)
    public.route("/b.png", body=_png(4))
    public.route("/noai.png", body=png, headers={"X-Robots-Tag": "noai, noarchive"})
    public.route("/ours.png", body=png, headers={"X-Robots-Tag": "higen-prep: noimageai"})
    public.route("/theirs.png", body=_png(5), headers={"X-Robots-Tag": "otherbot: noai"})
    public.route("/drip.png", body=png, drip_s=0.05)  # ~never stalls 1 s, lasts far longer
    public.route("/hop", status=302, headers={"Location": "/to-internal"})
    public.route("/to-internal", status=301, headers={"Location": internal.url("/latest/meta-data/iam")})
    public.route("/to-b", status=302, headers={"Location": "/b.png"})
    signed = "?X-Amz-Credential=AKIASECRETKEY%2F20250101&X-Amz-Date=20250101T000000Z&X-Amz-Signature="
    mapped = internal.url("/latest/meta-data/iam").replace("127.0.0.2", "[::ffff:127.0.0.2]")
    images = [
        ("good0.png", "ok"),
        ("../private/secret.png", "failed:forbidden_path"),
        (str(private / "secret.png"), "failed:forbidden_path"),
        ("link_out.png", "failed:forbidden_path"),
        ("link_in.png", "ok"),
        ("/etc/passwd", "failed:forbidden_path"),
        ("file:///etc/passwd", "failed:forbidden_path"),
        ("local:///etc/passwd", "failed:forbidden_path"),
        ("memory://bucket/a.png", "failed:forbidden_path"),
        (internal.url("/latest/meta-data/iam"), "failed:blocked_address"),
        (public.url("/hop"), "failed:blocked_address"),
        (mapped, "failed:blocked_address"),
        (public.url("/noai.png"), "failed:opted_out"),
        (public.url("/ours.png"), "failed:opted_out"),
        (public.url("/theirs.png"), "ok"),
        (public.url("/drip.png"), "failed:timeout"),
        (public.url("/a.png") + signed + "SECRETSIG1&w=1", "ok"),
        # The same object signed again later: same redacted URL, same key -> a duplicate.
        (
            public.url("/a.png") + signed.replace("20250101T", "20250202T") + "SECRETSIG2&w=1",
            "failed:duplicate",
        ),
        (public.url("/missing.png") + "?sv=1&sig=SECRETSAS3&se=2030", "failed:not_found"),
        (public.url("/to-b") + "?token=SECRETTOKEN4", "ok"),
        ("good2.png", "ok"),
    ]
    pd.DataFrame(
        {"image": [r[0] for r in images], "caption": [f"row {i}" for i in range(len(images))]}
    ).to_parquet(media / "images.parquet", index=False)
    # A remote manifest gets no local roots: its local paths fail, its relative rows are URLs.
    videos = [
        (str(media / "good0.png"), "failed:forbidden_path"),
        ("clips/absent.mp4", "failed:not_found"),
    ]
    public.route(
        "/manifests/videos.parquet",
        body=pd.DataFrame({"video": [r[0] for r in videos], "caption": ["v0", "v1"]}).to_parquet(index=False),
    )
    return {
        "images": str(media / "images.parquet"),
        "videos": public.url("/manifests/videos.parquet"),
        "expect": {"images": [r[1] for r in images], "videos": [r[1] for r in videos]},
        "sources": {"images": [r[0] for r in images], "videos": [r[0] for r in videos]},
    }


@pytest.fixture(scope="module")
def untrusted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    with HostileHTTP("127.0.0.1") as public, HostileHTTP("127.0.0.2") as internal:
        corpus = build_untrusted_rows(root, public, internal)
        out = root / "out"
        cmd = prep_cmd(
            str(out),
            corpus["videos"],
            corpus["images"],
            "http.blocked_networks=[127.0.0.2/32]",
            "http.timeout_s=1",
            "http.retries=1",
            "http.backoff_s=0.05",
        )
        rc = run(cmd, root / "prep.log", timeout=600)
        internal_hits = sum(internal.hits.values())
        public.settle("/drip.png")
        corpus["drip_completed"] = public.completed["/drip.png"]
    return corpus, out, rc, (root / "prep.log").read_text(errors="replace"), internal_hits


def test_every_untrusted_row_fails_with_its_reason_and_the_job_goes_on(untrusted_run):
    corpus, out, rc, log, _ = untrusted_run
    assert rc == 0, log[-3000:]
    for kind in ("images", "videos"):
        status = status_rows(out, kind)
        expect = corpus["expect"][kind]
        assert len(status) == len(expect)  # every row exactly once, in manifest order
        got = [row.status if row.status == "ok" else f"failed:{row.reason}" for row in status.itertuples()]
        assert got == expect, list(zip(status.source, got, status.detail))
        for row in status.itertuples():
            assert row.status == "ok" or (row.reason in REASONS and row.detail), row
        stats = [json.loads(p.read_text()) for p in sorted((out / kind).glob("*.json"))]
        assert sum(s["rows"] for s in stats) == len(expect)
    details = status_rows(out, "images").detail  # each message names the setting to widen
    assert "manifest.allowed_roots" in details[5] and "manifest.allowed_roots" in details[3]
    assert "manifest.allowed_protocols" in details[7] and "http.allowed_networks" in details[10]
    assert json.loads((out / "dataset.json").read_text())["complete"] is True
    assert corpus["drip_completed"] == 0  # each attempt hung up on the dripping body mid-way


def test_the_internal_host_is_never_contacted(untrusted_run):
    assert untrusted_run[4] == 0


def test_no_signature_reaches_outputs_or_log_and_keys_hash_the_redacted_url(untrusted_run):
    corpus, out, rc, log, _ = untrusted_run
    assert rc == 0, log[-3000:]
    leaks = [
        (str(path.relative_to(out)), secret)
        for path in sorted(p for p in out.rglob("*") if p.is_file())
        for secret in SECRETS
        if secret.encode() in path.read_bytes()
    ]
    assert leaks == []
    assert [s for s in SECRETS if s in log] == []
    status = status_rows(out, "images")
    signed = corpus["sources"]["images"][16]
    row = status.iloc[16]
    assert row.source == redact_url(signed) and row.key == sample_key(redact_url(signed))
    assert "X-Amz-Signature=REDACTED" in row.source
    members = {}
    for tar in sorted((out / "images").glob("*.tar")):
        members.update(dict(tar_members(tar.read_bytes())))
        check_members(tar_members(tar.read_bytes()))
    meta = json.loads(members[f"{row.key}.json"])
    assert meta["source"] == row.source
    assert status.iloc[17].key == row.key  # the re-signed URL: same key, failed as duplicate
    ok_keys = set(status[status.status == "ok"].key)
    with tarfile.open(sorted((out / "images").glob("*.tar"))[0]) as tar:
        assert {m.name.split(".", 1)[0] for m in tar.getmembers()} <= ok_keys
