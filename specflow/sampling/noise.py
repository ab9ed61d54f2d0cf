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

from specflow.sampling.opcount import host_side

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
    """Standard normal of shape (B, *rest) on ``like``'s device/dtype, drawn where the generator lives (the
    same numbers on every device); rows come from per-sample streams when ``generator`` is a list."""
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    gens = check_streams(generator, shape[0])
    # One call per sample at set-up time only (never inside the step loop).
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=like.dtype)
                        for g in gens]).to(like.device)


class NoiseTable:
    """eps[k]: the ε of grid step k for every sample, (N, B, ...); u[k]: a uniform per (step, sample).

    Drawn on the state's device: a generator that lives elsewhere (``generate`` keeps its per-sample streams on
    the CPU so that the initial noise is the same on every device) seeds a fresh generator there with one draw
    of its stream, instead of making the N·B·D values on the CPU and copying them over — which cost more than
    a whole GPU run's sampler overhead. A sample's table still depends on its own stream only.
    """

    def __init__(self, steps: int, like: Tensor, generator: Generators, uniforms: bool = False):
        B, rest, dev, dtype = like.shape[0], tuple(like.shape[1:]), like.device, like.dtype
        self.u = None
        if generator is None or isinstance(generator, torch.Generator):
            g = None if generator is None else on_device(generator, dev)
            self.eps = torch.randn((steps, B, *rest), generator=g, device=dev, dtype=dtype)
            if uniforms:
                self.u = torch.rand((steps, B), generator=g, device=dev, dtype=dtype)
            return
        eps, u = like.new_empty((B, steps, *rest)), like.new_empty((B, steps)) if uniforms else None
        for b, g in enumerate(check_streams(generator, B)):  # set-up only: B launches; each sample's stream,
            g = on_device(g, dev)  # step-major
            torch.randn((steps, *rest), generator=g, out=eps[b])
            if u is not None:
                torch.rand((steps,), generator=g, out=u[b])
        self.eps, self.u = eps.transpose(0, 1), None if u is None else u.transpose(0, 1)


def check_streams(generators, batch: int) -> list[torch.Generator]:
    """Per-sample generators as a list, one per sample of the batch (else a ValueError that says so)."""
    gens = list(generators)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} per-sample generators for a batch of {batch}; pass one per sample")
    return gens


def on_device(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` if it draws on ``device``, else a generator there seeded by one draw of its stream."""
    if _same_device(generator.device, device):
        return generator
    return seeded_on(device, generator)


@host_side
def seeded_on(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """A generator on ``device`` seeded by one draw from ``generator`` (whose stream moves on by that draw).
    Reads the seed on the host: no device wait for a CPU ``generator``."""
    seed = torch.randint(2**63 - 1, (), generator=generator, device=generator.device)
    return torch.Generator(device=device).manual_seed(int(seed))


def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
