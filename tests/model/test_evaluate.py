"""Evaluation metrics with tiny CLIP: static clips rank above moving ones in temporal
consistency; the sweep writes a table and a PNG; real clips give the reference row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sample_testlib import TINY, one_thread, tiny_export  # noqa: F401  (shared tiny export)

from model import clip_metrics, evaluate
from model.video_io import write_mp4

F, W, H = 8, 128, 64


@pytest.fixture(scope="module")
def scorer() -> clip_metrics.ClipScorer:
    return clip_metrics.ClipScorer("tiny")


def _static(rng) -> np.ndarray:
    frame = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    return np.repeat(frame[None], F, axis=0)


def _moving(rng) -> np.ndarray:
    return rng.integers(0, 255, (F, H, W, 3), dtype=np.uint8)


def test_static_clip_is_perfectly_consistent_and_ranks_above_moving(scorer):
    rng = np.random.default_rng(0)
    clips = {"static": _static(rng), "moving": _moving(rng)}
    static, moving = (scorer.score(clips[name], "a cat") for name in ("static", "moving"))
    assert static["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert moving["temporal_consistency"] < static["temporal_consistency"] - 1e-3
    # clipsim is the mean over frames of cos(frame, prompt): per frame, one at a time, here.
    text = scorer.text_features(["a cat"])[0]
    for clip, s in ((clips["static"], static), (clips["moving"], moving)):
        per_frame = [float(scorer.frame_features(frame[None])[0] @ text) for frame in clip]
        assert s["clipsim"] == pytest.approx(np.mean(per_frame), abs=1e-5)
    assert scorer.score(clips["moving"], "a dog")["clipsim"] != pytest.approx(moving["clipsim"], abs=1e-4)
    assert np.isnan(scorer.score(clips["static"], None)["clipsim"])


def test_metrics_match_their_definitions():
    feats = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(16), dim=-1)
    expected_tc = np.mean([float(feats[i] @ feats[i + 1]) for i in range(4)])
    assert clip_metrics.temporal_consistency(feats) == pytest.approx(expected_tc, abs=1e-6)
    assert clip_metrics.clipsim(feats, text) == pytest.approx(float((feats @ text).mean()), abs=1e-6)
    with pytest.raises(ValueError, match="2 frames"):
        clip_metrics.temporal_consistency(feats[:1])


def test_real_clips_reference_row(scorer, tmp_path):
    rng = np.random.default_rng(1)
    write_mp4(_static(rng), tmp_path / "static.mp4")
    write_mp4(_moving(rng), tmp_path / "moving.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    static = clip_metrics.score_real(scorer, str(tmp_path / "static.mp4"), F, 8.0)
    moving = clip_metrics.score_real(scorer, str(tmp_path / "moving.mp4"), F, 8.0)
    assert static["temporal_consistency"] > moving["temporal_consistency"]

    manifest = tmp_path / "videos.csv"
    pd.DataFrame({"video": ["static.mp4", "moving.mp4", "broken.mp4"],
                  "caption": ["noise", "", "x"]}).to_csv(manifest, index=False)
    row = clip_metrics.score_real(scorer, str(manifest), F, 8.0)
    assert row["n"] == 2 and row["skipped"] == 1  # counted, not silently dropped
    assert row["temporal_consistency"] == pytest.approx(
        (static["temporal_consistency"] + moving["temporal_consistency"]) / 2, abs=1e-5)
    assert np.isfinite(row["clipsim"])  # from the one captioned clip


def test_sweep_cli_writes_table_and_plot(tmp_path):
    export = tiny_export(tmp_path / "export")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue car\n")
    rng = np.random.default_rng(2)
    write_mp4(_static(rng), tmp_path / "real" / "a.mp4")
    out = tmp_path / "eval"
    code = evaluate.main(["--ckpt", str(export), "--prompts", str(prompts), "--clip", "tiny", "--sweep",
                          "--motions", "300,600", "--appearances", "0,1", "--real", str(tmp_path / "real"),
                          "--out", str(out), "--config", TINY, "--steps", "2"])
    assert code == 0
    table = pd.read_csv(out / "metrics.csv")
    assert list(table["setting"]) == ["motion sweep"] * 2 + ["appearance sweep"] * 2 + ["real clips"]
    # γm defaults to the training median of the export's statistics (3.0).
    assert list(table["motion_factor"][:4]) == [300, 600, 3.0, 3.0]
    assert list(table["appearance_factor"][:4]) == [1.0, 1.0, 0.0, 1.0]
    assert (table["n"][:4] == 2).all()
    assert table[["temporal_consistency", "clipsim"]][:4].apply(np.isfinite).all().all()
    # The factors reach the model: γa = 0 and γa = 1 (same prior and noise) score differently.
    assert table["temporal_consistency"][2] != table["temporal_consistency"][3]
    assert "real clips" in (out / "metrics.md").read_text()
    with Image.open(out / "sweep.png") as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 300


@pytest.mark.parametrize("args, needle", [
    (["--motions", "300,-1", "--sweep"], "-1"),
    (["--appearances", "0,2", "--sweep"], "2"),
    (["--motions", "abc", "--sweep"], "abc"),
])
def test_bad_sweep_values(tmp_path, capsys, args, needle):
    export = tiny_export(tmp_path / "export")
    prompts = tmp_path / "p.txt"
    prompts.write_text("p\n")
    code = evaluate.main(["--ckpt", str(export), "--prompts", str(prompts), "--clip", "tiny",
                          "--out", str(tmp_path / "o"), "--config", TINY, *args])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and needle in err
