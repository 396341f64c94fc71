"""`bench/gpu_check.sh --cpu-rehearsal`, its Python parts: the measurement sections at tiny
sizes on the CPU, the nvdec in-actor path with its CPU fallback, and the report writer. The
Ray prep and deepspeed sections run in the slow test below."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
import gpu_sections  # noqa: E402


@pytest.fixture(scope="module")
def sizes():
    import torch

    threads = torch.get_num_threads()
    yield gpu_sections.Sizes.pick(rehearsal=True)
    torch.set_num_threads(threads)


def test_encoder_sweep_counts_flops_per_frame(sizes):
    res = gpu_sections.encoders(sizes)
    rows = {(r["model"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(m, b) for m in ("vae_encode", "dinov2_vits14") for b in sizes.sweep}
    for (model, _), r in rows.items():
        assert r["frames_s"] > 0 and r["clips_s"] == pytest.approx(r["frames_s"] / sizes.frames)
        # FLOPs per frame do not depend on the batch: the counter saw the real convolutions
        assert r["tflop_per_frame"] == pytest.approx(rows[(model, sizes.sweep[0])]["tflop_per_frame"])
    assert rows[("vae_encode", 2)]["tflop_per_frame"] > rows[("dinov2_vits14", 2)]["tflop_per_frame"]


def test_unet_and_image_steps(sizes):
    video = gpu_sections.unet(sizes)["rows"]
    assert [r["micro_batch"] for r in video] == [1, 2]
    assert video[1]["tflop_per_step"] == pytest.approx(2 * video[0]["tflop_per_step"], rel=0.01)
    image = gpu_sections.image(sizes)["rows"]
    assert image[0]["micro_batch"] == sizes.image_batch and image[0]["frames"] == 1
    assert image[0]["step_s"] > 0 and image[0]["tflop_per_step"] > 0


def test_nvdec_path_decodes_in_the_actor_and_falls_back(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--section", "nvdec_path",
                           "--cpu-rehearsal", "--workdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.splitlines()[-1][len("RESULT "):])["rows"]
    assert rows[0] == {"status": "ok", "decoder": "torchcodec:cpu", "fallback": None}
    assert rows[1]["status"] == "ok" and rows[1]["decoder"] == "decord"
    assert "expected 8 frames of 3x16x16" in rows[1]["fallback"]


def test_report_tables(tmp_path):
    report = dict(date="2026-12-01-1200", device="CPU rehearsal", rehearsal=True, sections={
        "unet": {"rows": [{"micro_batch": 1, "step_s": 0.25, "mfu": None}], "seconds": 3.0},
        "zero2": {"error": "over its 110 s budget", "seconds": 110.0},
    })
    md = gpu_check.markdown(report)
    assert "| micro_batch | step_s | mfu |" in md and "| 1 | 0.25 | - |" in md
    assert "## zero2 (110 s)" in md and "error: over its 110 s budget" in md


@pytest.mark.slow
def test_whole_rehearsal_writes_the_report(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = ["bash", str(REPO / "bench/gpu_check.sh"), "--cpu-rehearsal", "--out", str(tmp_path),
           "--workdir", str(tmp_path / "work"), "--sections", "prep,zero2"]
    done = subprocess.run(cmd,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(next(tmp_path.glob("gpu-*-cpu-rehearsal.json")).read_text())
    prep = {r["decoder"]: r for r in report["sections"]["prep"]["rows"]}
    assert set(prep) == {"decord", "torchcodec"}
    assert all(r["ok"] == 4 and r["failed"] == 0 for r in prep.values())
    assert {k: r["decoders"] for k, r in prep.items()} == {k: {k: 4} for k in ("decord", "torchcodec")}
    zero = report["sections"]["zero2"]["rows"][0]
    assert zero["rc"] == 0 and zero["steps"] == 2 and zero["backend"] == "gloo"
    assert next(tmp_path.glob("gpu-*-cpu-rehearsal.md")).read_text().startswith("# GPU check")
