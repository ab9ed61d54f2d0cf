"""Medusa-style draft heads: light layers on a frozen target's trunk features that guess where the flow goes.

From ONE target call at (x_k, t_k) — trunk features h_k = target.features(x_k, t_k, y) and its prediction
x̂1_k = x_k + (1 − t_k)·target.output(h_k) — the heads predict the target's x̂1 at a later state y of the
chain at time s = t_{k+j} (j = 1..L grid steps ahead):

    x̂1(y, s) = x̂1_k + Δθ(h_k, x_k, x̂1_k, y; t_k, s),     v̂(y, s) = (x̂1(y, s) − y) / (1 − s)

One shared stack serves every offset j (Medusa's per-offset heads become one head conditioned on
(t_k, s, s − t_k) — cheaper, and valid on any time grid); ``offsets`` = L is how far ahead it is trained.
The last layer is zero-initialised, so an untrained head *is* the ``frozen`` drafter (Δ = 0); training can
only add to a training-free baseline. Working in x̂1 space is the drafter protocol's choice
(``specflow.sampling.drafters``): the predicted data moves slowly along the path, the velocity does not.

Feature shapes: (B, C_f, H, W) from a UNet (conv head) or (B, C_f) from the toy MLP (linear head).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specflow.nets.embed import timestep_embedding


class _Block(nn.Module):
    """h + W₂·SiLU(Norm(h)·(1 + scale) + shift): a residual layer modulated by the time embedding."""

    def __init__(self, width: int, emb_dim: int, image: bool):
        super().__init__()
        self.image = image
        self.norm = nn.GroupNorm(math.gcd(8, width), width) if image else nn.LayerNorm(width)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.proj = nn.Conv2d(width, width, 3, padding=1) if image else nn.Linear(width, width)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.film(c).chunk(2, dim=1)
        if self.image:
            scale, shift = scale[..., None, None], shift[..., None, None]
        return h + self.proj(F.silu(self.norm(h) * (1 + scale) + shift))


class MedusaHeads(nn.Module):
    """Draft heads for a target whose trunk gives ``feature_channels`` features (see the module docstring).

    Args:
        feature_channels: C_f of ``target.features`` (``target.feature_channels``).
        in_channels: channels of x (images) or its dimension (vectors).
        image_size: side of the images, or None for vector data (then the head is an MLP).
        hidden, depth: width and number of residual layers of the shared head.
        offsets: L, the number of grid steps ahead the heads are trained for (informational at sampling:
            the head is conditioned on times, not on j, so any window works; beyond L it extrapolates).
    """

    drafter = "medusa"  # the drafter name that knows how to call this module

    def __init__(self, feature_channels: int, in_channels: int, image_size: int | None = None,
                 hidden: int = 64, depth: int = 2, offsets: int = 8, freq_dim: int = 64):
        super().__init__()
        if min(feature_channels, in_channels, hidden, offsets) < 1 or depth < 0:
            raise ValueError(f"MedusaHeads needs feature_channels, in_channels, hidden, offsets ≥ 1 and depth ≥ 0; "
                             f"got {feature_channels}, {in_channels}, {hidden}, {offsets}, {depth}")
        self.feature_channels, self.in_channels, self.image_size = feature_channels, in_channels, image_size
        self.offsets, self.freq_dim = offsets, freq_dim
        image = image_size is not None
        emb_dim = 2 * hidden
        self.time_mlp = nn.Sequential(nn.Linear(3 * freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        cin = feature_channels + 3 * in_channels  # h_k, x_k, x̂1_k, y
        self.inp = nn.Conv2d(cin, hidden, 3, padding=1) if image else nn.Linear(cin, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, emb_dim, image) for _ in range(depth))
        self.out_norm = nn.GroupNorm(math.gcd(8, hidden), hidden) if image else nn.LayerNorm(hidden)
        self.out = nn.Conv2d(hidden, in_channels, 3, padding=1) if image else nn.Linear(hidden, in_channels)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)  # Δ ≡ 0: starts as the frozen drafter

    def _check(self, features: Tensor, y: Tensor) -> None:
        want = (self.in_channels,) + ((self.image_size,) * 2 if self.image_size is not None else ())
        if tuple(y.shape[1:]) != want:
            raise ValueError(f"MedusaHeads expects states shaped (B, {', '.join(map(str, want))}); "
                             f"got {tuple(y.shape)}")
        fw = (self.feature_channels,) + tuple(y.shape[2:])
        if tuple(features.shape[1:]) == (2, *fw):  # GuidedTrunk's two branches per sample
            raise ValueError(f"the target is guided (features {tuple(features.shape)}: a conditional and an "
                             f"unconditional branch per sample) but these Medusa heads are not: wrap them with "
                             f"specflow.lit.guidance.guide_draft(heads, scale), as generate(..., guidance=) does")
        if tuple(features.shape[1:]) != fw:
            raise ValueError(f"MedusaHeads were built for target features (B, {', '.join(map(str, fw))}) but got "
                             f"{tuple(features.shape)}: these heads belong to another target architecture "
                             f"(load them with specflow.load_draft(path, target), which checks the fingerprint)")

    def predict_x1(self, y: Tensor, s: Tensor, *, features: Tensor, x_src: Tensor, t_src: Tensor,
                   x1_src: Tensor) -> Tensor:
        """x̂1 at (y, s) from the target's evaluation at (x_src, t_src): features h and prediction x1_src."""
        self._check(features, y)
        dtype = self.inp.weight.dtype
        t_src, s = t_src.reshape(-1).float(), s.reshape(-1).float()
        c = torch.cat([timestep_embedding(t_src, self.freq_dim), timestep_embedding(s, self.freq_dim),
                       timestep_embedding((s - t_src) * 10, self.freq_dim)], dim=1)  # ×10: offsets are small
        c = self.time_mlp(c.to(dtype))
        h = self.inp(torch.cat([features.to(dtype), x_src.to(dtype), x1_src.to(dtype), y.to(dtype)], dim=1))
        for block in self.blocks:
            h = block(h, c)
        delta = self.out(F.silu(self.out_norm(h)))
        return x1_src + delta.to(x1_src.dtype)

    def forward(self, y: Tensor, s: Tensor, cond: Tensor | None = None, *, features: Tensor | None = None,
                x_src: Tensor | None = None, t_src: Tensor | None = None, x1_src: Tensor | None = None) -> Tensor:
        """Draft velocity v̂(y, s) = (x̂1(y, s) − y)/(1 − s), s < 1. ``cond`` is unused: h_k carries it."""
        if features is None or x_src is None or t_src is None or x1_src is None:
            raise ValueError("MedusaHeads are driven by the target's features at its last evaluation: sample with "
                             "drafter='medusa' (build_sampler('speculative' or 'sfm', drafter='medusa'), "
                             "draft=heads), not drafter='model'")
        s = torch.as_tensor(s, device=y.device).expand(y.shape[0])
        x1 = self.predict_x1(y, s, features=features, x_src=x_src, t_src=t_src, x1_src=x1_src)
        return (x1 - y) / (1 - s.to(y.dtype)).view(-1, *([1] * (y.ndim - 1)))
