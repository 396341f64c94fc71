"""Video decoder backends (`video.decoder`): decord and torchcodec in the isolated child agree
on the synthetic corpus (same indices, mean |difference| <= 2/255), fail bad files with the
same reasons, and the in-actor decode path (`gpu_decode`, run here on a CPU device) agrees too.
Preflight names the setting when a backend is missing or CUDA is asked for without GPUs."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from core.config import ConfigError
from core.shard_format import SampleError, sample_key
from preprocessing.isolation import VideoDecoderProcess

MAX_MEAN_ABS_DIFF = 2.0  # uint8 levels, i.e. 2/255


def good_videos(synthetic) -> list[str]:
    return [r["video"] for r in synthetic["videos"] if "/bad/" not in r["video"]]


@pytest.fixture(scope="module")
def children(request):
    from preprocessing.settings import VideoConfig

    cfg = VideoConfig(frames=8, width=128, height=64, decode_timeout_s=30.0, decode_memory_mb=2048)
    procs = {name: VideoDecoderProcess(cfg, backend=name) for name in ("decord", "torchcodec")}
    yield cfg, procs
    for p in procs.values():
        p.close()


def test_cpu_backends_agree_on_the_synthetic_corpus(children, synthetic):
    _, procs = children
    for path in good_videos(synthetic):
        fa, ma = procs["decord"].decode(path, sample_key(path))
        fb, mb = procs["torchcodec"].decode(path, sample_key(path))
        assert ma["frame_indices"] == mb["frame_indices"], path
        assert ma["num_source_frames"] == mb["num_source_frames"], path
        assert fa.shape == fb.shape == (8, 64, 128, 3)
        assert np.abs(fa.astype(np.int16) - fb).mean() <= MAX_MEAN_ABS_DIFF, path
        assert fa.std() > 5  # real pictures, not two blank outputs that trivially agree


def test_bad_files_fail_with_the_same_reasons(children, synthetic):
    _, procs = children
    bad = sorted((synthetic["root"] / "bad").iterdir())
    compared = 0
    for path in map(str, bad):
        reasons = {}
        for name, proc in procs.items():
            try:
                proc.decode(path, sample_key(path))
                reasons[name] = "ok"
            except SampleError as exc:
                assert path in exc.detail
                reasons[name] = exc.reason
        if path.endswith("truncated_faststart.mp4"):
            # decord fails at the truncation. torchcodec indexes the packets that are there and
            # decodes the clip when its frames lie before the cut (x264's threads make where the
            # generator's cut falls vary between runs): a known difference, not a crash.
            assert reasons["decord"] == "decode_error", reasons
            assert reasons["torchcodec"] in ("ok", "decode_error", "too_short"), reasons
        else:
            assert reasons["torchcodec"] == reasons["decord"], (path, reasons)
        compared += 1
    assert compared >= 10


def test_probe_gives_the_indices_and_crop_without_frames(children, synthetic):
    _, procs = children
    path = good_videos(synthetic)[0]
    frames, meta = procs["decord"].decode(path, sample_key(path))
    probed = procs["decord"].probe(path, sample_key(path))
    for field in ("frame_indices", "stride", "original_size", "crop_box", "num_source_frames"):
        assert probed[field] == meta[field], field
    with pytest.raises(SampleError) as err:
        procs["decord"].probe(str(synthetic["root"] / "bad" / "one_frame.mp4"), "00ff")
    assert err.value.reason == "too_short"


IN_ACTOR = """
import json, sys
import numpy as np
from preprocessing.gpu_decode import FrameDecoder
from preprocessing.settings import VideoConfig
cfg = VideoConfig(frames=8, width=128, height=64)
frames_here = FrameDecoder(cfg, "cpu", impl="torchcodec")
for i, (path, meta) in enumerate(json.load(open(sys.argv[1]))):
    with open(path, "rb") as fh:
        np.save(f"{sys.argv[2]}/{i}.npy", frames_here.decode(fh.read(), meta).numpy())
try:
    frames_here.decode(path, {**meta, "original_size": [32, 32]})
except RuntimeError as exc:
    print(exc)
"""


def test_in_actor_decode_path_agrees_with_the_child(children, synthetic, tmp_path):
    """The code the encoder actor runs for nvdec (torchcodec, here on the CPU device), in a
    process started with the FFmpeg environment the actors get (`backends.child_env`)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from preprocessing.backends import child_env

    _, procs = children
    refs = [(p, *procs["decord"].decode(p, sample_key(p))) for p in good_videos(synthetic)]
    (tmp_path / "clips.json").write_text(json.dumps([[p, meta] for p, _, meta in refs]))
    root = str(Path(__file__).resolve().parents[2])
    env = child_env("torchcodec", dict(os.environ, PYTHONPATH=root))
    run = subprocess.run([sys.executable, "-c", IN_ACTOR, str(tmp_path / "clips.json"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "expected 8 frames of 3x32x32" in run.stdout  # a size mismatch raises: the actor falls back
    for i, (path, ref, _) in enumerate(refs):
        got = np.load(tmp_path / f"{i}.npy")
        assert got.shape == ref.shape
        assert np.abs(got.astype(np.int16) - ref).mean() <= MAX_MEAN_ABS_DIFF, path


def test_preflight_names_the_setting(monkeypatch):
    from pipeline.config import PrepConfig
    from pipeline.placement import check_decoder, check_devices
    from preprocessing.settings import ModelsConfig, VideoConfig

    cfg = PrepConfig(video=VideoConfig(decoder="torchcodec"))
    check_decoder(cfg)  # installed here: starts a real child and passes
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchcodec" else real(n, *a))
    with pytest.raises(ConfigError, match="video.decoder.*pip install torchcodec") as err:
        check_decoder(cfg)
    assert err.value.field == "video.decoder"
    monkeypatch.undo()

    cuda = dataclasses.replace(cfg, models=ModelsConfig(device="cuda"))
    with pytest.raises(ConfigError, match="models.device.*no GPUs") as err:
        check_devices(cuda, gpus=0, encoders=0)
    assert err.value.field == "models.device"
    with pytest.raises(ConfigError, match="shard tasks hold no GPU"):
        check_devices(cuda, gpus=8, encoders=0)
    nvdec = PrepConfig(video=VideoConfig(decoder="nvdec"))
    with pytest.raises(ConfigError, match="video.decoder.*nvdec decodes on the encoder actors' GPUs"):
        check_devices(nvdec, gpus=0, encoders=0)
    check_devices(nvdec, gpus=8, encoders=16)  # a GPU cluster with actors is fine
