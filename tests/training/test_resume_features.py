"""Resume under ZeRO 1/2/3, EMA, warmup, gradient accumulation, lr and worker changes, the
non-finite guard, a save failing on one rank, untrusted checkpoints and 4 -> 2 ranks through
Universal Checkpointing: one 2-rank launch of resume_checks.py, asserted here."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainlib import launch, metrics, tail

from training.checkpoint import find_latest_complete
from training.export import export

pytestmark = pytest.mark.slow
LR = 5e-5  # configs/train/tiny.yaml


@pytest.fixture(scope="module")
def checks(dataset, baseline, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume_checks")
    source = baseline / "checkpoints" / "step_0000005"
    args = ["--data", str(dataset), "--out", str(out), "--universal", str(source)]
    done = launch("tests/training/resume_checks.py", 2, args, timeout=1500)
    assert done.returncode == 0 and (out / "done").is_file(), tail(done)
    (out / "stdout.txt").write_text(done.stdout)
    return out


def same_losses(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    keys = ("loss_image", "loss_video", "grad_norm")
    for x, y in zip(a, b):
        assert [x[k] for k in keys] == [y[k] for k in keys], (x, y)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_exact_resume_under_every_zero_stage(checks, stage):
    a, b = metrics(checks / f"zero{stage}" / "a"), metrics(checks / f"zero{stage}" / "b")
    assert [m["step"] for m in a] == [1, 2, 3, 4]
    same_losses(b, a[2:])
    assert len({m["loss_video"] for m in a}) == 4  # the losses do move: equality is not vacuous


def test_warmup_and_gradient_accumulation(checks):
    """ZeRO-1, GA 2, warmup 3: lr (1/3, 2/3, 1, 1)·lr, one optimiser step and 2 micro-batches per
    step; the resume at step 2 continued the warmup (see the exact-resume test)."""
    a = metrics(checks / "zero1" / "a")
    assert [m["lr"] for m in a] == pytest.approx([LR / 3, 2 * LR / 3, LR, LR], rel=1e-9)
    assert [m["lr"] for m in metrics(checks / "zero1" / "b")] == pytest.approx([LR, LR], rel=1e-9)
    assert all(m["samples"] == 2 * (2 + 4) for m in a)  # 2 x (video micro 2 + image micro 4)
    assert json.loads((checks / "zero1" / "optimizer_steps.json").read_text()) == {"a": 4, "b": 4}


def test_ema_values_and_resume(checks):
    trace = torch.load(checks / "zero2" / "a_trace.pt")
    params, ema = trace["params"], trace["ema"]
    want = {n: t.clone() for n, t in params[0].items()}
    for step in params[1:]:
        for n in want:
            want[n] = 0.5 * want[n] + 0.5 * step[n]
    moved = 0
    for n in want:
        torch.testing.assert_close(ema[n], want[n], rtol=1e-6, atol=1e-7, msg=n)
        moved += not torch.equal(ema[n], params[-1][n])
    assert moved > len(want) // 2  # EMA differs from the raw weights
    resumed = torch.load(checks / "zero2" / "b_state.pt")["ema"]
    for n in ema:
        assert torch.equal(resumed[n], ema[n]), n


def test_lr_change_on_resume(checks):
    a, lr = metrics(checks / "zero2" / "a"), metrics(checks / "zero2" / "lr")
    assert [m["lr"] for m in lr] == [1e-3, 1e-3]
    assert torch.load(checks / "zero2" / "lr_state.pt")["lr_groups"] == [1e-3]
    same_losses(lr[:1], a[2:3])  # step 3's loss uses the restored step-2 weights
    assert lr[1]["loss_video"] != a[3]["loss_video"]  # step 4 follows the new lr


def test_loader_worker_change_rederives_streams(checks):
    """2 -> 1 and 2 -> 0 workers: positions cannot carry over; streams re-derive from (seed,
    rank, step), deterministically (1 and 0 workers both mean one stream per rank)."""
    out = (checks / "stdout.txt").read_text()
    assert "num_workers 2 -> 1" in out and "num_workers 2 -> 0" in out
    w1, w0 = metrics(checks / "zero2" / "w1"), metrics(checks / "zero2" / "w0")
    same_losses(w1, w0)
    assert [m["step"] for m in w1] == [3]
    for name in ("w1", "w0"):
        assert torch.load(checks / "zero2" / f"{name}_state.pt")["generations"] == [2]
    assert torch.load(checks / "zero2" / "b_state.pt")["generations"] == [0]  # same workers: kept


def test_nonfinite_loss_or_gradient_skips_the_step_everywhere_and_stops(checks):
    m = {r["step"]: r for r in metrics(checks / "nan" / "a")}
    assert sorted(m) == [1, 2, 3, 4, 5]
    assert [m[s]["skipped"] for s in sorted(m)] == [0, 1, 0, 1, 1]
    assert [m[s]["skipped_steps"] for s in sorted(m)] == [0, 1, 1, 2, 3]
    for s in (2, 5):  # rank 1 (image) had a NaN loss
        assert math.isnan(m[s]["loss_image"]) and math.isfinite(m[s]["loss_video"])
    assert math.isfinite(m[4]["loss_image"]) and math.isfinite(m[4]["loss_video"])  # inf gradient
    out = (checks / "stdout.txt").read_text()
    assert "step 4: optimiser step skipped on every rank (non-finite gradient norm)" in out
    assert "step 5: optimiser step skipped on every rank (non-finite loss on rank(s) [1])" in out
    raw = (checks / "nan" / "a" / "metrics.jsonl").read_text().splitlines()
    assert '"loss_image": NaN' in raw[1] and "null" not in raw[1]
    after = torch.load(checks / "nan" / "a_trace.pt")  # params after steps 1..4
    for n in after[0]:
        assert torch.equal(after[1][n], after[0][n]) and torch.equal(after[3][n], after[2][n]), n
    assert any(not torch.equal(after[2][n], after[1][n]) for n in after[0])  # step 3 applied
    for rank in (0, 1):
        stop = (checks / "nan" / f"a_stop_rank{rank}.txt").read_text()
        assert "2 optimiser steps in a row" in stop and "train.max_skipped_steps=2" in stop
        assert "step 5: rank 1: " in stop and "images/" in stop and ".tar" in stop
        assert "step 4: rank 0: " in stop and "videos/" in stop  # no culprit: every rank's shards


def test_failed_save_on_one_rank_stops_every_rank(checks):
    out = checks / "zero3" / "b"
    for rank in (0, 1):
        msg = (checks / "zero3" / f"b_fault_rank{rank}.txt").read_text()
        assert "failed on rank(s) [1]" in msg and "No space left on device" in msg, msg
        assert "step_0000002" in msg  # names the checkpoint that stays the newest complete one
    assert find_latest_complete(out).name == "step_0000002"
    assert not (out / "checkpoints" / "step_0000004").exists()
    assert [m["step"] for m in metrics(out)] == [3, 4]


def test_untrusted_checkpoint_is_refused(checks):
    for rank in (0, 1):
        msg = (checks / f"untrusted_rank{rank}.txt").read_text()
        assert "pickle" in msg and "--trust-checkpoint" in msg and "model.init=" in msg, msg


def zero2_moments(ckpt: Path, key: str) -> dict[str, torch.Tensor]:
    """Full optimiser moments from a ZeRO-2 checkpoint, rebuilt independently of DeepSpeed's
    converter: each rank holds a contiguous slice of the flat group; params follow in order."""
    files = sorted(glob.glob(str(ckpt / "*optim_states.pt")), key=lambda f: int(Path(f).name.split("_")[3]))
    parts = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
    shapes = torch.load(next(ckpt.glob("*model_states.pt")), weights_only=False)["param_shapes"]
    out = {}
    for group, names in enumerate(shapes):
        flat = torch.cat([p["base_optimizer_state"]["state"][group][key] for p in parts])
        offset = 0
        for name, shape in names.items():
            out[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
    return out


def test_universal_checkpoint_4_to_2_ranks(checks, baseline, tmp_path):
    """lr > 0: the 2-rank engine holds the 4-rank run's weights, moments and step counters, and
    two resumes from the same conversion continue with the same losses."""
    source = baseline / "checkpoints" / "step_0000005"
    assert "world 4 -> 2 (universal)" in (checks / "stdout.txt").read_text()
    state = torch.load(checks / "u1_state.pt")
    assert state["optimizer_steps"] == [5] and state["trainer_step"] == 5
    assert state["scheduler_epoch"] == 5 and state["global_steps"] == 5
    weights = load_file(str(export(source, tmp_path / "e4", trust_checkpoint=True) / "unet.safetensors"))
    assert weights.keys() == state["params"].keys()
    for key in ("exp_avg", "exp_avg_sq"):
        want = zero2_moments(source, key)
        assert want.keys() == weights.keys()
        assert max(w.abs().max().item() for w in want.values()) > 0
        for n in want:
            torch.testing.assert_close(state[key][n], want[n], rtol=0, atol=0, msg=f"{key} {n}")
    for n in weights:
        torch.testing.assert_close(state["params"][n], weights[n], rtol=0, atol=0, msg=n)
    u1, u2 = metrics(checks / "u1"), metrics(checks / "u2")
    assert [m["step"] for m in u1] == [6, 7]
    same_losses(u2, u1)
