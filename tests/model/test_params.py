"""The spatial / temporal parameter split, pinned against SD 2.1's own UNet class."""

from __future__ import annotations

from model_testlib import tiny_unet, unet2d  # noqa: F401  (fixture)

from model.params import param_groups
from model.weights import key_map


def test_every_parameter_in_exactly_one_group():
    unet = tiny_unet(use_text_tokens_projection=True)
    groups = param_groups(unet)
    names = [n for n, _ in unet.named_parameters()]
    assert sorted(groups["spatial"] + groups["temporal"]) == sorted(names)
    assert not set(groups["spatial"]) & set(groups["temporal"])
    for name in groups["temporal"]:
        assert name.split(".")[0] in {"spatial_prior", "motion_embedding", "appearance_embedding",
                                      "text_projection"} or ".temopral_conv." in name or _in_temporal_slot(
                                          unet, name), name


def _in_temporal_slot(unet, name: str) -> bool:
    return any(s.temporal and name.startswith(s.ours + ".") for s in unet.slots)


def test_spatial_group_is_exactly_the_sd21_unet(unet2d):  # noqa: F811
    unet = tiny_unet(pretrained_spatial=False)
    groups = param_groups(unet)
    to_ours = {src: ours for ours, src in key_map(unet, "diffusers2d").items()}
    sd_keys = [k for k in unet2d.state_dict()]
    unmapped = [k for k in sd_keys if k not in to_ours]
    assert not unmapped, f"SD UNet keys with no place in HiGenUNet: {unmapped[:5]}"
    assert {to_ours[k] for k in sd_keys} == set(groups["spatial"])
    # The LDM layout covers the same parameters.
    assert set(key_map(unet, "ldm")) == set(groups["spatial"])
