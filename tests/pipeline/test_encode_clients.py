"""`ActorEncode` keeps batches on the task's own Ray node, and sends file bytes, not a local
path, to an actor elsewhere; the frame budget decides how many clips one encode call carries."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_config
from pipeline.config import PrepConfig
from pipeline.encode_clients import ActorEncode
from pipeline.shard import ShardTask
from preprocessing.process import Decoded

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "prep" / "tiny.yaml")


class Remote:
    """Stands in for an actor handle: records what `encode.remote` was given."""

    def __init__(self, name: str):
        self.name, self.calls = name, []
        self.encode = self

    def remote(self, batch, size):
        self.calls.append((batch, size))
        return self.name


def probed(path: str) -> Decoded:
    return Decoded(key="ab", kind="video", source=path, caption="c", pixels=None, meta={})


def test_batches_stay_on_the_tasks_node(tmp_path):
    actors = [Remote("a0"), Remote("b0"), Remote("a1")]
    nodes = ["A", "B", "A"]
    enc = ActorEncode(actors, 0, {}, nodes, node="A")
    assert [enc.submit([probed("x")], 1) for _ in range(4)] == ["a0", "a1", "a0", "a1"]
    assert actors[1].calls == []
    assert actors[0].calls[0][0][0].data is None  # same node: the actor opens the local path


def test_any_actor_when_the_node_has_none_and_bytes_travel(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    actors = [Remote("a0"), Remote("b0")]
    enc = ActorEncode(actors, 1, {}, ["A", "B"], node="C")
    assert [enc.submit([probed(str(clip))], 1) for _ in range(3)] == ["b0", "a0", "b0"]
    sent = actors[1].calls[0][0][0]
    assert sent.data == clip.read_bytes() and sent.source == str(clip)


def test_frame_budget_sets_clips_per_call():
    tiny = TINY
    for overrides, video, image in (
        ([], 2, 16),  # batch_frames 0 = batch_size 16: 2 clips of 8 frames
        (["models.batch_frames=64"], 8, 64),
        (["models.batch_frames=4"], 1, 4),  # a clip never splits: at least one per call
    ):
        cfg = load_config(PrepConfig, tiny, overrides)
        task = ShardTask(cfg, "/tmp/unused-out", "fp")
        assert (task._batch_samples("video"), task._batch_samples("image")) == (video, image), overrides


@pytest.mark.slow
def test_decoder_and_device_errors_before_any_row(prep, synthetic, ray_session, tmp_path, capsys):
    """On the session's CPU-only Ray instance: nvdec and CUDA are one clear error, no shard."""
    good = str(synthetic / "ten.parquet")
    cases = [
        (["video.decoder=nvdec", "execution.encoders=1", "execution.gpus_per_encoder=0"], "video.decoder"),
        (["models.device=cuda"], "models.device"),
        (["models.device=cuda:1", "execution.encoders=0"], "no GPUs"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        assert prep("--videos", good, "--out", str(out), *overrides) == 2
        err = capsys.readouterr().err
        assert message in err and "config field" in err, err
        assert not list(out.glob("videos/*.tar"))


def test_hub_models_resolve_on_the_driver_or_fail_naming_the_field(tmp_path):
    """Local and tiny models need nothing; a hub id the driver cannot fetch is one ConfigError.
    Run offline against a closed local endpoint: no traffic leaves 127.0.0.1."""
    import os
    import subprocess
    import sys

    from pipeline.placement import local_model_paths

    assert local_model_paths(load_config(PrepConfig, TINY)) == {}
    (tmp_path / "vae").mkdir()
    cfg = load_config(PrepConfig, TINY, [f"models.vae={tmp_path / 'vae'}"])
    assert local_model_paths(cfg) == {}
    code = (
        "from core.config import ConfigError, load_config\n"
        "from pipeline.config import PrepConfig\n"
        "from pipeline.placement import local_model_paths\n"
        "cfg = load_config(PrepConfig, 'configs/prep/tiny.yaml', ['models.vae=someone/some-vae'])\n"
        "try:\n    local_model_paths(cfg)\nexcept ConfigError as exc:\n    print('FIELD', exc.field, exc)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "FIELD models.vae" in done.stdout and "someone/some-vae" in done.stdout, done.stdout + done.stderr
