"""Key maps checked against diffusers' own classes and converter: load their state dicts, compare
outputs."""

from __future__ import annotations

import pytest
import torch
from model_testlib import TINY_2D, inputs, tiny_unet, unet2d, unet3d  # noqa: F401  (fixtures)
from safetensors.torch import save_file

from model.config import UNetConfig
from model.params import param_groups
from model.unet import HiGenUNet
from model.weights import WeightLoadError, key_map, load_pretrained


def test_sd21_diffusers_weights_give_the_same_image_model(unet2d):  # noqa: F811
    unet = tiny_unet(pretrained_spatial=False)
    report = load_pretrained(unet, unet2d.state_dict())
    groups = param_groups(unet)
    assert report.format == "diffusers2d"
    assert sorted(report.loaded) == sorted(groups["spatial"])
    assert sorted(report.kept_init) == sorted(groups["temporal"])
    x, t, ctx = inputs(frames=1)
    with torch.no_grad():
        ref = unet2d(x[:, :, 0], t, ctx).sample
        ours = unet(x, t, ctx, spatial_only=True)[:, :, 0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert ref.abs().mean() > 1e-2


def test_modelscope_diffusers_weights_give_the_same_video_model(unet3d):  # noqa: F811
    unet = tiny_unet(pretrained_spatial=False)
    report = load_pretrained(unet, unet3d.state_dict())
    assert report.format == "diffusers3d" and not report.missing and not report.unexpected
    assert all(n.split(".")[0] in {"spatial_prior", "motion_embedding", "appearance_embedding"}
               for n in report.kept_init)
    x, t, ctx = inputs(frames=4)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ref = unet3d(x, t, ctx).sample
        ours = unet(x, t, ctx, spatial_prior=torch.randn(2, 4, 8, 8, generator=gen),
                    motion=torch.rand(2, 3, generator=gen) * 50,
                    appearance_matrix=torch.rand(2, 4, 4, generator=gen))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_sd21_original_layout_through_diffusers_converter():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    source = tiny_unet(seed=4)
    state = source.state_dict()
    ldm = {f"model.diffusion_model.{src}": state[ours] for ours, src in key_map(source, "ldm").items()}
    reference = UNet2DConditionModel(**TINY_2D).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(reference.config)), strict=True)

    ldm["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)  # full SD checkpoints carry the VAE
    unet = tiny_unet(pretrained_spatial=False)
    assert load_pretrained(unet, ldm).format == "ldm"
    x, t, ctx = inputs(frames=1)
    with torch.no_grad():
        ref = reference(x[:, :, 0], t, ctx).sample
        torch.testing.assert_close(source(x, t, ctx, spatial_only=True)[:, :, 0], ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(unet(x, t, ctx, spatial_only=True)[:, :, 0], ref, rtol=1e-4, atol=1e-5)


def test_modelscope_original_layout_with_conv1d_temporal_projections(unet3d, tmp_path):  # noqa: F811
    source = tiny_unet(pretrained_spatial=False)
    load_pretrained(source, unet3d.state_dict())
    ms = {}
    for ours, src in key_map(source, "modelscope").items():
        value = source.state_dict()[ours]
        if any(s.kind == "temporal" and ours.startswith(s.ours + ".proj_") for s in source.slots) \
                and ours.endswith("weight"):
            value = value[..., None]  # ModelScope stores these as 1x1 Conv1d
        ms[src] = value
    save_file(ms, str(tmp_path / "text2video.safetensors"))
    unet = tiny_unet(pretrained_spatial=False)
    assert load_pretrained(unet, tmp_path / "text2video.safetensors").format == "modelscope"
    x, t, ctx = inputs(frames=3)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx), unet3d(x, t, ctx).sample, rtol=1e-4, atol=1e-5)


def test_full_size_maps_cover_text_to_video_ms_1_7b():
    from diffusers import UNet3DConditionModel

    with torch.device("meta"):
        unet = HiGenUNet(UNetConfig())
        reference = UNet3DConditionModel()  # defaults = text-to-video-ms-1.7b's unet config
    ref = reference.state_dict()
    ours = unet.state_dict()
    mapping = key_map(unet, "diffusers3d")
    assert set(mapping.values()) == set(ref)
    assert all(ours[o].shape == ref[s].shape for o, s in mapping.items())
    # ModelScope UNetSD names (its checkpoint layout): bare Downsample, typo'd temporal conv, 4 mid entries.
    for key in ("input_blocks.3.op.weight", "input_blocks.0.1.proj_in.weight",
                "input_blocks.1.0.temopral_conv.conv4.3.weight",
                "input_blocks.1.2.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.3.out_layers.3.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.3.conv.weight", "output_blocks.11.2.proj_out.weight", "out.2.weight"):
        assert key in ours, key
    assert key_map(unet, "ldm")["output_blocks.5.3.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert key_map(unet, "ldm")["input_blocks.3.op.weight"] == "input_blocks.3.0.op.weight"


def test_checkpoint_of_another_architecture_is_refused(unet2d, tmp_path):  # noqa: F811
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**TINY_2D, "cross_attention_dim": 32})
    with pytest.raises(WeightLoadError, match=r"attn2\.to_k\.weight \(32, 32\).*\(32, 64\)"):
        load_pretrained(tiny_unet(pretrained_spatial=False), other.state_dict())
    with pytest.raises(WeightLoadError, match="not a UNet checkpoint.*encoder.conv_in.weight"):
        load_pretrained(tiny_unet(pretrained_spatial=False), {"encoder.conv_in.weight": torch.zeros(3)})

    state = dict(unet2d.state_dict())
    del state["conv_out.bias"]
    state["add_embedding.linear_1.weight"] = torch.zeros(2)
    with pytest.raises(WeightLoadError, match="conv_out.bias.*add_embedding"):
        load_pretrained(tiny_unet(pretrained_spatial=False), state)
    report = load_pretrained(tiny_unet(pretrained_spatial=False), state, strict=False)
    assert report.missing == ["conv_out.bias"] and report.unexpected == ["add_embedding.linear_1.weight"]


def test_reads_a_diffusers_folder(unet2d, tmp_path):  # noqa: F811
    (tmp_path / "unet").mkdir()
    save_file({k: v.contiguous() for k, v in unet2d.state_dict().items()},
              str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert load_pretrained(tiny_unet(pretrained_spatial=False), tmp_path).format == "diffusers2d"
    with pytest.raises(WeightLoadError, match="not found"):
        load_pretrained(tiny_unet(pretrained_spatial=False), tmp_path / "missing.safetensors")
