"""An ADM-style UNet (Dhariwal & Nichol 2021) for velocity prediction, written with einops.

    c = MLP(sinusoid(1000·t)) + E[y]                    conditioning, E has a null row for CFG
    h = conv_in(x) → [ResBlock(h, c) (+ Attention)]×n, Downsample   per level, skips kept
      → ResBlock, Attention, ResBlock                   middle
      → [cat(h, skip) → ResBlock (+ Attention)]×(n+1), Upsample     per level, reversed
    features = SiLU(GroupNorm(h))                       (B, model_channels, H, W)
    v = conv_out(features)                              zero-initialised, so v ≡ 0 at init

ResBlocks apply the conditioning as a scale/shift after the second GroupNorm:
``h = GN(h)·(1 + scale) + shift``. Residual branches end in zero-initialised layers, so every block starts as
the identity — the ADM recipe for stable early training.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from specflow.nets.embed import Conditioning, batch_times, check_image


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups where the width allows it


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN → SiLU → conv → GN·(1+scale)+shift → SiLU → dropout → conv(zero), plus a (1×1) skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = _norm(cout)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = rearrange(self.emb(c), "b (two ch) -> two b ch 1 1", two=2)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions, residual with a zero-initialised projection."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not divisible by num_heads={num_heads}; "
                             f"pick num_heads dividing every level's width")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        H, W = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b ch h w -> b (h w) ch")
        q, k, v = rearrange(self.qkv(tokens), "b n (three heads d) -> three b heads n d", three=3, heads=self.num_heads)
        a = rearrange(F.scaled_dot_product_attention(q, k, v), "b heads n d -> b n (heads d)")
        return x + rearrange(self.proj(a), "b (h w) ch -> b ch h w", h=H, w=W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Sequential):
    """A sequence of layers that all take (h, c)."""

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        for layer in self:
            h = layer(h, c)
        return h


class UNet(nn.Module):
    """Velocity net ``v = UNet(x, t, cond)`` on square images of side ``image_size``.

    ``attention_resolutions`` lists the feature-map sides (in pixels) that get self-attention.
    ``channel_mult[i]·model_channels`` is the width at level i; level i has side ``image_size / 2**i``.
    ``num_classes`` enables class conditioning with a null class (index ``num_classes``) for
    classifier-free guidance; ``cond=None`` selects it. ``features`` / ``output`` split the net before its
    last (zero-initialised) conv so that draft heads can reuse the trunk: ``forward = output ∘ features``.
    """

    def __init__(self, image_size: int = 16, in_channels: int = 1, model_channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (8,), num_heads: int = 4,
                 num_classes: int | None = None, dropout: float = 0.0,
                 min_image_size: int = 8, max_image_size: int = 64):
        super().__init__()
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        if not channel_mult or num_res_blocks < 1 or model_channels < 1 or in_channels < 1:
            raise ValueError(f"need a non-empty channel_mult, num_res_blocks ≥ 1, model_channels ≥ 1 and "
                             f"in_channels ≥ 1; got {channel_mult}, {num_res_blocks}, {model_channels}, {in_channels}")
        factor = 2 ** (len(channel_mult) - 1)
        if not (min_image_size <= image_size <= max_image_size) or image_size % factor:
            valid = [s for s in range(min_image_size, max_image_size + 1) if s % factor == 0]
            raise ValueError(f"UNet with channel_mult={channel_mult} ({len(channel_mult) - 1} downsamplings) cannot "
                             f"take image_size={image_size}: it must be a multiple of {factor} in "
                             f"[{min_image_size}, {max_image_size}], i.e. one of {valid}")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.feature_channels = model_channels
        emb_dim = 4 * model_channels
        self.cond = Conditioning(emb_dim, num_classes)

        def block(cin: int, cout: int, side: int) -> list[nn.Module]:
            layers = [ResBlock(cin, cout, emb_dim, dropout)]
            if side in attention_resolutions:
                layers.append(SelfAttention(cout, num_heads))
            return layers

        # Encoder: remember every output's width; the decoder consumes them in reverse as skips.
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down, skips, ch, side = nn.ModuleList(), [model_channels], model_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(Stage(*block(ch, mult * model_channels, side)))
                ch = mult * model_channels
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Stage(Downsample(ch)))
                skips.append(ch)
                side //= 2
        self.middle = Stage(ResBlock(ch, ch, emb_dim, dropout), SelfAttention(ch, num_heads),
                            ResBlock(ch, ch, emb_dim, dropout))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = block(ch + skips.pop(), mult * model_channels, side)
                ch = mult * model_channels
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    side *= 2
                self.up.append(Stage(*layers))
        self.out_norm = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    def features(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """Trunk features SiLU(GN(h)) just before the output conv: (B, feature_channels, H, W)."""
        check_image(self, x)
        c = self.cond(batch_times(t, x.shape[0], x.device), cond)  # (B, 4·model_channels)
        h = self.conv_in(x)
        hs = [h]
        for stage in self.down:
            h = stage(h, c)
            hs.append(h)
        h = self.middle(h, c)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), c)
        return F.silu(self.out_norm(h))

    def output(self, h: Tensor) -> Tensor:
        """Velocity from trunk features: (B, feature_channels, H, W) → (B, in_channels, H, W)."""
        return self.conv_out(h)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        return self.output(self.features(x, t, cond))
