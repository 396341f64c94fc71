"""S3 end to end, as users run it against AWS (issue 7): manifests and media in one bucket, the
Ray preprocessing job writes shards to another, DeepSpeed training streams them from the
bucket and checkpoints locally, and the report reads the bucket.

The S3 API is moto's server on 127.0.0.1; every command reaches it through s3fs exactly as it
would reach AWS. Credentials come only from a standard AWS shared-credentials file and the
endpoint from the standard `AWS_ENDPOINT_URL` variable: no project config names them. The
secret must never appear in logs, config dumps or outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testing.net import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SECRET = "sEcReT-do-not-log-7f3a9c"
KEY_ID = "AKIDHIGENE2ETEST"

pytestmark = pytest.mark.slow


@pytest.fixture
def aws_env(tmp_path, moto_s3):
    host, port = moto_s3.host_port
    creds = tmp_path / "aws_credentials"
    creds.write_text(f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(creds),
        AWS_CONFIG_FILE=str(tmp_path / "aws_config_absent"),
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_DEFAULT_REGION="us-east-1",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("RAY_ADDRESS", None)
    yield env


def _run(cmd: list[str], env: dict, log: list[str], timeout: int = 600) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _s3fs(env: dict):
    import s3fs

    return s3fs.S3FileSystem(
        key=KEY_ID, secret=SECRET, client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}
    )


def test_s3_preprocess_train_report(aws_env, tmp_path):
    env, logs = aws_env, []
    raw = tmp_path / "raw"
    _run([PY, "-m", "preprocessing.synthetic", "--out", str(raw), "--videos", "6", "--images", "4",
          "--seconds", "2"], env, logs)

    # Upload media and manifests that point at the bucket (as a user's corpus on S3 would).
    import pandas as pd

    fs = _s3fs(env)
    fs.mkdir("media")
    fs.mkdir("shards")
    for kind, col in (("videos", "video"), ("images", "image")):
        table = pd.read_parquet(raw / f"{kind}.parquet")
        remote = []
        for local in table[col]:
            name = f"media/{kind}/{Path(local).name}"
            fs.put_file(local, name)
            remote.append(f"s3://{name}")
        table[col] = remote
        local_manifest = tmp_path / f"{kind}.parquet"
        table.to_parquet(local_manifest)
        fs.put_file(str(local_manifest), f"media/{kind}.parquet")

    out = "s3://shards/demo"
    _run([PY, "-m", "pipeline.prep", "--config", "configs/prep/tiny.yaml",
          "--videos", "s3://media/videos.parquet", "--images", "s3://media/images.parquet",
          "--out", out], env, logs)
    listing = fs.ls("shards/demo/videos")
    assert any(p.endswith("000000.tar") for p in listing) and any(p.endswith("000000.json") for p in listing)
    statuses = pd.concat(
        [pd.read_parquet(fs.open(p)) for p in fs.glob("shards/demo/*/*.parquet")], ignore_index=True
    )
    assert len(statuses) == 10 and (statuses.status == "ok").all(), statuses[["source", "reason", "detail"]]

    run = tmp_path / "run"
    _run([str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
          "training/train.py", "--config", "configs/train/tiny.yaml", "--data", out, "--output", str(run),
          "--max-steps", "2", "--save-every", "2", "--resume", "none", "roles.image_ranks=1",
          "data.num_workers=1"], env, logs, timeout=900)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][-1] == 2
    assert all(m["loss_image"] > 0 and m["loss_video"] > 0 for m in metrics)
    assert (run / "checkpoints" / "latest").exists()

    report = tmp_path / "report"
    _run([PY, "-m", "pipeline.report", out, "--out", str(report)], env, logs)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["source"] == out and (report / "index.html").exists()
    # What the report read back from the bucket: every shard, row and sample, nothing failed.
    # tiny.yaml: 4 samples per shard, 8 frames per clip.
    for kind, shards, rows in (("videos", 2, 6), ("images", 1, 4)):
        got = summary["kinds"][kind]
        assert (got["shards"], got["incomplete_shards"], got["rows"]) == (shards, [], rows), got
        assert (got["status"], got["reasons"], got["samples_in_tars"]) == ({"ok": rows}, {}, rows), got
        assert got["unreadable_members"] == {}, got
    videos = summary["kinds"]["videos"]
    assert videos["clips_with_factors"] == 6 and videos["frames"]["min"] == videos["frames"]["max"] == 8

    # The secret never leaks: not in any log line, config dump or written file.
    dumps = [p for p in list(run.rglob("*")) + list(report.rglob("*")) if p.is_file()
             and p.suffix in {".json", ".jsonl", ".yaml", ".md", ".html", ".txt", ".log"}]
    dumps_text = "".join(p.read_text(errors="ignore") for p in dumps)
    dataset_json = fs.cat("shards/demo/dataset.json").decode()
    places = ((" ".join(logs), "logs"), (dumps_text, "run/report files"), (dataset_json, "dataset.json"))
    for text, what in places:
        assert SECRET not in text, f"the AWS secret leaked into {what}"
