"""Checkpoints through the real launcher and CLI: exact resume, SIGKILL + `--resume auto`,
SIGTERM (with storage secrets planted: no file of the run may hold them), export for sampling.
Universal Checkpointing, ZeRO 1/3, EMA, warmup, lr and worker changes, faults: test_resume_features."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from trainlib import REPO, env, launch, metrics, start, tail, train_args

from core.config import from_dict
from model.config import UNetConfig
from model.unet import HiGenUNet
from training.export import export
from training.export import main as export_main

pytestmark = pytest.mark.slow


def copy_checkpoint(src: Path, out: Path) -> None:
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src, out / "checkpoints" / src.name)
    shutil.copy(src.parent.parent / "config.yaml", out / "config.yaml")


def test_metrics_lines(baseline):
    for m in metrics(baseline):
        for key in (
            "step",
            "loss_image",
            "loss_video",
            "lr",
            "grad_norm",
            "samples_per_s",
            "data_wait_fraction",
        ):
            assert isinstance(m[key], (int, float)), key
        assert m["lr"] == pytest.approx(5e-5) and 0 <= m["data_wait_fraction"] <= 1


def test_resume_reproduces_uninterrupted_losses(baseline, dataset, tmp_path):
    out = tmp_path / "resumed"
    copy_checkpoint(baseline / "checkpoints" / "step_0000003", out)
    done = launch("training/train.py", 4, train_args(dataset, out, "--max-steps", "5", "--resume", "auto"))
    assert done.returncode == 0, tail(done)
    assert "resumed from" in done.stdout and "step_0000003" in done.stdout
    got, want = metrics(out), metrics(baseline)[3:]
    assert [m["step"] for m in got] == [4, 5]
    for a, b in zip(got, want):
        assert (a["loss_image"], a["loss_video"], a["grad_norm"]) == (
            b["loss_image"],
            b["loss_video"],
            b["grad_norm"],
        )


def test_export_loads_into_the_unet(baseline, tmp_path):
    # DeepSpeed's files are pickles: the trained weights export only when trusted, and the CLI
    # says so with exit 2 and writes nothing.
    assert export_main(["--ckpt", str(baseline), "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()
    out = export(baseline, tmp_path / "export", trust_checkpoint=True)
    import yaml

    model = yaml.safe_load((out / "model.yaml").read_text())
    assert model["text"] == "tiny" and model["vae"] == "tiny" and "diffusion" in model
    unet = HiGenUNet(from_dict(UNetConfig, model["unet"]))
    unet.load_state_dict(load_file(str(out / "unet.safetensors")), strict=True)


def wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended early:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def test_sigkill_one_rank_then_resume_auto(dataset, tmp_path):
    out, log = tmp_path / "run", tmp_path / "killed.log"
    proc = start(
        "training/train.py",
        2,
        train_args(dataset, out, "--max-steps", "200", "--save-every", "2", "roles.image_ranks=1"),
        log,
    )
    latest = out / "checkpoints" / "latest"

    def mid_run():  # a complete checkpoint exists and the run is past it
        return latest.is_file() and metrics(out) and metrics(out)[-1]["step"] > int(latest.read_text()[5:])

    try:
        wait_for(mid_run, proc, log)
        victim = next(
            p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()
        )
        victim.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    step = int(latest.read_text()[5:])
    # An incomplete newer checkpoint (as a kill during a save leaves it) must be ignored.
    fake = out / "checkpoints" / "step_0009999"
    shutil.copytree(out / "checkpoints" / latest.read_text(), fake)
    (fake / "rank_00001.json").unlink()
    before = {m["step"]: m for m in metrics(out)}
    done = launch(
        "training/train.py",
        2,
        train_args(dataset, out, "--max-steps", str(step + 2), "--resume", "auto", "roles.image_ranks=1"),
    )
    assert done.returncode == 0, tail(done)
    assert f"step_{step:07d} at step {step}" in done.stdout, tail(done)
    after = metrics(out)[len(before) :]
    assert [m["step"] for m in after] == [step + 1, step + 2]
    for m in after:
        if m["step"] in before:  # the killed run got that far: same losses
            assert (m["loss_image"], m["loss_video"]) == (
                before[m["step"]]["loss_image"],
                before[m["step"]]["loss_video"],
            )
    assert (step + 1) in before


KEY, SECRET = "AKIAPLANTEDKEY7Q3Z", "pl4nted/S3cret+9xWq"  # fsspec's local fs ignores them


def test_sigterm_writes_a_checkpoint_and_exits(dataset, tmp_path):
    """Single process (`python training/train.py`), EMA on: SIGTERM -> checkpoint, status 143.
    Storage secrets are planted in data.storage_options: no file of the run holds them."""
    out, log = tmp_path / "run", tmp_path / "term.log"
    args = train_args(
        dataset,
        out,
        "--max-steps",
        "500",
        "--save-every",
        "1000",
        "optim.ema_decay=0.5",
        "train.tensorboard=true",
        f"data.storage_options={{key: {KEY}, secret: '{SECRET}', client_kwargs: {{region_name: eu-1}}}}",
    )
    cmd = [sys.executable, "training/train.py", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(metrics(out)) >= 1, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    last = metrics(out)[-1]["step"]
    assert (out / "checkpoints" / "latest").read_text() == f"step_{last:07d}"
    assert (out / "checkpoints" / f"step_{last:07d}" / "complete.json").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # EMA weights (decay 0.5: after >= 1 step they differ from the initial and the trained weights)
    ema = load_file(str(export(out, tmp_path / "ema", ema=True) / "unet.safetensors"))
    trained = load_file(str(export(out, tmp_path / "raw", trust_checkpoint=True) / "unet.safetensors"))
    assert ema.keys() == trained.keys()
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)
    # Secrets: grep every file of the run (checkpoints, pickles, TensorBoard, configs) and the console.
    files = [p for p in out.rglob("*") if p.is_file()] + [log]
    assert len(files) > 8
    for path in files:
        data = path.read_bytes()
        assert KEY.encode() not in data and SECRET.encode() not in data, path
    config = (out / "config.yaml").read_text()
    assert "key: <redacted>" in config and "region_name: eu-1" in config  # the options did arrive
