"""The one math convention of specflow: the linear (rectified) path.

    x_t = t·x1 + (1 − t)·x0,   x0 ~ N(0, I),   t = 0 is noise, t = 1 is data.

A velocity model is any callable ``model(x, t, cond=None) -> v`` with ``x: (B, ...)``, ``t: (B,)``.
Everything else (x1_hat, x0_hat, score, the stochastic transition) is derived here and nowhere else.
Times may be a Python float, a 0-d tensor or a per-sample ``(B,)`` tensor; they broadcast against ``x``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "expand", "per_sample", "interpolate", "conditional_velocity", "x1_hat", "x0_hat", "score",
    "time_grid", "transition_std", "transition_mean", "transition_coefficients", "ancestral_step",
]


def expand(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a tensor on ``x``'s device/dtype, shaped to broadcast against ``x`` (B, 1, 1, ...)."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.ndim == 0 or (t.ndim == x.ndim and t.shape[0] in (1, x.shape[0]) and t.numel() == t.shape[0]):
        return t  # a scalar, or already expanded
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or shaped (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))


def per_sample(c: Tensor, x: Tensor) -> Tensor:
    """Per-sample values (any leading shape, e.g. (B,) or (L, B)) viewed to broadcast against states shaped
    like ``x`` (B, ...). Unlike ``expand``, no conversion: bool masks stay masks, dtypes stay."""
    return c.view(*c.shape, *([1] * (x.ndim - 1)))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
    """x_t = t·x1 + (1 − t)·x0."""
    t = expand(t, x1)
    return t * x1 + (1 - t) * x0


def conditional_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """d x_t / dt = x1 − x0: the flow-matching regression target."""
    return x1 - x0


def x1_hat(x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """Predicted data: x + (1 − t)·v."""
    return x + (1 - expand(t, x)) * v


def x0_hat(x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """Predicted noise: x − t·v."""
    return x - expand(t, x) * v


def score(x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """∇ log p_t(x) = −x0_hat / (1 − t). Undefined at t = 1 (the data end), so that is an error."""
    t_ = expand(t, x)
    if bool(((1 - t_) <= 0).any()):
        raise ValueError("score is undefined at t = 1 (sigma_t = 0); evaluate it at t < 1")
    return -x0_hat(x, t, v) / (1 - t_)


def time_grid(steps: int, *, device=None, dtype=torch.float64, schedule: str = "uniform") -> Tensor:
    """A grid 0 = t_0 < … < t_N = 1 with N = ``steps`` intervals, built on ``device``.

    ``schedule``: "uniform", "quadratic" (denser near t = 1, where images gain detail), or "edm" (Karras et
    al.'s ρ = 7 spacing of σ = (1 − t)/t from 80 to 0.002, mapped onto t = 1/(1 + σ), with t_0 = 0 and t_N = 1:
    dense at both ends).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    u = torch.linspace(0, 1, steps + 1, device=device, dtype=dtype)
    if schedule == "uniform":
        return u
    if schedule == "quadratic":
        return 1 - (1 - u) ** 2
    if schedule == "edm":
        rho, lo, hi = 7.0, 0.002 ** (1 / 7.0), 80.0 ** (1 / 7.0)
        sigma = (hi + u[:-1] * steps / max(steps - 1, 1) * (lo - hi)) ** rho
        t = 1 / (1 + sigma)
        t[0] = 0.0  # σ = ∞: the sampler starts from pure noise, as every grid here does
        return torch.cat([t, u[-1:]])
    raise ValueError(f"unknown time schedule {schedule!r}; valid: 'uniform', 'quadratic', 'edm'")


def transition_std(t: Tensor | float, s: Tensor | float, eta: float = 1.0) -> Tensor:
    """c(t, s) of the ancestral (DDPM-posterior) step t → s, alpha = t, sigma = 1 − t.

        c² = η²·σ_s²·(1 − α_t²·σ_s² / (α_s²·σ_t²))

    Depends only on (t, s), never on x or the model: that is what makes reflection coupling exact.
    Edges: t = 0 gives c = η·σ_s; s = 1 gives c = 0 exactly.
    """
    # Python floats are taken in float64; tensors keep their dtype (the wider of the two).
    t = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)
    s = s if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=torch.float64, device=t.device)
    dtype = torch.promote_types(t.dtype, s.dtype)
    t, s = t.to(dtype), s.to(dtype)
    sig_s, sig_t = 1 - s, 1 - t
    # alpha_s > alpha_t >= 0 and sigma_t > sigma_s >= 0, so the ratio lies in [0, 1]; the clamps only
    # absorb rounding, and the where() keeps s = 1 (sigma_s = 0) from dividing 0 by 0.
    ratio = (t * sig_s) ** 2 / torch.where(sig_t > 0, (s * sig_t) ** 2, torch.ones_like(s))
    c2 = eta**2 * sig_s**2 * (1 - ratio.clamp(0, 1))
    return torch.where(sig_s > 0, c2.clamp_min(0).sqrt(), torch.zeros_like(c2))


def transition_mean(x: Tensor, t: Tensor | float, s: Tensor | float, v: Tensor, eta: float = 1.0) -> Tensor:
    """Mean of the ancestral step: α_s·x1_hat + sqrt(σ_s² − c²)·x0_hat. Linear in the model output v."""
    t_, s_ = expand(t, x), expand(s, x)
    c = transition_std(t_, s_, eta)
    return s_ * x1_hat(x, t_, v) + ((1 - s_) ** 2 - c**2).clamp_min(0).sqrt() * x0_hat(x, t_, v)


def transition_coefficients(t: Tensor, s: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, c) of the ancestral step t → s written as  x_s = a·x + b·v + c·ε  (so transition_mean = a·x + b·v).

    From the mean s·(x + (1 − t)·v) + g·(x − t·v), g = sqrt(σ_s² − c²):  a = s + g,  b = s·(1 − t) − g·t.
    Shaped like t and s (not broadcast against x): vectorised samplers compute them once per round.
    """
    c = transition_std(t, s, eta)
    t, s = t.to(c.dtype), s.to(c.dtype)
    g = ((1 - s) ** 2 - c**2).clamp_min(0).sqrt()
    return s + g, s * (1 - t) - g * t, c


def ancestral_step(x: Tensor, t, s, v: Tensor, noise: Tensor, eta: float = 1.0) -> Tensor:
    """x_s = mean + c·ε. With η = 0 this is the deterministic DDIM-like step (= Euler on this path)."""
    c = transition_std(expand(t, x), expand(s, x), eta)
    return transition_mean(x, t, s, v, eta) + c * noise
