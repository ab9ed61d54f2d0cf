"""Velocity networks sharing ``net(x, t, cond=None) -> v`` and the ``output(features(x, t, cond))`` split."""
from __future__ import annotations

from torch import nn

from specflow.nets.dit import DiT
from specflow.nets.embed import count_params
from specflow.nets.mlp import MLP
from specflow.nets.unet import UNet

ARCHS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT, "mlp": MLP}


def build_net(arch: str, **kwargs) -> nn.Module:
    """Construct a net by name: ``build_net("unet", image_size=16, num_classes=10)``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    return ARCHS[arch](**kwargs)


__all__ = ["ARCHS", "DiT", "MLP", "UNet", "build_net", "count_params"]
