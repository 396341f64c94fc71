"""Sampling from a tiny export: decodable MP4 with F frames, seeds, image-to-video, saved priors
(that keep the scene), saved latents, batches, and checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sample_testlib import STATS, TINY, F, H, W, one_thread, tiny_export  # noqa: F401

from core.config import load_config
from model import sample
from model.checkpoint_io import CheckpointError, load_for_sampling
from model.config import UNetConfig
from model.sample_config import SampleConfig
from model.sampler import Sampler
from model.video_io import load_image, read_video


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("export") / "export")


@pytest.fixture(scope="module")
def sampler(export_dir) -> Sampler:
    return Sampler(load_for_sampling(export_dir), load_config(SampleConfig, TINY, ["steps=3"]))


@pytest.fixture
def ref_image(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "ref.png"
    Image.fromarray(rng.integers(0, 255, (90, 150, 3), dtype=np.uint8)).save(path)
    return path


def _sample(export_dir, out, *extra) -> int:
    args = ["--ckpt", str(export_dir), "--out", str(out), "--config", TINY, "--steps", "3", *extra]
    return sample.main(args)


def test_writes_decodable_mp4_and_same_seed_same_video(export_dir, sampler, tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    latents = tmp_path / "a_latents.npy"
    assert _sample(export_dir, a, "--prompt", "a red ball", "--seed", "7", "--gif",
                   "--save-latents", str(latents)) == 0
    assert _sample(export_dir, b, "--prompt", "a red ball", "--seed", "7") == 0
    va, vb = read_video(a), read_video(b)
    assert va.shape == (F, H, W, 3)
    np.testing.assert_array_equal(va, vb)
    assert va.std() > 1.0  # not a blank video
    with Image.open(a.with_suffix(".png")) as sheet:
        assert sheet.format == "PNG" and sheet.size == (F * W + (F - 1) * 2, H)
    with Image.open(a.with_suffix(".gif")) as gif:
        assert gif.n_frames == F
    meta = json.loads(a.with_suffix(".json").read_text())
    assert meta["prompt"] == "a red ball" and meta["seed"] == 7 and meta["steps"] == 3
    # --save-latents (contract): the clip's latents before decoding, float32 [F,4,h,w].
    saved = np.load(latents, allow_pickle=False)
    assert saved.dtype == np.float32 and saved.shape == (F, 4, H // 8, W // 8)
    expected, _ = sampler.generate(["a red ball"], seed=7)
    np.testing.assert_allclose(saved, expected[0].transpose(0, 1).numpy(), rtol=1e-5, atol=1e-5)
    assert meta["latents"] == str(latents)


def test_image_prior_skips_stage_one_and_changes_result(sampler, ref_image):
    frames_per_call: list[int] = []
    hook = sampler.unet.register_forward_pre_hook(lambda _m, args: frames_per_call.append(args[0].shape[2]))
    try:
        text_latents, _ = sampler.generate(["a cat"], seed=1)
        assert frames_per_call == [1] * 3 + [F] * 3  # stage 1 (F=1), then stage 2
        other_seed, _ = sampler.generate(["a cat"], seed=2)
        assert (other_seed - text_latents).abs().mean() > 1e-3

        frames_per_call.clear()
        image_prior = sampler.image_prior(load_image(ref_image, W, H))
        image_latents, used = sampler.generate(["a cat"], seed=1, prior=image_prior)
        assert frames_per_call == [F] * 3  # stage 1 skipped
        torch.testing.assert_close(used, image_prior)
        assert (image_latents - text_latents).abs().mean() > 1e-3
    finally:
        hook.remove()


def test_saved_prior_keeps_the_scene(sampler):
    """Paper Fig. 6: the same z_s with another prompt keeps the structure. With the same stage-2
    noise, a clip from the saved prior starts closer to the original than one from a fresh prior
    of the new prompt (which fails if the prior is ignored or re-sampled)."""
    prior = sampler.spatial_prior(["a red ball"], seed=1)
    original, _ = sampler.generate(["a red ball"], seed=5, prior=prior)
    reused, used = sampler.generate(["a blue car"], seed=5, prior=prior)
    torch.testing.assert_close(used, prior)
    fresh, _ = sampler.generate(["a blue car"], seed=5, prior=sampler.spatial_prior(["a blue car"], seed=9))
    kept = (reused[:, :, 0] - original[:, :, 0]).abs().mean()
    other = (fresh[:, :, 0] - original[:, :, 0]).abs().mean()
    assert kept < 0.8 * other, (float(kept), float(other))


def test_cli_image_and_prior_roundtrip(export_dir, ref_image, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red ball\n\na blue car\na green tree\n")
    out = tmp_path / "batch.mp4"
    saved = tmp_path / "prior.npy"
    assert _sample(export_dir, out, "--prompt-file", str(prompts), "--save-prior", str(saved)) == 0
    outputs = [tmp_path / f"batch_{i:03d}.mp4" for i in range(3)]
    assert all(read_video(p).shape == (F, H, W, 3) for p in outputs)
    prior = np.load(saved, allow_pickle=False)
    assert prior.shape == (3, 4, H // 8, W // 8)

    np.save(tmp_path / "one.npy", prior[1], allow_pickle=False)
    reuse = tmp_path / "reuse.mp4"
    assert _sample(export_dir, reuse, "--prompt", "a blue car", "--prior", str(tmp_path / "one.npy"),
                   "--seed", "0") == 0
    img = tmp_path / "img.mp4"
    assert _sample(export_dir, img, "--prompt", "a blue car", "--image", str(ref_image)) == 0
    assert read_video(reuse).shape == read_video(img).shape == (F, H, W, 3)
    assert np.abs(read_video(reuse).astype(int) - read_video(img).astype(int)).mean() > 1.0


@pytest.mark.parametrize("args, needle", [
    (["--appearance", "1.5"], "valid range [0, 1], got 1.5"),
    (["--appearance", "-0.1"], "valid range [0, 1], got -0.1"),
    (["--motion", "-5"], "valid range [0, inf)), got -5"),
    (["--frames", "16"], "frames=16"),
    (["--frames", "4"], "exactly 8"),
    (["--save-latents", "MISSING/x.npy"], "x.npy: cannot write there (directory"),
    (["--save-latents", "MISSING"], "must end in .npy (valid: a writable FILE.npy path)"),
    (["--image", "MISSING"], "MISSING"),
    (["--image", "NOTIMAGE"], "NOTIMAGE"),
    (["--prior", "NOTIMAGE"], "NOTIMAGE"),
])
def test_bad_input_names_the_value(export_dir, tmp_path, capsys, args, needle):
    bad = tmp_path / "NOTIMAGE"
    bad.write_bytes(b"this is not a picture")
    args = [str(bad) if a == "NOTIMAGE" else str(tmp_path / a) if a == "MISSING" else a for a in args]
    assert _sample(export_dir, tmp_path / "x.mp4", "--prompt", "p", *args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and needle in err
    assert not (tmp_path / "x.mp4").exists()


def test_checkpoint_dir_without_complete_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000010").mkdir(parents=True)
    (run / "checkpoints" / "step_0000010" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert sample.main(["--ckpt", str(run), "--prompt", "p", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "step_0000010" in err
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_sampling(tmp_path / "nowhere")


def test_training_dir_uses_its_export_when_current(export_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(export_dir, run / "export")
    bundle = load_for_sampling(run)  # no checkpoints/ yet: the export is all there is
    assert bundle.source.endswith("unet.safetensors") and bundle.step == 10
    assert bundle.unet_cfg == UNetConfig.tiny(dropout=0.0, temporal_dropout=0.0)


# A real ZeRO-2 checkpoint written by training's own code (one CPU rank, gloo) in a child
# process, so no process group leaks into this one.
MAKE_CHECKPOINT = """
import json, sys, deepspeed, torch
from core.config import load_config, to_yaml
from training import checkpoint, setup
from training.config import TrainConfig
from training.optim import deepspeed_config, make_optimizer, make_scheduler
from safetensors.torch import save_file
out = sys.argv[1]
cfg = load_config(TrainConfig, sys.argv[2], ["deepspeed.zero_stage=2", "model.vae=tiny"])
cfg.statistics = json.loads(sys.argv[3])  # as training copies them from dataset.json
setup.init_distributed()
unet = setup.build_unet(cfg, 0)
engine, *_ = deepspeed.initialize(model=unet, optimizer=make_optimizer(cfg, unet),
                                  lr_scheduler=make_scheduler(cfg),
                                  config=deepspeed_config(cfg, 1, "fp32", False))
open(out + "/config.yaml", "w").write(to_yaml(cfg))
manager = checkpoint.CheckpointManager(out, keep=2, topology={"world_size": 1})
manager.register("engine", checkpoint.EngineState(engine), checkpoint.ENGINE)
manager.save(7, {})
save_file({k: v.contiguous() for k, v in engine.module.state_dict().items()}, out + "/expected.safetensors")
"""


@pytest.mark.slow
def test_training_output_is_consolidated_from_newest_complete_checkpoint(tmp_path, capsys):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-c", MAKE_CHECKPOINT, str(run), str(repo / "configs/train/tiny.yaml"),
           json.dumps(STATS.to_dict())]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # A newer save that never completed must be ignored.
    (run / "checkpoints" / "step_0000009").mkdir()
    # A DeepSpeed checkpoint unpickles: refused unless trusted, with the way out.
    with pytest.raises(CheckpointError, match="--trust-checkpoint.*training.export"):
        load_for_sampling(run)
    assert sample.main(["--ckpt", str(run), "--prompt", "p", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "unpickles" in capsys.readouterr().err and not (tmp_path / "x.mp4").exists()
    bundle = load_for_sampling(run, trust_checkpoint=True)
    assert bundle.step == 7 and bundle.source.endswith("step_0000007")
    assert bundle.text == bundle.vae == "tiny" and bundle.statistics == STATS
    expected = load_file(str(run / "expected.safetensors"))
    got = bundle.unet.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=name)
    # training.export carries the statistics into model.yaml; making it unpickles (trust), loading
    # the export does not.
    from training.export import export

    exported = load_for_sampling(export(run, tmp_path / "export", trust_checkpoint=True))
    assert exported.statistics == STATS and exported.step == 7
