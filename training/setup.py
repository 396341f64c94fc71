"""Everything decided before the first step: process group, rank role, data checks, model,
resume target, DeepSpeed engine. Bad input fails here, on every rank alike, with a clear error."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.config import ConfigError
from training import checkpoint as ckpt_lib
from training.config import TrainConfig
from training.data import DataError, check_format, list_shards, read_shard
from training.roles import IMAGE, VIDEO, RankRole, assign_role, roles_needed


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group; `python training/train.py` alone is a world of one."""
    import deepspeed

    if "RANK" not in os.environ:  # not started by a launcher
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


@dataclass
class DataPlan:
    shards: dict[str, list[str]]  # role -> complete shard URLs
    frames: int  # F of the video shards (0 when no video ranks)


def plan_data(cfg: TrainConfig, root: str, world_size: int) -> DataPlan:
    """List and check the shards of every role the job needs (every rank checks all roles, so
    a bad data root stops all ranks before any collective)."""
    shards, frames, storage = {}, 0, cfg.data.storage_options
    for role in sorted(roles_needed(cfg.roles, world_size)):
        shards[role] = list_shards(root, role, storage)
        check_format(shards[role][0], storage)
    if VIDEO in shards:
        from core.shard_format import decode_members

        first = decode_members(next(iter(read_shard(shards[VIDEO][0], storage))))
        frames = int(first["latents"].shape[0])
        if frames > cfg.unet.frames:
            raise DataError(
                f"{shards[VIDEO][0]}: clips have {frames} frames but unet.frames={cfg.unet.frames}; "
                f"set unet.frames={frames} or re-run prep with video.frames={cfg.unet.frames}"
            )
    if IMAGE in shards:
        from core.shard_format import decode_members

        first = decode_members(next(iter(read_shard(shards[IMAGE][0], storage))))
        if first["latents"].ndim != 3:
            raise DataError(
                f"{shards[IMAGE][0]}: image latents must be [4,h,w], got {first['latents'].shape}"
            )
    return DataPlan(shards, frames)


def check_text_width(width: int, cfg: TrainConfig) -> None:
    if width != cfg.unet.context_dim:
        raise ConfigError(
            f"config field 'unet.context_dim': {cfg.unet.context_dim} differs from the width {width} "
            f"of text encoder model.text={cfg.model.text!r}; make them agree"
        )


def build_unet(cfg: TrainConfig, seed: int):
    from model.unet import HiGenUNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical initial weights on every rank
        unet = HiGenUNet(cfg.unet)
    if cfg.model.init:
        from safetensors.torch import load_file

        missing, unexpected = unet.load_state_dict(load_file(cfg.model.init), strict=False)
        if unexpected:
            raise ConfigError(
                f"config field 'model.init': {cfg.model.init} has keys the UNet lacks: {unexpected[:5]}"
            )
        if missing and dist.get_rank() == 0:
            print(f"[init] {len(missing)} parameters not in {cfg.model.init} keep their initialisation")
    return unet


@dataclass
class ResumePlan:
    path: Path | None
    meta: dict[str, Any]
    same_world: bool
    load_dir: str = ""
    tag: str = ""


def plan_resume(resume: str, output: str, world_size: int, log=print) -> ResumePlan:
    """Rank 0 picks the checkpoint (and converts it for a new world size); all ranks agree."""
    choice: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            choice[0] = str(ckpt_lib.resolve_resume(resume, output, log) or "")
        except ckpt_lib.ResumeError as err:
            choice[0] = err
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    if not choice[0]:
        return ResumePlan(None, {}, True)
    path = Path(choice[0])
    meta = ckpt_lib.checkpoint_meta(path)
    same = int(meta["world_size"]) == world_size
    plan = ResumePlan(path, meta, same, str(path.parent), path.name)
    if not same:
        status: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                ckpt_lib.prepare_universal(path, log)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                status[0] = repr(err)
        dist.broadcast_object_list(status, src=0)
        if status[0]:
            raise RuntimeError(f"Universal Checkpoint conversion failed: {status[0]}")
        plan.load_dir, plan.tag = str(path), ckpt_lib.UNIVERSAL
    return plan


def role_for(cfg: TrainConfig, rank: int, world_size: int) -> RankRole:
    return assign_role(cfg.roles, rank, world_size)
