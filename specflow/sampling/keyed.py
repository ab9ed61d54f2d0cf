"""Keyed (counter-based) randomness: numbers that are a pure function of (key, counters).

The exact speculative sampler's general coupling needs an unbounded number of fresh draws for a rejected
(grid step, sample) pair — rejection sampling of the residual. Drawing them from a shared generator would
make a sample depend on its neighbours in the batch, and per-sample ``torch.Generator``s would need a
Python loop over samples. Instead every draw is hashed from the sample's key and integer counters
(step, attempt, lane) with splitmix64, vectorised over rows:

    u = splitmix64(key, step, attempt, lane) / 2^64 ∈ (0, 1),      z = Box–Muller(u_2i, u_2i+1).

``sample_keys(generator, B, like)`` draws one key per sample from the caller's generator(s) (one per sample
when a list is given), so reproducibility follows the generator exactly as the noise table's does.
int64 arithmetic in torch wraps modulo 2^64, which is what the hash needs; right shifts are made logical.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from specflow.sampling.noise import Generators

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_M1 = 0xBF58476D1CE4E5B9 - 2**64
_M2 = 0x94D049BB133111EB - 2**64


def _srl(z: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _mix(z: Tensor) -> Tensor:
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _hash(key: Tensor, *counters: Tensor | int) -> Tensor:
    z = key
    for c in counters:
        z = _mix(z + (torch.as_tensor(c, device=key.device) + 1) * _GOLDEN)
    return z


def sample_keys(generator: Generators, batch: int, like: Tensor) -> Tensor:
    """(B,) int64 keys on ``like``'s device: from the global RNG, one generator, or one per sample."""
    hi = 2**62
    if generator is None:
        keys = torch.randint(hi, (batch,), device=like.device)
    elif isinstance(generator, torch.Generator):
        keys = torch.randint(hi, (batch,), generator=generator, device=generator.device)
    else:  # set-up time only: one draw per sample's own stream
        keys = torch.stack([torch.randint(hi, (), generator=g, device=g.device) for g in generator])
    return keys.to(like.device)


def uniform(key: Tensor, step: Tensor, attempt: Tensor, lanes: int, dtype=torch.float64) -> Tensor:
    """(R, A, lanes) uniforms in (0, 1) for keys/steps (R,) and attempts (A,)."""
    lane = torch.arange(lanes, device=key.device)
    z = _hash(key[:, None, None], step[:, None, None], attempt[None, :, None], lane)
    return ((_srl(z, 11).to(torch.float64) + 0.5) * 2.0**-53).to(dtype)


def normal(key: Tensor, step: Tensor, attempt: Tensor, shape: tuple[int, ...], dtype=torch.float64) -> Tensor:
    """(R, A, *shape) standard normals by Box–Muller from pairs of keyed uniforms."""
    n = math.prod(shape)
    u = uniform(key, step, attempt, 2 * n, torch.float64)
    z = (-2 * u[..., 0::2].log()).sqrt() * torch.cos(2 * math.pi * u[..., 1::2])
    return z.to(dtype).reshape(*z.shape[:2], *shape)
