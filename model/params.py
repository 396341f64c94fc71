"""Parameter groups (docs/method.md#groups): `spatial` = the modules SD 2.1 has (pretrained), `temporal` =
temporal convs / transformers, spatial-prior conv, guidance MLPs and any other new module.

Computed from the module tree: a parameter is temporal iff it sits below a `TemporalModule`.
"""

from __future__ import annotations

from torch import nn

from model.attention import TemporalModule


def param_groups(unet: nn.Module) -> dict[str, list[str]]:
    """{"spatial": [names], "temporal": [names]}, in `named_parameters()` order."""
    temporal: set[str] = set()
    for prefix, module in unet.named_modules():
        if isinstance(module, TemporalModule):
            temporal.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
    names = [n for n, _ in unet.named_parameters()]
    return {"spatial": [n for n in names if n not in temporal],
            "temporal": [n for n in names if n in temporal]}
