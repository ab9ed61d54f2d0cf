"""Plain solvers: the baselines every acceleration is measured against.

State is kept in the noise's dtype (pass float64 noise for reference solutions); times in float64.
"""
from __future__ import annotations

import dataclasses

from specflow.path import ancestral_step
from specflow.sampling.base import Sampler, register
from specflow.sampling.noise import NoiseTable


@register
@dataclasses.dataclass
class Euler(Sampler):
    """Euler on dx/dt = v: N target calls."""

    name = "euler"

    def _run(self, f, x, grid, draft, generator, stats):
        for k in range(self.steps):
            t_cur, t_next = grid[k], grid[k + 1]
            x = x + (t_next - t_cur).to(x.dtype) * f(x, t_cur, step=k)  # Euler step
        return x


@register
@dataclasses.dataclass
class Heun(Sampler):
    """Heun's 2nd-order method (EDM Alg. 1 without churn): 2N target calls."""

    name = "heun"

    def _run(self, f, x, grid, draft, generator, stats):
        for k in range(self.steps):
            t_cur, t_next = grid[k], grid[k + 1]
            h = (t_next - t_cur).to(x.dtype)
            d_cur = f(x, t_cur, step=k)
            x_next = x + h * d_cur  # Euler step
            d_prime = f(x_next, t_next, step=k)
            x = x + h * (0.5 * d_cur + 0.5 * d_prime)  # 2nd order correction
        return x


@register
@dataclasses.dataclass
class AB2(Sampler):
    """Adams–Bashforth 2 (variable step): second order at one target call per step, N calls."""

    name = "ab2"

    def _run(self, f, x, grid, draft, generator, stats):
        d_prev = None
        for k in range(self.steps):
            t_cur, t_next = grid[k], grid[k + 1]
            h = (t_next - t_cur).to(x.dtype)
            d_cur = f(x, t_cur, step=k)
            if d_prev is None:
                x = x + h * d_cur  # first step: Euler
            else:
                r = (h / (t_cur - grid[k - 1]).to(x.dtype))
                x = x + h * ((1 + r / 2) * d_cur - (r / 2) * d_prev)
            d_prev = d_cur
        return x


@register
@dataclasses.dataclass
class SDE(Sampler):
    """Ancestral sampler of the linear path (DESIGN §1): x_{k+1} = m_k + c_k·ε_k. η = 0 is Euler."""

    name = "sde"
    eta: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 <= float(self.eta) <= 1.0):
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")

    def _run(self, f, x, grid, draft, generator, stats):
        noise = NoiseTable(self.steps, x, generator)
        for k in range(self.steps):
            x = ancestral_step(x, grid[k], grid[k + 1], f(x, grid[k], step=k), noise.eps[k], self.eta)
        return x
