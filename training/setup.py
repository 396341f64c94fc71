"""Everything decided before the first step: process group, rank role, data checks, model,
resume target, DeepSpeed engine. Bad input fails here, on every rank alike, with a clear error."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.config import ConfigError
from core.shards import BadSample, ShardError, check_sample, load_npy
from training import checkpoint as ckpt_lib
from training.config import TrainConfig
from training.roles import VIDEO, RankRole, assign_role, roles_needed
from training.sources import DataError, ReadOptions, ShardReader, ShardSource, load_source, read_dataset_json


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
    else:
        release_shm_name(dist.get_rank())
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def release_shm_name(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name once every rank has mapped it.

    With all ranks on one host, DeepSpeed's CPU shm all-reduce creates
    /dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK (~70 MB each) and never unlinks it,
    so every CPU launch leaked world_size of them into RAM-backed tmpfs (19 GB after a day of
    test runs here). Peers open the names only inside `init_distributed`; after the barrier
    nobody needs them, and the mappings stay valid until the process exits, killed or not."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    path = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    if dist.get_world_size() > 1:
        dist.barrier()
    path.unlink(missing_ok=True)


@dataclass
class DataPlan:
    sources: dict[str, ShardSource]  # role -> shards, sample counts, sample spec
    frames: int  # F of the video shards (0 when no video ranks)
    dataset: dict[str, Any]  # the data root's dataset.json

    @property
    def shards(self) -> dict[str, list[str]]:
        return {role: src.urls for role, src in self.sources.items()}


def _disagree(field_prep: str, prep: Any, field_train: str, train: Any, fix: str) -> DataError:
    return DataError(
        f"dataset.json says {field_prep}={prep!r} (prep) but the training config has "
        f"{field_train}={train!r}; {fix}"
    )


def check_dataset(cfg: TrainConfig, dataset: dict[str, Any], roles: set[str]) -> None:
    """Facts stated on both sides (prep config in dataset.json, training config) must agree."""
    out = dataset.get("output_config") or {}
    models = out.get("models") or {}
    if cfg.model.vae == "auto":
        # The data says which VAE its latents live in; record that one for sampling.
        if not models.get("vae"):
            raise DataError("model.vae=auto but dataset.json names no models.vae; set model.vae to the "
                            "VAE the shards were encoded with")
        cfg.model.vae = models["vae"]
    if models.get("vae") not in (None, cfg.model.vae):
        raise _disagree(
            "models.vae",
            models["vae"],
            "model.vae",
            cfg.model.vae,
            f"the latents live in that VAE's space: set model.vae={models['vae']}",
        )
    prep_text = models.get("text")
    if prep_text is not None and cfg.model.text is not None and prep_text != cfg.model.text:
        raise _disagree(
            "models.text",
            prep_text,
            "model.text",
            cfg.model.text,
            "precomputed tokens and encoded captions must come from one text encoder: "
            f"set model.text={prep_text}",
        )
    frames = (out.get("video") or {}).get("frames")
    if VIDEO in roles and isinstance(frames, int) and frames > cfg.unet.frames:
        raise _disagree(
            "video.frames",
            frames,
            "unet.frames",
            cfg.unet.frames,
            f"set unet.frames={frames}, or re-run prep with video.frames={cfg.unet.frames}",
        )


PROBE_SAMPLES = 16  # samples read at start-up to tell a bad sample from a data root that disagrees


def probe(src: ShardSource, read: ReadOptions, text_width: Callable[[int, str], None]) -> None:
    """Read samples from the first shards that hold any until one passes the checks. One bad
    sample never stops a job; if the first PROBE_SAMPLES all fail, dataset.json and the shards
    disagree (or the data is garbage) and the job stops here, naming why. `text_width` sees the
    width of the first readable `.text.npy` (a config mismatch to report as such)."""
    seen: list[str] = []
    widths: list[int] = []
    for url in [u for u, n in zip(src.urls, src.sizes) if n > 0][:PROBE_SAMPLES]:
        reader = ShardReader(url, 0, read)
        try:
            while len(seen) < PROBE_SAMPLES and (raw := reader.next()) is not None:
                if "text.npy" in raw.members and not widths:
                    try:
                        widths.append(load_npy(raw.members["text.npy"]).shape[-1])
                    except (ValueError, IndexError):
                        pass  # unreadable tokens: check_sample counts them
                    if widths:
                        text_width(widths[0], url)
                try:
                    check_sample(raw, src.spec)
                    return
                except BadSample as err:
                    seen.append(f"{url}: {err}")
        except ShardError as err:
            seen.append(f"{url}: {err}")
        finally:
            reader.close()
        if len(seen) >= PROBE_SAMPLES:
            break
    if not seen:
        raise DataError(f"no {src.spec.kind} shard holds a sample ({src.urls[0]}, ...); rerun prep")
    raise DataError(
        f"the first {len(seen)} {src.spec.kind} samples all fail the checks against dataset.json, "
        f"so the shards and dataset.json disagree: rerun prep. First: {seen[0]}"
    )


def plan_data(cfg: TrainConfig, root: str, world_size: int) -> DataPlan:
    """Read dataset.json, check it against the config, list the shards of every role the job
    needs and probe their first samples (every rank checks all roles, so a bad data root stops
    all ranks before any collective)."""
    storage = cfg.data.storage_options
    roles = roles_needed(cfg.roles, world_size)
    dataset = read_dataset_json(root, storage)
    check_dataset(cfg, dataset, roles)
    sources = {}
    read = ReadOptions(
        dict(storage), cfg.data.max_member_bytes, cfg.data.read_retries, cfg.data.retry_backoff_s
    )
    for role in sorted(roles):
        src = sources[role] = load_source(root, role, storage, cfg.unet.context_dim, dataset)

        def text_width(width: int, url: str) -> None:
            if width != cfg.unet.context_dim:
                raise _disagree(
                    "models.text",
                    (dataset.get("output_config") or {}).get("models", {}).get("text"),
                    "unet.context_dim",
                    cfg.unet.context_dim,
                    f"{url} holds {width}-wide text tokens: set unet.context_dim={width} "
                    f"(with a matching model.text), or re-run prep with a "
                    f"{cfg.unet.context_dim}-wide models.text",
                )

        probe(src, read, text_width)
    frames = sources[VIDEO].spec.frames if VIDEO in sources else 0
    return DataPlan(sources, frames, dataset)


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
