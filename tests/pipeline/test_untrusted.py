"""Untrusted manifests (issue 16), the rules without the network: local paths confined to their
roots, protocols, signed-URL redaction (stored sources, keys, plans), config errors, and
widening a rule then `--retry-failed`. Addresses, deadline and opt-outs (the HTTP client) are
tested in `test_untrusted_http.py`."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from core.config import ConfigError, load_config
from core.shard_format import REASONS, SampleError, sample_key
from pipeline.config import PrepConfig
from pipeline.manifest import Manifest, ManifestError, ShardPlanner
from pipeline.untrusted import (
    SourcePolicy,
    redact_text,
    redact_url,
)

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "prep" / "tiny.yaml")


def test_new_reason_codes_are_registered():
    assert {"forbidden_path", "blocked_address", "opted_out"} <= set(REASONS)


# ------------------------------------------------------------------------- local paths, protocols


def test_local_paths_stay_inside_their_roots(tmp_path):
    root, outside = tmp_path / "media", tmp_path / "private"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(b"x")
    (outside / "secret.png").write_bytes(b"x")
    os.symlink(outside / "secret.png", root / "link_out.png")
    os.symlink(root / "sub" / "a.png", root / "link_in.png")
    policy = SourcePolicy(roots=(os.path.realpath(root),))
    for ok in (root / "sub" / "a.png", root / "link_in.png", root / "sub" / ".." / "sub" / "a.png"):
        policy.check(str(ok))
    refused = [
        str(outside / "secret.png"),
        str(root / "sub" / ".." / ".." / "private" / "secret.png"),
        str(root / "link_out.png"),
        "/etc/passwd",
        "file:///etc/passwd",
        f"file://{root}/link_out.png",
        "FILE:///etc/passwd",
        "local:///etc/passwd",
        "memory://x/a.png",
        "simplecache::s3://bucket/a.png",
        "ftp://127.0.0.1/a.png",
    ]
    for source in refused:
        with pytest.raises(SampleError) as info:
            policy.check(source)
        assert info.value.reason == "forbidden_path", source
        assert "manifest.allowed_" in info.value.detail, source
    policy.check("s3://bucket/a.png")
    policy.check("https://example.test/a.png")
    with pytest.raises(SampleError, match="manifest.allowed_roots"):
        SourcePolicy(roots=()).check(str(root / "sub" / "a.png"))  # a remote manifest: no local files
    with pytest.raises(SampleError, match="allowed_protocols"):
        SourcePolicy(protocols=("http", "https"), roots=(str(root),)).check("s3://bucket/a.png")


def test_manifest_roots_default_to_its_folder_and_none_when_remote(tmp_path):
    import fsspec

    cfg = load_config(PrepConfig, TINY).manifest
    (tmp_path / "parts").mkdir()
    frame = pd.DataFrame({"video": ["a.mp4"], "caption": ["c"]})
    frame.to_parquet(tmp_path / "parts" / "m.parquet")
    assert Manifest(str(tmp_path / "parts" / "m.parquet"), "videos", cfg, {}).roots == (
        os.path.realpath(tmp_path / "parts"),
    )
    assert Manifest(str(tmp_path / "parts"), "videos", cfg, {}).roots == (
        os.path.realpath(tmp_path / "parts"),
    )
    with fsspec.open("memory://bucket/m.parquet", "wb") as fh:
        frame.to_parquet(fh)
    assert Manifest("memory://bucket/m.parquet", "videos", cfg, {}).roots == ()
    wide = load_config(PrepConfig, TINY, [f"manifest.allowed_roots=[{tmp_path}]"]).manifest
    assert Manifest("memory://bucket/m.parquet", "videos", wide, {}).roots == (os.path.realpath(tmp_path),)
    absent = load_config(PrepConfig, TINY, [f"manifest.allowed_roots=[{tmp_path / 'nope'}]"]).manifest
    with pytest.raises(ManifestError, match="nope"):
        Manifest(str(tmp_path / "parts" / "m.parquet"), "videos", absent, {})


# ------------------------------------------------------------------------- signed URLs


SIGNED = (
    "https://bucket.s3.amazonaws.com/clips/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20250101T000000Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE"
    "&X-Amz-Signature=0123456789abcdef&width=640"
)


def test_redaction_hides_secrets_and_keeps_the_rest_verbatim():
    shown = redact_url(SIGNED)
    for secret in ("AKIAEXAMPLE", "FwoGZXIvYXdzEXAMPLE", "0123456789abcdef", "20250101T000000Z"):
        assert secret not in shown
    assert shown.startswith("https://bucket.s3.amazonaws.com/clips/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&")
    assert "X-Amz-Signature=REDACTED" in shown and shown.endswith("&width=640")
    resigned = SIGNED.replace("0123456789abcdef", "fedcba9876543210").replace("20250101T", "20250202T")
    assert redact_url(resigned) == shown and sample_key(redact_url(resigned)) == sample_key(shown)
    cdn = "https://d111.cloudfront.net/a.jpg?Expires=1700000000&Signature=abc~def&Key-Pair-Id=K2JCJMDEHXQW5F"
    assert (
        redact_url(cdn)
        == "https://d111.cloudfront.net/a.jpg?Expires=REDACTED&Signature=REDACTED&Key-Pair-Id=REDACTED"
    )
    sas = "https://acct.blob.core.windows.net/c/a.png?sv=2022-11-02&se=2025-01-01&sp=r&SIG=abc%3D&x=1#frag"
    assert (
        redact_url(sas)
        == "https://acct.blob.core.windows.net/c/a.png?sv=2022-11-02&se=REDACTED&sp=REDACTED&SIG=REDACTED&x=1#frag"
    )
    assert (
        redact_url("https://user:hunter2@host.test/a.png?token=t0k")
        == "https://user:REDACTED@host.test/a.png?token=REDACTED"
    )
    assert redact_url("/data/what?token=x.png") == "/data/what?token=x.png"  # a local file name
    assert redact_url(SIGNED, params=["width"]).endswith("width=REDACTED")
    text = f"GET {SIGNED} failed; redirected to https://u:pw@h.test/x?sig=abc&n=1"
    cleaned = redact_text(text)
    assert "0123456789abcdef" not in cleaned and "pw@" not in cleaned and "sig=REDACTED&n=1" in cleaned


def test_plans_store_redacted_sources_and_fetch_the_signed_url(tmp_path):
    cfg = load_config(PrepConfig, TINY).manifest
    other = SIGNED.replace("0123456789abcdef", "ffff")
    rows = [SIGNED, "https://img.test/plain.png", "https://img.test/b.png?token=abc", other, "local.png"]
    pd.DataFrame({"image": rows, "caption": ["c"] * 5}).to_parquet(tmp_path / "m.parquet")
    planner = ShardPlanner(Manifest(str(tmp_path / "m.parquet"), "images", cfg, {}), 2)
    plans = [p.materialize() for p in planner.run()]
    sources = [s for p in plans for s in p.sources]
    assert sources[:4] == [
        redact_url(SIGNED),
        rows[1],
        "https://img.test/b.png?token=REDACTED",
        redact_url(SIGNED),
    ]
    assert sources[4] == str(tmp_path / "local.png")
    fetch = {p.first_row + pos: url for p in plans for pos, url in p.fetch_urls.items()}
    assert fetch == {0: SIGNED, 2: rows[2], 3: other}
    assert all(p.roots == (os.path.realpath(tmp_path),) for p in plans)


# ------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "override, needle",
    [
        ("http.blocked_networks=[10.0.0.1/8]", "'10.0.0.1/8'"),
        ("http.blocked_networks=[not-a-network]", "'not-a-network'"),
        ("http.allowed_networks=[300.1.1.1/32]", "'300.1.1.1/32'"),
        ("http.blocked_networks=10.0.0.0/8", "http.blocked_networks"),
        ("manifest.allowed_roots=[relative/media]", "'relative/media'"),
        ("manifest.allowed_roots=[s3://bucket/media]", "'s3://bucket/media'"),
        ("manifest.allowed_protocols=[HTTP]", "'HTTP'"),
    ],
)
def test_malformed_settings_are_config_errors_naming_the_value(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(PrepConfig, TINY, [override])
    assert needle in str(info.value)
    assert override.split("=", 1)[0] in str(info.value)


def test_missing_root_is_a_preflight_error(prep, synthetic, tmp_path, capsys):
    argv = ["--videos", str(synthetic / "ten.parquet"), "--out", str(tmp_path / "out")]
    assert prep(*argv, f"manifest.allowed_roots=[{tmp_path / 'absent'}]") == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err
    assert not (tmp_path / "out" / "videos").exists()


@pytest.mark.slow
def test_widening_a_rule_then_retry_failed_redoes_only_the_refused_rows(
    synthetic, ray_session, prep, tmp_path
):
    """The policy settings are not in the fingerprint: widen, rerun with --retry-failed."""
    good = pd.read_parquet(synthetic / "good_images.parquet")[:3]
    (tmp_path / "own.png").write_bytes((synthetic / "images" / Path(good.image.iloc[0]).name).read_bytes())
    rows = pd.concat([pd.DataFrame([{"image": "own.png", "caption": "next to the manifest"}]), good])
    rows.to_parquet(tmp_path / "m.parquet", index=False)
    argv = ["--images", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "out")]
    assert prep(*argv) == 0
    table = pd.read_parquet(tmp_path / "out" / "images" / "000000.parquet")
    assert table.status.tolist() == ["ok"] + ["failed"] * 3 and set(table.reason[1:]) == {"forbidden_path"}
    assert prep(*argv, "--retry-failed", f"manifest.allowed_roots=[{tmp_path},{synthetic}]") == 0
    again = pd.read_parquet(tmp_path / "out" / "images" / "000000.parquet")
    assert again.status.tolist() == ["ok"] * 4 and again.key.tolist() == table.key.tolist()
