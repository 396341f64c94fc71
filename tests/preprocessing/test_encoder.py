"""`Encoder` with the tiny models: latents, motion, appearance, text, batching, isolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.shard_format import SampleError, SampleRecord
from preprocessing.factors import appearance_matrix, motion_factors
from preprocessing.process import Decoded, Encoder
from preprocessing.settings import ModelsConfig


def clip(seed: int, frames: int = 8, h: int = 64, w: int = 128) -> Decoded:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels = np.stack([np.roll(base, 4 * i, axis=1) for i in range(frames)])  # content sliding right
    return Decoded(f"{seed:024x}", "video", f"/data/clip{seed}.mp4", f"clip {seed}", pixels,
                   {"source": f"/data/clip{seed}.mp4", "frame_indices": list(range(frames))})


def image(seed: int) -> Decoded:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    return Decoded(f"{seed:024x}", "image", f"/data/img{seed}.png", f"image {seed}", pixels, {})


def test_video_record_matches_the_spec(encoder):
    d = clip(1)
    [rec] = encoder.encode([d])
    assert isinstance(rec, SampleRecord) and rec.key == d.key and rec.caption == d.caption
    assert rec.latents.dtype == np.float16 and rec.latents.shape == (8, 4, 8, 16)
    assert rec.motion.dtype == np.float32 and rec.motion.shape == (7,)
    assert rec.appearance.dtype == np.float32 and rec.appearance.shape == (8, 8)
    assert np.array_equal(rec.appearance, rec.appearance.T) and np.all(np.diag(rec.appearance) == 1)
    assert rec.text is None
    assert rec.meta["models"] == encoder.model_ids and rec.meta["frame_indices"] == list(range(8))
    assert encoder.model_ids["vae"] == "tiny" and encoder.model_ids["semantic"] == "tiny"


def test_latents_are_the_scaled_posterior_mean(encoder):
    d = clip(2)
    [rec] = encoder.encode([d])
    x = torch.from_numpy(d.pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        posterior = encoder.vae.encode(x).latent_dist
    expected = (posterior.mean * encoder.vae.config.scaling_factor).numpy()
    np.testing.assert_allclose(rec.latents.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert encoder.scaling_factor == pytest.approx(0.18215)
    # the mean, not a sample: encoding twice gives the same latents
    assert np.array_equal(encoder.encode([d])[0].latents, rec.latents)


def test_motion_and_appearance_come_from_latents_and_semantic_features(encoder):
    d = clip(3)
    [rec] = encoder.encode([d])
    z = encoder.vae_latents(d.pixels)
    np.testing.assert_allclose(rec.motion, motion_factors(z), rtol=1e-5)
    expected = appearance_matrix(encoder.semantic_features(d.pixels))
    np.testing.assert_allclose(rec.appearance, expected, atol=1e-6)
    static = Decoded("ab" * 12, "video", "/data/still.mp4", "still", np.repeat(d.pixels[:1], 8, 0), {})
    [still] = encoder.encode([static])
    assert np.allclose(still.motion, 0, atol=1e-4) and np.allclose(still.appearance, 1, atol=1e-5)
    assert rec.motion.min() > 10 * max(still.motion.max(), 1e-6)


def test_chunking_and_batching_do_not_change_results(tiny_models, encoder):
    batch = [clip(4), image(5), clip(6, frames=8), image(7)]
    together = encoder.encode(batch)
    small = Encoder(ModelsConfig(**{**tiny_models.__dict__, "batch_size": 3}))
    alone = [small.encode([d])[0] for d in batch]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.latents.astype(np.float32), b.latents.astype(np.float32), atol=2e-3)
        if a.motion is not None:
            np.testing.assert_allclose(a.motion, b.motion, rtol=1e-3)
            np.testing.assert_allclose(a.appearance, b.appearance, atol=1e-4)


def test_images_get_latents_only(encoder):
    [rec] = encoder.encode([image(8)])
    assert rec.latents.shape == (4, 8, 16) and rec.latents.dtype == np.float16
    assert rec.motion is None and rec.appearance is None
    names = [n for n, _ in rec.members()]
    assert names == [f"{rec.key}.json", f"{rec.key}.latents.npy", f"{rec.key}.txt"]


def test_one_broken_sample_fails_alone(encoder):
    broken = clip(9)
    broken.pixels = broken.pixels[..., :2]  # two colour channels: the VAE cannot take it
    out = encoder.encode([clip(10), broken, clip(11)])
    assert isinstance(out[0], SampleRecord) and isinstance(out[2], SampleRecord)
    assert isinstance(out[1], SampleError) and out[1].reason == "encode_error"
    assert broken.source in out[1].detail


def test_text_tokens(tiny_models):
    enc = Encoder(ModelsConfig(**{**tiny_models.__dict__, "text": "tiny"}))
    recs = enc.encode([clip(12), image(13)])
    for rec in recs:
        assert rec.text.dtype == np.float16 and rec.text.shape == (77, 64)
    assert not np.array_equal(recs[0].text, recs[1].text)
    assert enc.model_ids["text"] == "tiny"


def test_semantic_alternatives_and_local_checkpoint(tmp_path, tiny_models, encoder):
    from safetensors.torch import save_file

    frames = clip(14).pixels
    ckpt = tmp_path / "tiny_dino.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.semantic.net.state_dict().items()}, str(ckpt))
    reloaded = Encoder(ModelsConfig(**{**tiny_models.__dict__, "semantic_checkpoint": str(ckpt)}))
    expected = encoder.semantic_features(frames)
    np.testing.assert_allclose(reloaded.semantic_features(frames), expected, atol=1e-5)
    assert str(ckpt) in reloaded.model_ids["semantic"]
    clip_enc = Encoder(ModelsConfig(**{**tiny_models.__dict__, "semantic": "open_clip:tiny"}))
    [rec] = clip_enc.encode([clip(15)])
    assert rec.appearance.shape == (8, 8) and clip_enc.model_ids["semantic"] == "open_clip:tiny"


def test_default_dinov2_loads_a_local_518px_checkpoint_at_224(tmp_path):
    import timm

    from core.semantic import SemanticModel

    torch.manual_seed(0)
    # what a DINOv2 ViT-S/14 checkpoint looks like: trained at 518 px (37x37 position grid)
    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False)
    ckpt = tmp_path / "dinov2_vits14.pth"
    torch.save(source.state_dict(), ckpt)
    model = SemanticModel("timm:vit_small_patch14_dinov2", str(ckpt))
    assert model.size == 224 and model.net.pos_embed.shape[1] == 1 + 16 * 16
    assert torch.equal(model.net.patch_embed.proj.weight, source.patch_embed.proj.weight)
    feats = model(torch.from_numpy(clip(16, frames=2).pixels))
    assert feats.shape == (2, 384) and torch.isfinite(feats).all()
