"""`Decoder`: real synthetic files through the isolated decoder child, every bad input, and a
child that aborts, segfaults, hangs or runs out of memory (`testing.faulty_decoder`: the real
child loop with the fault injected where a hostile file would trigger it)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pytest

from core.geometry import cover_crop
from core.shard_format import SampleError, sample_key
from preprocessing.isolation import VideoDecoderProcess
from preprocessing.process import Decoder, clean_caption
from preprocessing.transform import resize_cover
from testing import faulty_decoder as faulty
from testing.hostile import X264, write_video


@pytest.fixture
def decoder(video_cfg, image_cfg):
    with Decoder(video_cfg, image_cfg) as dec:
        yield dec


def reference_frames(path: str, indices: list[int]) -> np.ndarray:
    """The selected frames decoded independently with PyAV (every frame, in order)."""
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in indices])


def test_good_videos_decode_to_the_selected_frames(decoder, synthetic, video_cfg):
    codecs = set()
    for row in synthetic["videos"]:
        if "/bad/" in row["video"]:
            continue
        d = decoder.decode("video", row["video"], row["caption"])
        assert d.key == sample_key(row["video"]) and d.kind == "video" and d.caption == row["caption"]
        assert d.pixels.dtype == np.uint8 and d.pixels.shape == (8, 64, 128, 3)
        meta = d.meta
        truth = synthetic["truth"][row["video"]]
        assert meta["source"] == row["video"] and meta["original_size"] == truth["size"]
        assert meta["native_fps"] == pytest.approx(truth["fps"], rel=1e-3)
        assert meta["stride"] == max(1, min(round(truth["fps"] / 8.0), (meta["num_source_frames"] - 1) // 7))
        assert np.all(np.diff(meta["frame_indices"]) == meta["stride"])
        crop = cover_crop(*truth["size"], 128, 64)
        assert meta["crop_box"] == list(crop.box)
        # docs/method.md#prep literally: whole frames resized to cover 128x64, then centre-cropped
        ref = resize_cover(reference_frames(row["video"], meta["frame_indices"]), 128, 64)
        # decord and PyAV share ffmpeg's decoders; only the YUV->RGB rounding may differ
        assert np.abs(d.pixels.astype(int) - ref.astype(int)).mean() < 2.0
        codecs.add(truth["codec"])
    assert {"libx264", "mpeg4", "libvpx-vp9"} <= codecs


def test_same_result_from_bytes_and_reruns(decoder, synthetic):
    path = synthetic["videos"][0]["video"]
    from_path = decoder.decode("video", path, "a clip")
    with open(path, "rb") as fh:
        from_bytes = decoder.decode("video", path, "a clip", data=fh.read())
    assert np.array_equal(from_path.pixels, from_bytes.pixels) and from_path.meta == from_bytes.meta
    assert np.array_equal(decoder.decode("video", path, "a clip").pixels, from_path.pixels)


def test_every_bad_input_has_its_reason_and_names_the_file(decoder, synthetic):
    expected = synthetic["expected_failures"]
    assert set(expected.values()) >= {"empty_file", "decode_error", "missing_file", "no_video_stream",
                                      "too_short", "bad_caption", "bad_image", "image_bomb"}
    rows = [("video", r["video"], r["caption"]) for r in synthetic["videos"]]
    rows += [("image", r["image"], r["caption"]) for r in synthetic["images"]]
    seen = 0
    for kind, source, caption in rows:
        if source not in expected:
            continue
        with pytest.raises(SampleError) as err:
            decoder.decode(kind, source, caption)
        assert err.value.reason == expected[source], (source, err.value.detail)
        assert source in err.value.detail
        seen += 1
    assert seen == len(expected)
    # the decoder survived all of it
    good = synthetic["videos"][0]
    assert decoder.decode("video", good["video"], good["caption"]).pixels.shape[0] == 8


def test_audio_only_and_jpeg_named_mp4_messages(decoder, synthetic):
    bad = synthetic["root"] / "bad"
    with pytest.raises(SampleError, match="no video stream"):
        decoder.decode("video", str(bad / "audio_only.m4a"), "x")
    with pytest.raises(SampleError, match="still image"):
        decoder.decode("video", str(bad / "jpeg_named.mp4"), "x")
    with pytest.raises(SampleError, match="1 frame"):
        decoder.decode("video", str(bad / "one_frame.mp4"), "x")


def test_captions_are_cleaned_or_rejected():
    assert clean_caption("a\tred\x00 square\n moving\u200b fast\x7f", "f.mp4") == "a red square moving fast"
    for bad in (None, float("nan"), "", "  \n\t ", "\x00\x01", 12):
        with pytest.raises(SampleError) as err:
            clean_caption(bad, "clips/f.mp4")
        assert err.value.reason == "bad_caption" and "clips/f.mp4" in err.value.detail


@pytest.fixture
def victim(synthetic, tmp_path) -> tuple[str, str]:
    """(a good video, a copy of it that `testing.faulty_decoder` misbehaves on)."""
    path = synthetic["videos"][1]["video"]
    copy = tmp_path / "victim.mp4"
    shutil.copy(path, copy)
    return path, str(copy)


@pytest.mark.parametrize(
    "fault, reason",
    [("abort", "decoder_crash"), ("segfault", "decoder_crash"), ("eat_memory", "out_of_memory"),
     ("raise", "decode_error"), ("hang", "timeout")],
)
def test_misbehaving_child_costs_one_sample(video_cfg, victim, monkeypatch, fault, reason):
    video_cfg.decode_timeout_s = 2.0
    path, bad = victim
    monkeypatch.setenv(faulty.ENV, faulty.plan({bad: fault}))
    proc = VideoDecoderProcess(video_cfg, child_module="testing.faulty_decoder")
    try:
        good, _ = proc.decode(path, sample_key(path))
        first_pid = proc.pid
        with pytest.raises(SampleError) as err:
            proc.decode(bad, sample_key(path))
        assert err.value.reason == reason and bad in err.value.detail
        again, _ = proc.decode(path, sample_key(path))  # the worker carries on
        assert np.array_equal(good, again)
        if reason in ("decoder_crash", "timeout"):
            assert proc.pid != first_pid and not psutil.pid_exists(first_pid) or \
                psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        proc.close()


def test_faulty_child_decodes_like_the_real_one(video_cfg, victim, monkeypatch):
    # Only the named source misbehaves; the rest is the product's child loop, frame for frame.
    path, bad = victim
    monkeypatch.setenv(faulty.ENV, faulty.plan({bad: "abort"}))
    real = VideoDecoderProcess(video_cfg)
    injected = VideoDecoderProcess(video_cfg, child_module="testing.faulty_decoder")
    try:
        want, want_meta = real.decode(path, sample_key(path))
        got, got_meta = injected.decode(path, sample_key(path))
        assert np.array_equal(want, got) and want_meta == got_meta
        bad_frames, _ = real.decode(bad, sample_key(path))  # the product child has no faults
        assert np.array_equal(bad_frames, want)
    finally:
        real.close()
        injected.close()
    with pytest.raises(ValueError, match="unknown fault"):
        faulty.plan({bad: "explode"})


def test_child_killed_by_the_oom_killer_is_out_of_memory(video_cfg, victim, monkeypatch):
    path, bad = victim
    monkeypatch.setenv(faulty.ENV, faulty.plan({bad: "hang"}))
    proc = VideoDecoderProcess(video_cfg, child_module="testing.faulty_decoder")
    try:
        proc.decode(path, sample_key(path))
        pid = proc.pid
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()  # what the kernel OOM killer does
        with pytest.raises(SampleError) as err:
            proc.decode(bad, sample_key(path))
        assert err.value.reason == "out_of_memory" and "SIGKILL" in err.value.detail
    finally:
        proc.close()


@pytest.mark.parametrize("side", [8, 16, 24])
def test_narrow_video_decodes_through_the_pyav_fallback(video_cfg, tmp_path, side):
    # decord refuses to copy out frames this narrow; the child decodes them with PyAV instead,
    # with the same frame selection and transform.
    path = str(tmp_path / f"tiny{side}.mp4")
    rng = np.random.default_rng(side)
    noise = rng.integers(0, 256, (20, side, side, 3), dtype=np.uint8)
    write_video(Path(path), noise, "libx264", "yuv420p", X264)
    import decord

    with pytest.raises(decord.DECORDError, match="from_size == to_size"):
        decord.VideoReader(path).get_batch([0])  # the decord bug this works around
    proc = VideoDecoderProcess(video_cfg)
    try:
        frames, meta = proc.decode(path, sample_key(path))
    finally:
        proc.close()
    assert frames.shape == (8, 64, 128, 3) and meta["num_source_frames"] == 20
    assert len(meta["frame_indices"]) == 8 and np.all(np.diff(meta["frame_indices"]) == meta["stride"])
    x0, y0, x1, y1 = meta["crop_box"]
    assert meta["crop_box"] == list(cover_crop(side, side, 128, 64).box)
    # Both PyAV, so identical, not just close: the PyAV frames at the selected indices, cropped
    # to the visible box and resized, as the worker does for every video (`send_region`).
    ref = resize_cover(reference_frames(path, meta["frame_indices"])[:, y0:y1, x0:x1], 128, 64)
    assert np.array_equal(frames, ref)


def test_child_is_recycled_and_worker_memory_stays_flat(video_cfg, synthetic):
    video_cfg.decoder_recycle_every = 10
    paths = [r["video"] for r in synthetic["videos"] if "/bad/" not in r["video"]]
    proc = VideoDecoderProcess(video_cfg)
    me = psutil.Process()
    try:
        for p in paths * 2:  # warm-up: allocator pools, first child
            proc.decode(p, sample_key(p))
        before, starts = me.memory_info().rss, proc.starts
        pids = set()
        for i in range(60):
            p = paths[i % len(paths)]
            proc.decode(p, sample_key(p))
            pids.add(proc.pid)
        growth = me.memory_info().rss - before
        assert proc.starts - starts >= 5  # restarted every 10 decodes
        assert len(pids - {None}) >= 5
        assert growth < 16 * 2**20, f"worker RSS grew {growth / 2**20:.1f} MiB over 60 decodes"
    finally:
        proc.close()
    time.sleep(0.1)
