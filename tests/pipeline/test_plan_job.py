"""The planner inside the job (issue 15): CSV manifests converted under OUT/_plan and resumed
incrementally, the dedupe pass across shards and `dedupe=none`, the verification fields in
every shard's stats json, and byte-identical reruns from a multi-file manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def status(out: Path) -> pd.DataFrame:
    files = sorted((out / "images").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.tar"))}


@pytest.fixture
def csv_parts(synthetic, tmp_path):
    """Two CSV files (3 + 2 rows) of good images; row 4 repeats row 0 (another shard)."""
    good = pd.read_parquet(synthetic / "good_images.parquet")
    folder = tmp_path / "manifest"
    folder.mkdir()
    good[:3].to_csv(folder / "part-0.csv", index=False)
    pd.concat([good[3:4], good[:1]]).to_csv(folder / "part-1.csv", index=False)
    return folder, good


def run(prep, synthetic, folder, out, *extra):
    roots = f"manifest.allowed_roots=[{synthetic}]"
    return prep("--images", str(folder / "part-*.csv"), "--out", str(out), "--samples-per-shard", "2",
                roots, *extra)


def test_csv_job_dedupe_resume_and_verification_fields(csv_parts, synthetic, ray_session, prep, tmp_path,
                                                       capsys):
    folder, good = csv_parts
    out = tmp_path / "out"
    assert run(prep, synthetic, folder, out, "--dry-run") == 0
    plan = capsys.readouterr().out
    assert "?" in plan.splitlines()[-1]  # CSV rows are unknown before conversion: nothing read
    assert run(prep, synthetic, folder, out) == 0
    table = status(out)
    assert table.status.tolist() == ["ok", "ok", "ok", "ok", "failed"]
    assert table.reason[4] == "duplicate" and "manifest row 0" in table.detail[4]
    assert len(list((out / "_plan" / "convert").glob("*.parquet"))) == 2
    recorded = json.loads((out / "dataset.json").read_text())["manifest_files"]["images"]
    assert [f["rows"] for f in recorded] == [3, 2]
    # Every stats json names its (file, row range) pieces and a digest of its sources.
    stats = json.loads((out / "images" / "000001.json").read_text())
    assert [(Path(p["file"]).name, p["start"], p["stop"]) for p in stats["pieces"]] == [
        ("part-0.csv", 2, 3), ("part-1.csv", 0, 1)]
    sources = status(out).source.tolist()[2:4]
    assert stats["sources_digest"] == hashlib.sha256("\n".join(sources).encode()).hexdigest()[:32]
    capsys.readouterr()
    assert run(prep, synthetic, folder, out, "--dry-run") == 0
    assert " 5 " in capsys.readouterr().out.splitlines()[-1]  # rows from the conversions' footers

    # An appended CSV file: only the partial last shard (row 4) is redone, plus the new shard.
    before = {p.name: json.loads(p.read_text())["committed_at"] for p in (out / "images").glob("*.json")}
    good[4:6].to_csv(folder / "part-2.csv", index=False)
    assert run(prep, synthetic, folder, out) == 0
    after = {p.name: json.loads(p.read_text())["committed_at"] for p in (out / "images").glob("*.json")}
    assert after["000000.json"] == before["000000.json"] and after["000001.json"] == before["000001.json"]
    assert after["000002.json"] > before["000002.json"] and "000003.json" in after
    assert status(out).status.tolist() == ["ok"] * 4 + ["failed", "ok", "ok"]

    # A changed CSV stops before any work, naming it and the first affected shard.
    good[:2].to_csv(folder / "part-1.csv", index=False)
    capsys.readouterr()
    assert run(prep, synthetic, folder, out) == 2
    err = capsys.readouterr().err
    assert "part-1.csv" in err and "shard 000001" in err


def test_dedupe_none_keeps_cross_shard_repeats_and_reruns_are_byte_identical(
        csv_parts, synthetic, ray_session, prep, tmp_path):
    folder, _ = csv_parts
    assert run(prep, synthetic, folder, tmp_path / "none", "dedupe=none") == 0
    assert status(tmp_path / "none").status.tolist() == ["ok"] * 5
    assert run(prep, synthetic, folder, tmp_path / "a") == 0
    assert run(prep, synthetic, folder, tmp_path / "b") == 0
    assert tars(tmp_path / "a") == tars(tmp_path / "b") and len(tars(tmp_path / "a")) == 3
    assert tars(tmp_path / "a")["000000.tar"] == tars(tmp_path / "none")["000000.tar"]
    assert tars(tmp_path / "a")["000002.tar"] != tars(tmp_path / "none")["000002.tar"]  # row 4
