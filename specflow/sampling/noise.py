"""Injectable randomness. A sampler draws all its Gaussian noise from a table indexed by (grid step, sample),
so the noise a sample sees does not depend on how far its neighbours in the batch have advanced.

``generator`` may be None (global RNG), one ``torch.Generator`` (reproducible for a fixed batch), or a
list with one generator per sample (per-sample streams: a sample is identical alone, in any batch, or
split across ranks). ``per_sample_generators(seed, indices)`` makes the latter.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


def per_sample_generators(seed: int, indices: Sequence[int] | Tensor, device="cpu") -> list[torch.Generator]:
    """One generator per sample index; the stream of sample i depends only on (seed, i)."""
    gens = []
    for i in (indices.tolist() if isinstance(indices, Tensor) else indices):
        g = torch.Generator(device=device)
        g.manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))
        gens.append(g)
    return gens


def randn(shape: Sequence[int], generator: Generators, like: Tensor) -> Tensor:
    """Standard normal of shape (B, *rest) on ``like``'s device/dtype; rows come from per-sample streams
    when ``generator`` is a list."""
    return _draw(torch.randn, shape, generator, like)


def rand(shape: Sequence[int], generator: Generators, like: Tensor) -> Tensor:
    return _draw(torch.rand, shape, generator, like)


def _draw(fn, shape, generator, like: Tensor) -> Tensor:
    shape = tuple(shape)
    if generator is None:
        return fn(shape, device=like.device, dtype=like.dtype)
    if isinstance(generator, torch.Generator):
        return fn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} per-sample generators for a batch of {shape[0]}; pass one per sample")
    # One call per sample at set-up time only (never inside the step loop).
    return torch.stack([fn(shape[1:], generator=g, device=g.device, dtype=like.dtype) for g in gens]).to(like.device)


class NoiseTable:
    """eps[k]: the ε of grid step k for every sample, (N, B, ...); u[k]: a uniform per (step, sample)."""

    def __init__(self, steps: int, like: Tensor, generator: Generators, uniforms: bool = False):
        B, rest = like.shape[0], tuple(like.shape[1:])
        if generator is None or isinstance(generator, torch.Generator):
            self.eps = _draw(torch.randn, (steps, B, *rest), generator, like)
            self.u = _draw(torch.rand, (steps, B), generator, like) if uniforms else None
        else:  # per-sample streams: sample b's noise is drawn from its own generator, step-major
            per = randn((B, steps, *rest), generator, like)
            self.eps = per.transpose(0, 1)
            self.u = rand((B, steps), generator, like).transpose(0, 1) if uniforms else None
