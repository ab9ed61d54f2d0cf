"""A small MLP velocity net for vector data (the toy Gaussian mixtures).

    c = MLP(sinusoid(1000·t)) + E[y];   h = Linear(cat(x, c));   h = Linear(SiLU(h)) × (depth − 1)
    features = SiLU(h)  (B, hidden);    v = Linear(features), zero-initialised so v ≡ 0 at init.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from specflow.nets.embed import Conditioning, batch_times


class MLP(nn.Module):
    """Velocity net ``v = MLP(x, t, cond)`` for x: (B, dim); ``forward = output ∘ features`` as for the UNet/DiT."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, num_classes: int | None = None):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"MLP needs dim, hidden, depth ≥ 1; got dim={dim}, hidden={hidden}, depth={depth}")
        self.in_channels, self.image_size, self.num_classes = dim, None, num_classes
        self.feature_channels = hidden
        self.cond = Conditioning(hidden, num_classes, freq_dim=64)
        self.inp = nn.Linear(dim + hidden, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def features(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """Last hidden activation: (B, hidden)."""
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"MLP expects x shaped (B, {self.in_channels}); got {tuple(x.shape)}")
        c = self.cond(batch_times(t, x.shape[0], x.device), cond)
        h = self.inp(torch.cat([x, c.to(x.dtype)], dim=1))
        for layer in self.hidden:
            h = layer(nn.functional.silu(h))
        return nn.functional.silu(h)

    def output(self, h: Tensor) -> Tensor:
        """Velocity from features: (B, hidden) → (B, dim)."""
        return self.out(h)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        return self.output(self.features(x, t, cond))
