"""Fast checks of checkpoint discovery, trust, redaction and metrics logging (no launcher)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core.checkpoints import COMPLETE, UntrustedCheckpointError, check_complete, check_trusted
from core.redact import REDACTED, redact_secrets
from training.metrics import MetricsLog, reduce_step


def fake_checkpoint(root: Path) -> Path:
    ckpt = root / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    files = {
        "mp_rank_00_model_states.pt": b"m" * 10,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o" * 20,
        "rank_00000.json": b"{}",
    }
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
    meta = {"step": 4, "world_size": 1, "files": {k: len(v) for k, v in files.items()}}
    (ckpt / COMPLETE).write_text(json.dumps(meta))
    return ckpt


def test_check_complete_verifies_recorded_sizes(tmp_path):
    ckpt = fake_checkpoint(tmp_path)
    assert check_complete(ckpt) is None
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 7)  # truncated
    why = check_complete(ckpt)
    assert why is not None and "7 bytes" in why and "recorded 20" in why


def test_untrusted_checkpoints_outside_the_output(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "other_run")
    check_trusted(ckpt, tmp_path / "other_run", trust=False)  # the run's own checkpoint
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        check_trusted(ckpt, tmp_path / "my_run", trust=False)
    with pytest.raises(UntrustedCheckpointError):  # a sibling whose name merely starts alike
        check_trusted(ckpt, tmp_path / "other", trust=False)
    check_trusted(ckpt, tmp_path / "my_run", trust=True)


def test_redact_secrets_keeps_the_rest():
    options = {
        "key": "AKIA1",
        "secret": "s",
        "token": None,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_secret_access_key": "x"},
        "headers": [{"Authorization": "Bearer y"}],
        "account_key": "z",
        "anon": False,
    }
    out = redact_secrets(options)
    assert out["key"] == out["secret"] == out["account_key"] == REDACTED
    assert out["token"] is None and out["anon"] is False
    kwargs = {"endpoint_url": "http://127.0.0.1:9000", "aws_secret_access_key": REDACTED}
    assert out["client_kwargs"] == kwargs
    assert out["headers"] == [{"Authorization": REDACTED}]
    assert options["key"] == "AKIA1"  # a copy


def test_nan_loss_is_logged_as_nan_and_a_missing_role_as_null(tmp_path, capsys):
    import torch

    red = reduce_step("video", float("nan"), 2, 0.0, 1.0, False, torch.device("cpu"))
    assert red["loss_image"] is None and math.isnan(red["loss_video"]) and red["nonfinite_ranks"] == 1
    log = MetricsLog(tmp_path, True, tensorboard=False, log_every=1)
    record = {"step": 1, "loss_image": None, "loss_video": red["loss_video"], "lr": 1e-4, "grad_norm": 1.0}
    record.update(samples_per_s=1.0, data_wait_fraction=0.0, step_time=1.0, skipped=1)
    log.log(record)
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert '"loss_image": null' in line and '"loss_video": NaN' in line
    assert math.isnan(json.loads(line)["loss_video"])
    assert "vid nan" in capsys.readouterr().out
