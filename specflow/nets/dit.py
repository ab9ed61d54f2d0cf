"""DiT (Peebles & Xie 2023): a ViT on patches with adaLN-zero conditioning, built from timm blocks.

    tokens = PatchEmbed(x) + pos                         (B, N, hidden), N = (image_size / patch_size)²
    c      = MLP(sinusoid(1000·t)) + E[y]                 null class row for CFG
    block:   (shift, scale, gate)×2 = Linear(SiLU(c));  tokens += gate·Attn(LN(tokens)·(1+scale)+shift), same for MLP
    features = LN(tokens)·(1+scale_f)+shift_f             the final adaLN, so `output` needs no conditioning
    v = unpatchify(Linear(features))                      zero-initialised, so v ≡ 0 at init

The final adaLN modulation is counted as part of the trunk: ``features(x, t, cond)`` already carries the
conditioning and ``output(h)`` is a plain linear map + unpatchify — the same ``forward = output ∘ features``
split as the UNet and MLP, so draft heads can attach to any of them alike.
"""
from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from specflow.nets.embed import Conditioning, batch_times, check_image


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE/DiT): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos position embedding; got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def encode(pos: np.ndarray) -> np.ndarray:  # (M,) → (M, dim/2)
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    emb = np.concatenate([encode(cols.reshape(-1)), encode(rows.reshape(-1))], axis=1)  # (grid², dim)
    return torch.from_numpy(emb).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-LN transformer block whose LayerNorms are modulated by c and whose residuals are gated (adaLN-zero)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.adaLN[1].weight), nn.init.zeros_(self.adaLN[1].bias)  # adaLN-zero: block = identity

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Velocity net ``v = DiT(x, t, cond)``; see the module docstring for the ``features``/``output`` split."""

    def __init__(self, image_size: int = 32, in_channels: int = 3, patch_size: int = 2, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, num_classes: int | None = None):
        super().__init__()
        if patch_size < 1 or image_size < patch_size or image_size % patch_size:
            raise ValueError(f"DiT image_size={image_size} must be a positive multiple of patch_size={patch_size}; "
                             f"valid sizes are {patch_size}·k, e.g. {[patch_size * k for k in (4, 8, 16, 32)]}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.patch_size, self.feature_channels = patch_size, hidden_size
        self.grid = image_size // patch_size
        self.x_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.cond = Conditioning(hidden_size, num_classes)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():  # DiT recipe: xavier linears, then zero the adaLN and output layers
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cond.time_mlp[0].weight, std=0.02), nn.init.normal_(self.cond.time_mlp[2].weight, std=0.02)
        if self.cond.label_emb is not None:
            nn.init.normal_(self.cond.label_emb.weight, std=0.02)
        for layer in [*(b.adaLN[1] for b in self.blocks), self.adaLN_final[1], self.linear]:
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def features(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """Tokens after the last block and the final adaLN modulation: (B, N, hidden_size), N = grid²."""
        check_image(self, x)
        c = self.cond(batch_times(t, x.shape[0], x.device), cond)  # (B, hidden)
        h = rearrange(self.x_embed(x), "b d gh gw -> b (gh gw) d") + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        return modulate(self.norm_final(h), shift, scale)

    def output(self, h: Tensor) -> Tensor:
        """Velocity from features: (B, N, hidden) → linear per token → unpatchify → (B, C, H, W)."""
        p = self.patch_size
        return rearrange(self.linear(h), "b (gh gw) (p1 p2 ch) -> b ch (gh p1) (gw p2)", gh=self.grid, p1=p, p2=p)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        return self.output(self.features(x, t, cond))
