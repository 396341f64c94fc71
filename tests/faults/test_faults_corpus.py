"""Hostile corpus (issue 8): ~50 rows of broken and odd media and captions through the real
job (`python -m pipeline.prep` in a subprocess, tiny config). Every manifest row is accounted
for exactly once, good ones ok, bad ones failed with a known reason code, and whatever the
manifest holds the tars only contain `<hex key>.<ext>` members with unique keys and no pickles."""

from __future__ import annotations

import json

import pytest

from core.shard_format import REASONS
from preprocessing.process import clean_caption
from testing.hostile import build_hostile_corpus
from testing.prep_job import check_members, prep_cmd, run, status_rows, tar_members

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
        wrong = []
        for i, row in status.iterrows():
            what = f"{kind} row {i} ({row.source!r}): {row.status} {row.reason} {row.detail}"
            assert row.status in ("ok", "failed"), what
            if row.status == "failed":
                assert row.reason in REASONS and row.detail, what
            else:
                assert row.reason is None or pd.isna(row.reason), what
            assert expect[i] == "ok" or expect[i][7:] in REASONS, f"bad expectation {expect[i]!r}"
            got = "ok" if row.status == "ok" else f"failed:{row.reason}"
            if got != expect[i]:
                wrong.append(f"expected {expect[i]}, got {what}"[:400])
        assert not wrong, "\n".join(wrong)  # every row has its one exact outcome
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
        texts: dict[str, str] = {}
        for tar in sorted((out / kind).glob("*.tar")):
            members = tar_members(tar.read_bytes())
            keys += check_members(members)
            texts.update((name[:-4], data.decode("utf-8")) for name, data in members if name.endswith(".txt"))
        assert len(keys) == len(set(keys)), "a key appears twice"
        ok = status[status.status == "ok"]
        assert keys == ok.key.tolist()
        # Odd captions (control characters, paths, unicode, 100 kB) arrive cleaned, not mangled.
        assert [texts.get(k) for k in ok.key] == [clean_caption(c, s) for c, s in zip(ok.caption, ok.source)]
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.parent.name not in ("videos", "images")
                 and "_plan" not in p.relative_to(out).parts]  # the planner's own files
    assert sorted(p.name for p in leftovers) == ["dataset.json", "index.parquet"], leftovers
