"""Image ranks and video ranks (docs/method.md#ranks, paper §3.4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import ConfigError
from training.config import RolesConfig

IMAGE, VIDEO = "image", "video"


@dataclass(frozen=True)
class RankRole:
    role: str  # IMAGE | VIDEO
    role_rank: int  # index of this rank among the ranks of its role
    role_size: int  # how many ranks have this role
    micro_batch: int

    @property
    def is_image(self) -> bool:
        return self.role == IMAGE


def num_image_ranks(cfg: RolesConfig, world_size: int) -> int:
    count = (
        cfg.image_ranks if cfg.image_ranks is not None else math.floor(world_size * cfg.image_ratio + 1e-9)
    )
    if count > world_size:
        raise ConfigError(
            f"config field 'roles.image_ranks': asks for {count} image ranks but the job has only "
            f"{world_size} ranks; lower roles.image_ranks or launch more ranks"
        )
    return count


def image_rank_ids(cfg: RolesConfig, world_size: int) -> list[int]:
    """Image ranks spread evenly: rank r is one when floor((r+1)k/W) > floor(rk/W).

    With k = W/4 this is exactly the released code's `rank % 4 == 3`.
    """
    k = num_image_ranks(cfg, world_size)
    return [r for r in range(world_size) if (r + 1) * k // world_size > r * k // world_size]


def assign_role(cfg: RolesConfig, rank: int, world_size: int) -> RankRole:
    images = image_rank_ids(cfg, world_size)
    if rank in images:
        return RankRole(IMAGE, images.index(rank), len(images), cfg.image_micro_batch)
    videos = [r for r in range(world_size) if r not in images]
    return RankRole(VIDEO, videos.index(rank), len(videos), cfg.video_micro_batch)


def roles_needed(cfg: RolesConfig, world_size: int) -> set[str]:
    k = num_image_ranks(cfg, world_size)
    return ({IMAGE} if k > 0 else set()) | ({VIDEO} if k < world_size else set())
