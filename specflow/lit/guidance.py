"""Classifier-free guidance as a velocity wrapper with the shared signature ``model(x, t, cond=None)``.

    v_w(x, t, y) = v(x, t, ∅) + w·(v(x, t, y) − v(x, t, ∅))

w = 0 is the unconditional model, w = 1 the plain conditional one, w > 1 trades diversity for fidelity.
The null class ∅ is the index ``num_classes`` of the net's label embedding (what label dropout trains).
This module imports torch only, so samplers can use it without Lightning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Guided:
    """A guided velocity callable; build it with ``guidance(net, scale)``."""

    net: nn.Module
    scale: float
    null_class: int

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            return self.net(x, t, None)  # unconditional pass-through
        null = torch.full_like(cond, self.null_class)
        if self.scale == 1.0:
            return self.net(x, t, cond)
        if self.scale == 0.0:
            return self.net(x, t, null)
        # One batched call of 2B rows: [conditional; unconditional].
        v = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + self.scale * (v_cond - v_uncond)


def guidance(net: nn.Module, scale: float) -> Guided:
    """Wrap a class-conditional ``net`` (with ``num_classes`` and a null class) into a guided velocity."""
    num_classes = getattr(net, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"guidance(scale={scale}) needs a class-conditional net (net.num_classes is None); "
                         f"train with model.net.num_classes and label_dropout > 0, or sample without guidance")
    if not scale >= 0.0:
        raise ValueError(f"guidance scale must be >= 0 (1 = plain conditional), got {scale}")
    return Guided(net, float(scale), int(num_classes))
