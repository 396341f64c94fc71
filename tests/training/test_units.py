"""Fast single-process tests: rank roles, the data streams, checkpoint selection, bad input."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from shards import make_dataset, record, write_dataset_json, write_shard
from trainlib import REPO, TINY, env, train_args

from core.config import ConfigError, load_config
from core.shards import npy_bytes
from training import checkpoint as ckpt
from training.config import DataConfig, RolesConfig, TrainConfig
from training.data import RoleLoader
from training.roles import assign_role, image_rank_ids, roles_needed
from training.setup import plan_data
from training.sources import DataError, list_shards, load_source


def test_roles_default_is_released_code_rank_mod_4():
    cfg = RolesConfig()
    for world in (4, 8, 16):
        assert image_rank_ids(cfg, world) == [r for r in range(world) if r % 4 == 3]
    assert image_rank_ids(RolesConfig(image_ranks=1), 2) == [1]
    role = assign_role(RolesConfig(image_micro_batch=5, video_micro_batch=2), 7, 8)
    assert (role.role, role.role_rank, role.role_size, role.micro_batch) == ("image", 1, 2, 5)
    role = assign_role(RolesConfig(), 4, 8)
    assert (role.role, role.role_rank, role.role_size, role.micro_batch) == ("video", 3, 6, 3)
    assert roles_needed(RolesConfig(), 1) == {"video"}


def test_more_image_ranks_than_ranks_is_a_config_error():
    with pytest.raises(ConfigError, match="roles.image_ranks"):
        assign_role(RolesConfig(image_ranks=5), 0, 4)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="optim.grad_decay_mode"):
        load_config(TrainConfig, TINY, ["optim.grad_decay_mode=some"])
    for override in ("data.shuffle_shards=0", "data.max_member_bytes=0", "data.read_retries=-1"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(TrainConfig, TINY, [override])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        load_config(TrainConfig, TINY, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        load_config(TrainConfig, TINY, ["deepspeed.zero_stage=3", "optim.ema_decay=0.999"])


def batches(loader: RoleLoader, n: int) -> list[torch.Tensor]:
    return [next(loader)["latents"] for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly_and_splits_by_rank(tmp_path, workers):
    data = make_dataset(tmp_path, video_shards=3, per_shard=5)
    src = load_source(str(data), "video", text_dim=64)
    role = assign_role(RolesConfig(video_micro_batch=2), 0, 4)
    cfg = DataConfig(seed=3, num_workers=workers, shuffle_shards=3)
    first = RoleLoader(src, role, cfg)
    head = batches(first, 5)  # crosses shard boundaries (5 samples per shard, 2 per batch)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    tail = batches(first, 6)
    again = RoleLoader(src, role, cfg)
    assert all(torch.equal(a, b) for a, b in zip(head, batches(again, 5)))  # deterministic
    resumed = RoleLoader(src, role, cfg)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(tail, batches(resumed, 6)))
    other = RoleLoader(src, assign_role(RolesConfig(video_micro_batch=2), 1, 4), cfg)
    assert not all(torch.equal(a, b) for a, b in zip(head, batches(other, 5)))  # another rank, other data


def test_video_batch_carries_prior_motion_appearance(tmp_path):
    src = load_source(str(make_dataset(tmp_path, per_shard=4)), "video", text_dim=64)
    sequential = DataConfig(num_workers=0, shuffle_shards=1)  # one open shard: file order
    batch = next(RoleLoader(src, assign_role(RolesConfig(video_micro_batch=3), 0, 1), sequential))
    assert batch["latents"].shape == (3, 4, 8, 8, 16)
    assert batch["motion"].shape == (3, 7) and batch["appearance"].shape == (3, 8, 8)
    assert batch["has_text"].tolist() == [True, False, True]  # text tokens on every 2nd sample
    assert batch["text"][1].abs().sum() == 0 and batch["text"][0].abs().sum() > 0
    images = load_source(str(tmp_path), "image", text_dim=64)
    image = next(RoleLoader(images, assign_role(RolesConfig(), 3, 4), DataConfig(num_workers=0)))
    assert image["latents"].shape == (64, 4, 1, 8, 16)  # 12 images resampled into a batch of 64


def test_corrupt_shard_is_skipped_and_counted(tmp_path):
    data = make_dataset(tmp_path, video_shards=2, per_shard=4)
    bad = data / "videos" / "000001.tar"
    bad.write_bytes(bad.read_bytes()[:3000] + b"garbage" * 100)  # truncated mid-member
    (data / "videos" / "000002.tar").write_bytes(b"not a tar at all")
    (data / "videos" / "000002.json").write_text("{}")  # no ok count: drawn as size 1
    src = load_source(str(data), "video", text_dim=64)
    role = assign_role(RolesConfig(video_micro_batch=2), 0, 1)
    loader = RoleLoader(src, role, DataConfig(seed=1, num_workers=0, shuffle_shards=1))
    # 24 samples = 6 epochs over the one readable shard: all of it each epoch, nothing else.
    captions = Counter(c for _ in range(12) for c in next(loader)["caption"])
    assert captions == {f"a video number {i}": 6 for i in range(4)}
    # both bad shards once per epoch (those of the last epoch may come after its last batch)
    assert set(loader.bad) == {"bad_shard"} and 10 <= loader.bad["bad_shard"] <= 12


def test_bad_sample_counted_with_reason(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "videos"
    folder.mkdir()
    samples = [record("video", i, rng) for i in range(4)]
    samples[1] = [(n, b) for n, b in samples[1] if not n.endswith("motion.npy")]
    write_shard(folder / "000000.tar", samples)
    write_dataset_json(tmp_path)
    loader = RoleLoader(
        load_source(str(tmp_path), "video"),
        assign_role(RolesConfig(video_micro_batch=3), 0, 1),
        DataConfig(num_workers=0, shuffle_shards=1),
    )
    next(loader)
    assert loader.bad == {"missing_member": 1}


def test_bad_inputs_fail_before_training(tmp_path):
    cfg = load_config(TrainConfig, TINY)
    videos_only = make_dataset(tmp_path / "a", kinds=("video",))
    with pytest.raises(DataError, match="no images/ folder"):
        plan_data(cfg, str(videos_only), world_size=4)
    assert plan_data(cfg, str(videos_only), world_size=2).frames == 8  # no image ranks: fine
    old = make_dataset(tmp_path / "b", version=99)
    with pytest.raises(DataError, match="format_version 99"):
        plan_data(cfg, str(old), world_size=2)
    empty = tmp_path / "c" / "videos"
    empty.mkdir(parents=True)
    (empty / "000000.tar").write_bytes(b"")  # no .json commit marker: not a complete shard
    with pytest.raises(DataError, match="no complete shard"):
        list_shards(str(tmp_path / "c"), "video")


def test_dataset_json_disagreeing_with_the_config_stops_before_training(tmp_path):
    """Each message names the field on both sides and the flag to change."""
    cfg = load_config(TrainConfig, TINY)
    data = make_dataset(tmp_path / "d", kinds=("video",))
    assert plan_data(cfg, str(data), world_size=1).frames == 8

    def fails(override: dict, *train: str) -> str:
        doc = json.loads((data / "dataset.json").read_text())
        for dotted, value in override.items():
            *path, last = dotted.split(".")
            node = doc
            for p in path:
                node = node[p]
            node[last] = value
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(data, root)
        (root / "dataset.json").write_text(json.dumps(doc))
        with pytest.raises(DataError) as err:
            plan_data(load_config(TrainConfig, TINY, list(train)), str(root), world_size=1)
        return str(err.value)

    msg = fails({"output_config.video.frames": 16})
    assert "video.frames=16" in msg and "unet.frames=8" in msg and "set unet.frames=16" in msg
    msg = fails({"output_config.models.vae": "stabilityai/stable-diffusion-2-1"}, "model.vae=tiny")
    assert "models.vae='stabilityai/stable-diffusion-2-1'" in msg and "model.vae='tiny'" in msg
    assert "set model.vae=stabilityai/stable-diffusion-2-1" in msg
    # model.vae=auto (tiny.yaml) records the prep's VAE; it needs dataset.json to name one.
    assert cfg.model.vae == "tiny" and load_config(TrainConfig, TINY).model.vae == "auto"
    msg = fails({"output_config.models.vae": None})
    assert "model.vae=auto" in msg and "names no models.vae" in msg
    msg = fails({}, "unet.context_dim=32")  # the shards hold 64-wide text tokens
    assert "unet.context_dim=32" in msg and "set unet.context_dim=64" in msg
    msg = fails({}, "model.text=ViT-H-14:laion2b_s32b_b79k")
    assert "models.text='tiny'" in msg and "model.text='ViT-H-14:laion2b_s32b_b79k'" in msg
    msg = fails({"output_config.video.width": 256})  # latents would be [8,4,8,32]
    assert "bad_shape" in msg and "(8, 4, 8, 32)" in msg
    msg = fails({"format_version": 2})
    assert "format_version is 2" in msg
    # One bad sample first, behind an empty shard, is no reason to refuse the job.
    bad = tmp_path / "firstbad"
    shutil.copytree(data, bad)
    write_shard(bad / "videos" / "000000.tar", [])  # all rows failed in prep: ok 0
    rng = np.random.default_rng(1)
    first = [(n, b"[]" if n.endswith(".json") else b) for n, b in record("video", 50, rng)]
    write_shard(bad / "videos" / "000001.tar", [first, record("video", 51, rng)])
    assert plan_data(cfg, str(bad), world_size=1).sources["video"].sizes[:2] == [0, 2]
    (data / "dataset.json").unlink()
    with pytest.raises(DataError, match="no dataset.json"):
        plan_data(cfg, str(data), world_size=1)


def test_cli_reports_bad_input_before_the_first_step(tmp_path, dataset):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "training/train.py",
        "--config",
        str(TINY),
        "--data",
        str(dataset),
        "--output",
        str(out),
        "roles.image_ranks=2",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "roles.image_ranks" in done.stderr and "only 1 ranks" in done.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_bad_samples_reach_metrics_and_console(tmp_path):
    """A data root with NaN latents and a JSON list: training runs, metrics.jsonl counts them."""
    rng = np.random.default_rng(0)
    data = make_dataset(tmp_path / "data", kinds=("video",), video_shards=1, per_shard=4)
    samples = [record("video", 100 + i, rng) for i in range(4)]
    nan = np.full((8, 4, 8, 16), np.nan, np.float16)
    samples[1] = [(n, npy_bytes(nan) if n.endswith("latents.npy") else b) for n, b in samples[1]]
    samples[2] = [(n, b"[1]" if n.endswith(".json") else b) for n, b in samples[2]]
    write_shard(data / "videos" / "000001.tar", samples)
    out = tmp_path / "run"
    cmd = [sys.executable, "training/train.py", *train_args(
        data, out, "--max-steps", "3", "data.num_workers=0",
        "data.shuffle_shards=1",  # file order: 3 steps of 2 read every sample of both shards
    )]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["bad_by_reason"] == {"non_finite": 1, "bad_json": 1} and last["bad_samples"] == 2
    assert "[data] video rank 0: skipped" in done.stdout and "non_finite" in done.stdout


def fake_checkpoint(root: Path, step: int, world: int = 2, complete: bool = True) -> Path:
    path = root / "checkpoints" / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for r in range(world):
        (path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
        ckpt.rank_file(path, r).write_text("{}")
    if complete:
        (path / ckpt.COMPLETE).write_text(json.dumps({"world_size": world, "step": step}))
    return path


def test_incomplete_checkpoints_are_never_chosen(tmp_path):
    fake_checkpoint(tmp_path, 2)
    good = fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)  # killed before complete.json
    missing_rank = fake_checkpoint(tmp_path, 8)
    ckpt.rank_file(missing_rank, 1).unlink()
    missing_optim = fake_checkpoint(tmp_path, 10)
    next(missing_optim.glob("*optim_states.pt")).unlink()
    assert ckpt.find_latest_complete(tmp_path, log=lambda m: None) == good
    assert ckpt.resolve_resume("auto", tmp_path, log=lambda m: None) == good
    assert ckpt.resolve_resume("none", tmp_path) is None
    with pytest.raises(ckpt.ResumeError, match="missing rank_00001.json"):
        ckpt.resolve_resume(str(missing_rank), tmp_path)
    ckpt.prune(tmp_path, keep=1, log=lambda m: None)
    left = [p.name for _, p in ckpt.list_checkpoints(tmp_path)]
    assert left == [
        "step_0000004",
        "step_0000006",
        "step_0000008",
        "step_0000010",
    ]  # newer kept for inspection
    shutil.rmtree(tmp_path / "checkpoints")
    assert ckpt.find_latest_complete(tmp_path) is None


def test_rng_state_round_trips_through_json():
    gen = torch.Generator().manual_seed(5)
    state = json.loads(json.dumps(ckpt.rng_state(gen)))
    expect = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0), gen.manual_seed(0)
    ckpt.set_rng_state(state, gen)
    assert (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=gen).item(),
    ) == expect
