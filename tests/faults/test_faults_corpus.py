"""Hostile corpus (issue 8): ~50 rows of broken and odd media and captions through the real
job (`python -m pipeline.prep` in a subprocess, tiny config). Every manifest row is accounted
for exactly once, good ones ok, bad ones failed with a known reason code, and whatever the
manifest holds the tars only contain `<hex key>.<ext>` members with unique keys and no pickles."""

from __future__ import annotations

import json

import pytest
from faultlib import build_hostile_corpus, check_members, prep_cmd, run, status_rows, tar_members

from core.shard_format import REASONS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    corpus = build_hostile_corpus(root / "media")
    out = root / "out"
    rc = run(prep_cmd(str(out), corpus["videos"], corpus["images"]), root / "prep.log", timeout=600)
    return corpus, out, rc, (root / "prep.log").read_text(errors="replace")


def test_corpus_has_at_least_20_kinds(hostile_run):
    corpus = hostile_run[0]
    assert len(set(corpus["kinds"])) >= 20, corpus["kinds"]


def test_every_row_accounted_for_once(hostile_run):
    corpus, out, rc, log = hostile_run
    assert rc == 0, log[-3000:]
    import pandas as pd

    for kind in ("videos", "images"):
        manifest = pd.read_parquet(corpus[kind])
        status = status_rows(out, kind)
        expect = corpus["expect"][kind]
        # Exactly once, in manifest order (shard N = rows N*S..): nothing dropped, nothing doubled.
        assert len(status) == len(manifest) == len(expect)
        column = "video" if kind == "videos" else "image"
        wanted = [s if isinstance(s, str) else "" for s in manifest[column]]
        assert [s if isinstance(s, str) else "" for s in status.source] == wanted
        for i, row in status.iterrows():
            what = f"{kind} row {i} ({row.source!r}): {row.status} {row.reason} {row.detail}"
            assert row.status in ("ok", "failed"), what
            if row.status == "failed":
                assert row.reason in REASONS and row.detail, what
            else:
                assert row.reason is None or pd.isna(row.reason), what
            if expect[i] == "ok":
                assert row.status == "ok", what
            elif expect[i] == "failed":
                assert row.status == "failed", what
            elif expect[i].startswith("failed:"):
                assert (row.status, row.reason) == ("failed", expect[i][7:]), what
        stats = [json.loads(p.read_text()) for p in sorted((out / kind).glob("*.json"))]
        assert sum(s["rows"] for s in stats) == len(manifest)
        assert sum(s["ok"] for s in stats) == int((status.status == "ok").sum())
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["complete"] is True


def test_tar_members_safe_unique_and_pickle_free(hostile_run):
    corpus, out, rc, log = hostile_run
    assert rc == 0, log[-3000:]
    for kind in ("videos", "images"):
        status = status_rows(out, kind)
        keys: list[str] = []
        for tar in sorted((out / kind).glob("*.tar")):
            keys += check_members(tar_members(tar.read_bytes()))
        assert len(keys) == len(set(keys)), "a key appears twice"
        assert keys == status[status.status == "ok"].key.tolist()
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.parent.name not in ("videos", "images")]
    assert [p.name for p in leftovers] == ["dataset.json"], leftovers
