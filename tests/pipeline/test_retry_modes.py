"""Retries that tell infrastructure from data: plain `--retry-failed` redoes transient
failures (a 503 after http.retries), `--retry-failed=all` every failure (a 404 too); an encoder
actor that dies mid-shard makes Ray retry the task and never commits encode failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from core.shards import PERMANENT_REASONS, POLICY_REASONS, REASONS, TRANSIENT_REASONS
from pipeline.preflight import JobArgs, JobError
from pipeline.prep import parse_args
from pipeline.retry import kept_failure, redone, retry_mode, shards_to_retry
from testing.hostile_http import HostileHTTP

HTTP = ["http.retries=0", "http.timeout_s=5", "http.allowed_networks=[127.0.0.1/32]"]


def test_reason_codes_are_split():
    assert TRANSIENT_REASONS | POLICY_REASONS | PERMANENT_REASONS == set(REASONS)
    assert not TRANSIENT_REASONS & PERMANENT_REASONS
    assert {"timeout", "download_error", "internal_error"} <= TRANSIENT_REASONS
    assert {"not_found", "decode_error", "too_short", "missing_file"} <= PERMANENT_REASONS


def test_modes_choose_the_failures_redone():
    assert [retry_mode(v) for v in (False, None, True, "transient", "all")] == [
        None, None, "transient", "transient", "all"]
    with pytest.raises(ValueError, match="--retry-failed='sometimes'"):
        retry_mode("sometimes")
    with pytest.raises(JobError, match="transient, all"):
        JobArgs(out="x", retry_failed="sometimes")
    assert JobArgs(out="x", retry_failed=True).retry_failed == "transient"
    assert redone("download_error", "transient") and redone("blocked_address", "transient")
    assert not redone("not_found", "transient") and redone("not_found", "all")
    assert not redone("too_short", None)
    stats = [dict(shard="000000", failed=1, reasons={"not_found": 1}),
             dict(shard="000001", failed=2, reasons={"not_found": 1, "timeout": 1}),
             dict(shard="000002", failed=0, reasons={})]
    assert shards_to_retry(stats, "transient") == {1}
    assert shards_to_retry(stats, "all") == {0, 1}
    assert shards_to_retry(stats, None) == set()
    row = dict(reason="too_short", detail="d", width=64, height=48, duration=0.5)
    assert kept_failure(row) == ("failed", "too_short", "d", {"original_size": [64, 48], "duration": 0.5})


def test_cli_retry_failed_with_and_without_a_value():
    base = ["--out", "o"]
    assert parse_args([*base]).retry_failed is None
    bare = parse_args([*base, "--retry-failed", "http.retries=0"])
    assert bare.retry_failed == "transient" and bare.overrides == ["http.retries=0"]
    assert parse_args([*base, "--retry-failed=all"]).retry_failed == "all"
    assert parse_args(["--retry-failed=transient", *base]).retry_failed == "transient"
    with pytest.raises(SystemExit):
        parse_args([*base, "--retry-failed=bogus"])


@pytest.mark.slow
def test_503_redone_by_plain_retry_404_only_by_all(synthetic, ray_session, prep, tmp_path, capsys):
    png = next((synthetic / "images").glob("*.png")).read_bytes()
    with HostileHTTP("127.0.0.1") as server:
        urls = [server.route("/a.png", body=png), server.route("/busy.png", status=503, body=b"busy"),
                server.route("/gone.png", status=404, body=b"gone")]
        pd.DataFrame({"image": urls, "caption": ["a", "b", "c"]}).to_parquet(tmp_path / "m.parquet")
        argv = ["--images", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "out"), *HTTP]
        assert prep(*argv) == 0
        assert "1 of them transient or refused by a rule: --retry-failed" in capsys.readouterr().out
        table = pd.read_parquet(tmp_path / "out" / "images" / "000000.parquet")
        assert table.status.tolist() == ["ok", "failed", "failed"]
        assert table.reason.tolist()[1:] == ["download_error", "not_found"]
        # Both servers recover; plain --retry-failed asks again for the 503 only.
        server.route("/busy.png", body=png)
        server.route("/gone.png", body=png)
        assert prep(*argv, "--retry-failed") == 0
        table = pd.read_parquet(tmp_path / "out" / "images" / "000000.parquet")
        assert table.status.tolist() == ["ok", "ok", "failed"] and table.reason[2] == "not_found"
        assert "404" in table.detail[2]  # the kept failure keeps its message
        assert (server.hits["/a.png"], server.hits["/busy.png"], server.hits["/gone.png"]) == (1, 2, 1)
        stats = json.loads((tmp_path / "out" / "images" / "000000.json").read_text())
        assert stats["reasons"] == {"not_found": 1} and stats["retried"] is True
        assert prep(*argv, "--retry-failed") == 0  # nothing transient left: the shard is not touched
        assert server.hits["/gone.png"] == 1
        assert prep(*argv, "--retry-failed=all") == 0
        table = pd.read_parquet(tmp_path / "out" / "images" / "000000.parquet")
        assert table.status.tolist() == ["ok"] * 3 and server.hits["/gone.png"] == 2
        assert prep("--images", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "fresh"), *HTTP) == 0
    fresh = tmp_path / "fresh" / "images" / "000000.tar"
    assert (tmp_path / "out" / "images" / "000000.tar").read_bytes() == fresh.read_bytes()


def dying_encoder(marker: Path):
    """An EncoderActor whose first encode call kills its process (as an OOM kill or a lost node
    would); the restarted actor works. Defined in a function so Ray ships it by value."""
    from pipeline.encoder_actor import EncoderActor

    class DyingEncoder(EncoderActor):
        def encode_sync(self, batch, size):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().encode_sync(batch, size)

    return DyingEncoder


@pytest.mark.slow
def test_actor_death_mid_shard_retries_the_task_and_commits_no_failures(
    synthetic, ray_session, prep, tmp_path, monkeypatch
):
    import pipeline.runner

    images = str(synthetic / "good_images.parquet")
    marker = tmp_path / "died"
    monkeypatch.setattr(pipeline.runner, "EncoderActor", dying_encoder(marker))
    actors = ["execution.encoders=1", "execution.gpus_per_encoder=0", "execution.cpus_per_encoder=1"]
    out = tmp_path / "out"
    assert prep("--images", images, "--out", str(out), "--samples-per-shard", "3", *actors) == 0
    assert marker.exists()  # the actor did die, in the middle of a shard
    rows = pd.concat([pd.read_parquet(p) for p in sorted((out / "images").glob("*.parquet"))])
    assert (rows.status == "ok").all() and len(rows) == len(pd.read_parquet(images))
    monkeypatch.undo()
    assert prep("--images", images, "--out", str(tmp_path / "ref"), "--samples-per-shard", "3") == 0
    for tar in sorted((tmp_path / "ref" / "images").glob("*.tar")):
        assert (out / "images" / tar.name).read_bytes() == tar.read_bytes()


def test_a_storage_error_fails_the_task_not_its_rows(synthetic, tmp_path, monkeypatch):
    """An output store failure mid-commit raises TransientTaskError (Dispatch's Ray task retries
    it, as for the actor death above) and commits nothing; the retried run commits every row ok."""
    from core.config import load_config
    from pipeline.config import PrepConfig
    from pipeline.manifest import ShardPlan
    from pipeline.retry import TransientTaskError
    from pipeline.shard import ShardTask
    from pipeline.storage import OutputStore

    cfg = load_config(PrepConfig, str(Path(__file__).parents[2] / "configs/prep/tiny.yaml"), [])
    good = pd.read_parquet(synthetic / "good_images.parquet")[:2]
    plan = ShardPlan(kind="images", index=0, first_row=0, sources=list(good.image),
                     captions=list(good.caption), roots=(str(synthetic),))
    real, failures = OutputStore.publish, []

    def publish_once_broken(self, tmp, final):
        if not failures:
            failures.append(final)
            raise ConnectionResetError("the object store hung up")
        return real(self, tmp, final)

    monkeypatch.setattr(OutputStore, "publish", publish_once_broken)
    task = ShardTask(cfg, str(tmp_path / "out"), "fp")
    with pytest.raises(TransientTaskError, match="storage error: ConnectionResetError"):
        task.run(plan)
    assert failures and not (tmp_path / "out" / "images" / "000000.json").exists()
    stats = task.run(plan)
    assert (stats["ok"], stats["failed"]) == (2, 0)
    assert (tmp_path / "out" / "images" / "000000.json").exists()
