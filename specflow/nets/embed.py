"""Conditioning shared by every velocity net: a sinusoidal time embedding and a class embedding with a null class.

Time t ∈ [0, 1] is scaled by 1000 before the sinusoid so its frequencies match the DDPM/ADM tables the
architectures were tuned with. Class labels index ``num_classes + 1`` embeddings; index ``num_classes`` is the
*null* class used for classifier-free guidance, and ``cond=None`` means "null class for every row".
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """[cos(s·t·ω_k), sin(s·t·ω_k)] with ω_k = max_period^(−k/(dim/2)), k < dim/2; t: (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = scale * t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))  # odd dim: one zero column


def batch_times(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Accept t as a scalar, shape () or (B,); return float (B,) on ``device``."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or shaped ({batch},) to match the batch; got shape {tuple(t.shape)}")
    return t.float()


class Conditioning(nn.Module):
    """c = MLP(sinusoid(t)) + E[y], with E having ``num_classes + 1`` rows (the last is the null class).

    Unconditional (``num_classes=None``): c = MLP(sinusoid(t)) and ``cond`` is ignored.
    """

    def __init__(self, dim: int, num_classes: int | None = None, freq_dim: int = 256):
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None (unconditional); got {num_classes}")
        self.num_classes, self.freq_dim = num_classes, freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label_emb = None if num_classes is None else nn.Embedding(num_classes + 1, dim)

    def labels(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """cond → long (B,) labels, None → the null class ``num_classes``."""
        if cond is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        cond = torch.as_tensor(cond, device=device)
        if cond.shape != (batch,) or cond.is_floating_point():
            raise ValueError(f"cond must be integer class labels shaped ({batch},); got {cond.dtype} "
                             f"shape {tuple(cond.shape)}")
        if cond.numel() and (cond.min() < 0 or cond.max() > self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class); "
                             f"got range [{int(cond.min())}, {int(cond.max())}]")
        return cond.long()

    def forward(self, t: Tensor, cond: Tensor | None = None) -> Tensor:
        c = self.time_mlp(timestep_embedding(t, self.freq_dim).to(self.time_mlp[0].weight.dtype))
        if self.label_emb is not None:
            c = c + self.label_emb(self.labels(cond, t.shape[0], t.device))
        return c


def check_image(net: nn.Module, x: Tensor) -> None:
    """x must be (B, net.in_channels, net.image_size, net.image_size); the error names both shapes."""
    expected = (net.in_channels, net.image_size, net.image_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"{type(net).__name__} expects x shaped (B, {', '.join(map(str, expected))}); "
                         f"got {tuple(x.shape)}")


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
