"""Checks and preparations the driver makes before the first shard, for decoders and devices:
a setting that cannot work here is one clear error naming it, never a failed row per sample.

- `check_decoder`: the configured video decoder backend is installed and starts.
- `check_devices`: CUDA is asked for only where the cluster has GPUs, and where the work that
  needs it (encoder actors, nvdec) actually holds one.
- `local_model_paths`: hub models fetched once, here, so encoder actors load from a local path
  and a thousand actors never hit the hub at once.
"""

from __future__ import annotations

import importlib.util
import os

from core.config import ConfigError
from pipeline.config import PrepConfig


def check_decoder(cfg: PrepConfig) -> None:
    from preprocessing.backends import BackendUnavailable, preflight

    decoder = cfg.video.decoder
    if decoder == "nvdec" and not any(importlib.util.find_spec(m) for m in ("PyNvVideoCodec", "torchcodec")):
        raise ConfigError(
            "config field 'video.decoder': nvdec needs PyNvVideoCodec or torchcodec installed "
            "(`pip install torchcodec`); or set video.decoder=decord", field="video.decoder"
        )
    if decoder == "torchcodec":
        try:
            preflight(cfg.video)
        except BackendUnavailable as exc:
            raise ConfigError(str(exc), field="video.decoder") from None


def actor_env(cfg: PrepConfig) -> dict[str, str]:
    """Environment variables of the encoder actors. nvdec through torchcodec loads FFmpeg in the
    actor process, found through LD_LIBRARY_PATH, which the loader reads when the process
    starts: so the library folder (`backends.ffmpeg_library_dir`) is made on every node first."""
    if cfg.video.decoder != "nvdec" or importlib.util.find_spec("torchcodec") is None:
        return {}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from preprocessing.backends import ffmpeg_library_dir

    make = ray.remote(num_cpus=0)(ffmpeg_library_dir)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    on = [make.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)) for n in nodes]
    found = set(ray.get([f.remote() for f in on]))
    dirs = sorted(d for d in found if d)
    if len(dirs) > 1:
        raise ConfigError(
            "config field 'video.decoder': nodes install PyAV in different places "
            f"({', '.join(dirs)}); install FFmpeg 4-8 system libraries or use one environment",
            field="video.decoder",
        )
    if not dirs:
        return {}
    return {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, [dirs[0], os.environ.get("LD_LIBRARY_PATH")]))}


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda")


def check_devices(cfg: PrepConfig, gpus: float, encoders: int) -> None:
    ex, device = cfg.execution, cfg.models.device
    if _wants_cuda(device) and not gpus:
        raise ConfigError(
            f"config field 'models.device': {device} asked for, but the Ray cluster has no GPUs; "
            "set models.device=cpu (or auto), or start Ray nodes with GPUs", field="models.device"
        )
    if _wants_cuda(device) and (encoders == 0 or ex.gpus_per_encoder == 0):
        raise ConfigError(
            f"config field 'models.device': {device} needs encoder actors that hold a GPU "
            f"(execution.encoders={encoders}, execution.gpus_per_encoder={ex.gpus_per_encoder:g}); "
            "shard tasks hold no GPU. Set execution.encoders=-1 and gpus_per_encoder > 0",
            field="models.device",
        )
    if cfg.video.decoder == "nvdec":
        if device == "cpu" or not gpus or encoders == 0 or ex.gpus_per_encoder == 0:
            raise ConfigError(
                "config field 'video.decoder': nvdec decodes on the encoder actors' GPUs, but "
                f"models.device={device}, the cluster has {gpus:g} GPUs and {encoders} encoder actors "
                f"with {ex.gpus_per_encoder:g} GPU each; use video.decoder=decord or torchcodec, or "
                "run GPU encoder actors (execution.encoders=-1, gpus_per_encoder > 0)",
                field="video.decoder",
            )


def _is_hub_id(spec: str) -> bool:
    return spec != "tiny" and not os.path.exists(spec) and "/" in spec and not spec.startswith(("/", "."))


def local_model_paths(cfg: PrepConfig) -> dict[str, str]:
    """{"vae": folder, "semantic_checkpoint": file} for the hub models of `cfg.models`, fetched
    (or found in the cache) by the driver. Set HF_HOME to storage every node can read."""
    models, out = cfg.models, {}
    if _is_hub_id(models.vae):
        from huggingface_hub import snapshot_download

        try:
            out["vae"] = snapshot_download(
                models.vae, allow_patterns=["vae/*", "config.json", "diffusion_pytorch_model*"]
            )
        except Exception as exc:
            raise ConfigError(
                f"config field 'models.vae': the driver cannot fetch {models.vae} "
                f"({type(exc).__name__}: {str(exc)[:200]}); download it and give a local folder",
                field="models.vae",
            ) from None
    if models.semantic.startswith("timm:") and models.semantic_checkpoint is None:
        name = models.semantic[len("timm:"):]
        try:
            import timm
            from huggingface_hub import hf_hub_download

            tag = timm.models.get_pretrained_cfg(name)
            repo = getattr(tag, "hf_hub_id", None) if tag is not None else None
            if repo:
                out["semantic_checkpoint"] = hf_hub_download(repo, "model.safetensors")
        except Exception as exc:
            raise ConfigError(
                f"config field 'models.semantic': the driver cannot fetch the weights of {name} "
                f"({type(exc).__name__}: {str(exc)[:200]}); give models.semantic_checkpoint=/path",
                field="models.semantic",
            ) from None
    return out
