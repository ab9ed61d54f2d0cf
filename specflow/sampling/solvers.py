"""Plain solvers: the baselines every acceleration is measured against.

State is kept in the noise's dtype (pass float64 noise for reference solutions); step sizes and coefficients
come from the float64 grid.
"""
from __future__ import annotations

import dataclasses

from specflow.path import transition_coefficients
from specflow.sampling.base import Sampler, register
from specflow.sampling.noise import NoiseTable


# Step sizes and coefficients are Python floats from the float64 grid, and the times handed to the model
# are views of one tensor in the state's dtype: a step launches only its own few kernels (GPU latency),
# and never waits for the device (the NaN checks are deferred to the end of the run: Sampler.defers_checks).
# No model output is read after the next model call (Sampler._run): a model that returns the same buffer every
# call (CUDA graphs, torch.compile mode="reduce-overhead") overwrites it there.


@register
@dataclasses.dataclass
class Euler(Sampler):
    """Euler on dx/dt = v: N target calls."""

    name = "euler"
    defers_checks = True

    def _run(self, f, x, grid, draft, generator, stats):
        t, h = grid.to(x.device, x.dtype), grid.diff().tolist()
        for k in range(self.steps):
            x = x.add(f(x, t[k], step=k), alpha=h[k])  # Euler step
        return x


@register
@dataclasses.dataclass
class Heun(Sampler):
    """Heun's 2nd-order method (EDM Alg. 1 without churn): 2N target calls."""

    name = "heun"
    defers_checks = True

    def _run(self, f, x, grid, draft, generator, stats):
        t, h = grid.to(x.device, x.dtype), grid.diff().tolist()
        for k in range(self.steps):
            d_cur = f(x, t[k], step=k)
            x_next = x.add(d_cur, alpha=h[k])  # Euler step
            x = x.add(d_cur, alpha=h[k] / 2)  # the trapezoid's first half now: d_cur is not read after the next call
            x.add_(f(x_next, t[k + 1], step=k), alpha=h[k] / 2)  # 2nd order correction
        return x


BASES = ("euler", "ab2")


def check_base(base) -> str:
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; valid: {', '.join(BASES)}")
    return base


def ab2_weights(h, h_prev):
    """Variable-step Adams–Bashforth 2: x_{k+1} = x_k + h·(w·d_k + w_prev·d_{k−1}) with r = h/h_prev; → (w, w_prev).
    Floats or tensors (the one place the formula is written: ab2, base_step and sfm's per-row steps use it)."""
    r = h / h_prev
    return 1 + r / 2, -r / 2


def base_step(base: str, g: list[float]):
    """The step the deterministic accelerators build on, as a closure step(x, d, k) → x_{k+1} over the host grid
    ``g``: Euler, or variable-step Adams–Bashforth 2 with the previous call's d (whatever step it was: real
    or extrapolated); its first step is Euler."""
    if base == "euler":
        return lambda x, d, k: x + (g[k + 1] - g[k]) * d
    prev = None  # (k, d) of the step before

    def step(x, d, k):
        nonlocal prev
        h = g[k + 1] - g[k]
        if prev is None or prev[0] != k - 1:
            out = x + h * d
        else:
            w, w_prev = ab2_weights(h, g[k] - g[k - 1])
            out = x + h * (w * d + w_prev * prev[1])
        prev = (k, d.clone())  # a copy: the model may write its next output into d's buffer
        return out
    return step


@register
@dataclasses.dataclass
class AB2(Sampler):
    """Adams–Bashforth 2 (variable step): second order at one target call per step, N calls."""

    name = "ab2"
    defers_checks = True

    def _run(self, f, x, grid, draft, generator, stats):
        t, h = grid.to(x.device, x.dtype), grid.diff().tolist()
        w = [(1.0, 0.0)] + [ab2_weights(h[k], h[k - 1]) for k in range(1, self.steps)]  # the first step is Euler
        base = x  # x_k + h_k·w_prev·d_{k−1}: the previous velocity's share, added before the next call
        for k in range(self.steps):
            d_cur = f(x, t[k], step=k)
            x = base.add(d_cur, alpha=h[k] * w[k][0])
            if k + 1 < self.steps:
                base = x.add(d_cur, alpha=h[k + 1] * w[k + 1][1])
        return x


@register
@dataclasses.dataclass
class SDE(Sampler):
    """Ancestral sampler of the linear path (DESIGN §1): x_{k+1} = a_k·x_k + b_k·v_k + c_k·ε_k (= mean + c·ε,
    ``path.transition_coefficients``). η = 0 is Euler."""

    name = "sde"
    defers_checks = True
    eta: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 <= float(self.eta) <= 1.0):
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")

    def _run(self, f, x, grid, draft, generator, stats):
        noise = NoiseTable(self.steps, x, generator)
        t = grid.to(x.device, x.dtype)
        a, b, c = (z.tolist() for z in transition_coefficients(grid[:-1], grid[1:], self.eta))
        for k in range(self.steps):
            x = (x * a[k]).add_(f(x, t[k], step=k), alpha=b[k]).add_(noise.eps[k], alpha=c[k])
        return x
