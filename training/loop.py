"""The training loop: image ranks and video ranks under one DeepSpeed engine (docs/method.md#ranks).

Every rank calls the same UNet forward: video ranks with F frames, the middle-frame spatial
prior, motion and appearance; image ranks with F=1 and `spatial_only=True`, where the temporal
layers run behind a zero gate. So all ranks run the same autograd graph, which ZeRO requires.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from core.config import to_dict
from core.redact import redact_secrets
from core.statistics import read_dataset_statistics
from model.calibration import resolve_appearance_affine
from model.guidance import appearance_affine
from model.unet import middle_frame_prior
from training import checkpoint as ckpt_lib
from training import setup
from training.config import TrainConfig
from training.data import RoleLoader, reduce_bad
from training.guard import NonFiniteGuard
from training.metrics import MetricsLog, count_train_flops, peak_flops, reduce_step
from training.optim import (
    EMA,
    apply_optim_config,
    deepspeed_config,
    install_grad_decay,
    make_optimizer,
    make_scheduler,
    resolve_precision,
)

PREEMPTED_EXIT = 143  # 128 + SIGTERM: the job stopped early but left a complete checkpoint


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    return (seed * 1_000_003 + rank * 7919 + step) % (2**63)


def public_yaml(cfg: TrainConfig) -> str:
    """The resolved config as written to disk: storage secrets redacted (core/redact.py)."""
    data = to_dict(cfg)
    data["data"]["storage_options"] = redact_secrets(data["data"]["storage_options"])
    return yaml.safe_dump(data, sort_keys=False)


class Trainer:
    def __init__(self, cfg: TrainConfig, data_root: str, output: str):
        self.cfg, self.data_root, self.output = cfg, data_root, str(output)
        self.stop_requested = False
        self.step = 0
        self.flops: float | None = None

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        import deepspeed

        from core.encoders import TextEncoder
        from model.diffusion import Diffusion
        from model.params import param_groups

        cfg = self.cfg
        self.rank, self.world, self.device = setup.init_distributed()
        self.role = setup.role_for(cfg, self.rank, self.world)
        self.plan = setup.plan_data(cfg, self.data_root, self.world)
        roles = "".join(setup.role_for(cfg, r, self.world).role[0] for r in range(self.world))
        shards = {k: len(v) for k, v in self.plan.shards.items()}
        self.log(f"[train] world {self.world}, rank roles {roles} (i=image, v=video), shards {shards}")
        # Calibration (model/calibration.py): the data's statistics travel with every checkpoint,
        # and `unet.appearance_affine: auto` becomes the a, b they imply.
        stats, why = read_dataset_statistics(self.data_root, cfg.data.storage_options)
        if stats is None:
            self.log(f"[train] warning: calibration unavailable ({why}); sampling cannot check γm, γa")
        cfg.statistics = stats.to_dict() if stats else None
        cfg.unet = resolve_appearance_affine(cfg.unet, stats, why)
        if self.rank == 0:
            Path(self.output).mkdir(parents=True, exist_ok=True)
            (Path(self.output) / "config.yaml").write_text(public_yaml(cfg))

        self.text_encoder = self.null_context = None
        if cfg.model.text is not None:
            self.text_encoder = TextEncoder(cfg.model.text, device=self.device)
            setup.check_text_width(self.text_encoder.width, cfg)
            self.null_context = self.text_encoder([""])
        self.diffusion = Diffusion(cfg.diffusion)
        unet = setup.build_unet(cfg, cfg.data.seed)
        groups = param_groups(unet)

        if cfg.train.resume not in ("auto", "none"):  # same verdict on every rank, no collective
            ckpt_lib.check_trusted(cfg.train.resume, self.output, cfg.train.trust_checkpoint)
        self.resume = setup.plan_resume(cfg.train.resume, self.output, self.world, self.log)
        precision = resolve_precision(cfg)
        ds_cfg = deepspeed_config(
            cfg, self.role.micro_batch, precision, load_universal=not self.resume.same_world
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=unet, optimizer=make_optimizer(cfg, unet), lr_scheduler=make_scheduler(cfg), config=ds_cfg
        )
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.hooks = install_grad_decay(
            self.engine.module,
            groups["spatial"],
            cfg.optim.spatial_grad_decay,
            cfg.optim.grad_decay_mode,
            is_video_rank=not self.role.is_image,
        )
        self.ema = EMA(self.engine.module, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.generator = torch.Generator().manual_seed(rank_seed(cfg.data.seed, self.rank))
        self.loader = RoleLoader(self.plan.sources[self.role.role], self.role, cfg.data)
        self.guard = NonFiniteGuard(cfg.train.max_skipped_steps, self.rank, self.world, self.log)
        self.checkpoints = self._registry()
        if self.resume.path is not None:
            self._load()
        self.metrics = MetricsLog(self.output, self.rank == 0, cfg.train.tensorboard, cfg.train.log_every)
        return self

    def _registry(self) -> ckpt_lib.CheckpointManager:
        """Everything a checkpoint holds. New state: one `register` line."""
        cfg, C = self.cfg, ckpt_lib
        topology = {
            "world_size": self.world,
            "role": self.role.role,
            "role_rank": self.role.role_rank,
            "num_workers": self.loader.num_workers,
        }
        manager = C.CheckpointManager(self.output, cfg.train.keep, topology, self.log)
        after_load = lambda: apply_optim_config(self.engine.lr_scheduler, cfg)  # noqa: E731
        manager.register("engine", C.EngineState(self.engine, after_load), C.ENGINE)
        reseed = lambda step: self.loader.reseed(generation=step)  # noqa: E731
        manager.register("data", self.loader, C.RANK, rederive=reseed)
        seed_for = lambda step: rank_seed(cfg.data.seed, self.rank, step)  # noqa: E731
        manager.register("rng", C.RNGState(self.generator, seed_for), C.RANK)
        manager.register("ema", self.ema, C.SHARED)
        manager.register("metrics", self.guard, C.SHARED)
        return manager

    def _load(self) -> None:
        plan = self.resume
        how = self.checkpoints.load(plan.path, plan.load_dir, plan.tag, plan.same_world)
        self.step = int(plan.meta["step"])
        world = f"world {plan.meta['world_size']} -> {self.world} (universal)"
        if plan.same_world:
            world = "same world size"
        self.log(f"[train] resumed from {plan.path} at step {self.step} ({world}; {how})")

    # -- one step ------------------------------------------------------------------------------

    def context(self, batch: dict[str, Any]) -> torch.Tensor:
        """Precomputed `.text.npy` tokens where present, the frozen text encoder otherwise."""
        has = batch["has_text"]
        if bool(has.all()):
            ctx = batch["text"].to(self.device)
        else:
            if self.text_encoder is None:
                raise ValueError(
                    "a batch has samples without .text.npy tokens but model.text is null; "
                    "set model.text to the text encoder the shards were made for"
                )
            ctx = self.text_encoder(batch["caption"]).float()
            if bool(has.any()):
                ctx[has.to(self.device)] = batch["text"][has].to(self.device)
        return ctx.to(self.dtype)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        latents = batch["latents"].to(dev, dt)
        video = {}
        if not self.role.is_image:  # temporal reasoning: prior = middle frame latent, guidance
            video = {
                "spatial_prior": middle_frame_prior(latents),
                "motion": batch["motion"].to(dev),
                # The affine maps measured similarities into the MLP's input space (training only).
                "appearance_matrix": appearance_affine(
                    batch["appearance"].to(dev), self.cfg.unet.appearance_a, self.cfg.unet.appearance_b
                ),
            }
        return self.diffusion.training_loss(
            self.engine,
            latents,
            self.context(batch),
            spatial_only=self.role.is_image,
            generator=self.generator,
            null_context=None if self.null_context is None else self.null_context.to(dt),
            **video,
        )

    def forward_backward(self, batch: dict[str, Any]) -> float:
        loss = self.compute_loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):  # NaN in every gradient: DeepSpeed skips the step on all ranks
            loss = loss * float("nan")
        self.engine.backward(loss)
        return value

    def train_step(self) -> dict[str, Any]:
        t0, wait, losses, samples, shards = time.perf_counter(), 0.0, [], 0, []
        lr = float(self.engine.get_lr()[0])
        for _ in range(self.cfg.deepspeed.gradient_accumulation_steps):
            tw = time.perf_counter()
            batch = next(self.loader)
            wait += time.perf_counter() - tw
            samples += len(batch["caption"])
            shards += batch.get("shards", [])
            if self.flops is None and self.device.type == "cuda":
                self.flops = count_train_flops(lambda b=batch: losses.append(self.forward_backward(b)))
            else:
                losses.append(self.forward_backward(batch))
            self.engine.step()
        applied = self.engine.was_step_applied()
        self.step += 1
        loss = sum(losses) / len(losses)
        step_s = time.perf_counter() - t0
        red = reduce_step(
            self.role.role,
            loss,
            samples,
            wait,
            step_s,
            self.stop_requested,
            self.device,
            flops=self.flops or 0.0,
            bad=sum(self.loader.bad.values()),
            applied=applied,
        )
        skipped = self.guard.after_step(self.step, red, math.isfinite(loss), shards)
        if self.ema is not None and not skipped:
            self.ema.update(self.engine.module)
        bad_by_reason = reduce_bad(self.loader.bad, self.device)
        norm = self.engine.get_global_grad_norm()
        total = red["samples_image"] + red["samples_video"]
        record = {
            "step": self.step,
            "loss_image": red["loss_image"],
            "loss_video": red["loss_video"],
            "lr": lr,
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "samples": int(total),
            "samples_per_s": total / red["step_time"],
            "samples_per_s_image": red["samples_image"] / red["step_time"],
            "samples_per_s_video": red["samples_video"] / red["step_time"],
            "data_wait_fraction": red["data_wait_fraction"],
            "step_time": red["step_time"],
            "bad_samples": sum(n for k, n in bad_by_reason.items() if k != "bad_shard"),
            "bad_shards": bad_by_reason.get("bad_shard", 0),
            "bad_by_reason": bad_by_reason,
            "skipped": int(skipped),
            "skipped_steps": self.guard.total,
        }
        peak = peak_flops()
        if peak and red["flops"]:
            record["mfu"] = red["flops"] / red["step_time"] / (peak * self.world)
        return {**record, "stop": red["stop"]}

    # -- run -----------------------------------------------------------------------------------

    def save(self) -> None:
        meta = {"zero_stage": self.cfg.deepspeed.zero_stage, "roles": self.role.role_size}
        self.checkpoints.save(self.step, meta, config_yaml=public_yaml(self.cfg))

    def run(self, max_steps: int | None = None) -> int:
        cfg = self.cfg
        max_steps = cfg.train.max_steps if max_steps is None else max_steps
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        saved_at = self.step
        try:
            while self.step < max_steps:
                record = self.train_step()
                stop = record.pop("stop")
                self.metrics.log(record)
                self.guard.check()  # no checkpoint then: resuming would meet the same batches
                if self.step % cfg.train.save_every == 0 or stop or self.step == max_steps:
                    self.save()
                    saved_at = self.step
                if stop:
                    self.log(f"[train] SIGTERM: checkpoint at step {self.step} written, exiting")
                    return PREEMPTED_EXIT
            if saved_at != self.step and self.step > 0:
                self.save()
            return 0
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.loader.close()
            self.metrics.close()
            bad = dict(self.loader.bad)
            if bad:
                print(f"[train] rank {self.rank}: skipped data by reason {bad}", flush=True)

    def _on_sigterm(self, signum, frame) -> None:
        # Acted on after the current step, by all ranks together (the flag is all-reduced).
        self.stop_requested = True
