"""Maximal couplings: turn a draft sample y ~ q into a target sample x ~ p, keeping x = y as often as possible.

Both couplings accept the draft with probability min(1, p(y)/q(y)) — the largest possible, so
P(x = y) = 1 − TV(p, q) — and differ in what they output on rejection.

Reflection coupling (equal isotropic covariance; Bou-Rabee et al. 2020, used by De Bortoli et al. 2025).
q = N(m̂, c²I), p = N(m, c²I), y = m̂ + c·ε:

    accept if  log u ≤ log p(y) − log q(y) = (‖ε‖² − ‖ε + (m̂ − m)/c‖²) / 2
    else       x = m + c·(ε − 2(e·ε)e),   e = (m̂ − m)/‖m̂ − m‖.

Why equal covariance: the map ε ↦ ε − 2(e·ε)e is the mirror across the hyperplane that bisects m̂ and m.
With equal isotropic covariances p is exactly the mirror image of q across that hyperplane, so the
rejected draft mass (q − p)+ on one side maps onto the missing mass (p − q)+ on the other side, and the
output is exactly p — deterministically, with no extra randomness. With c_q ≠ c_p no isometry maps q onto
p, the mirrored excess is not the residual, and reflection would be lossy (the open problem in
seeds/000). The general coupling below is then the exact fallback.

General maximal coupling (any p, q with densities, e.g. a draft that proposes with its own η). Accept as
above; on rejection draw from the residual r ∝ (p − q)+ by rejection sampling from p:

    z ~ p,  accept z with probability 1 − min(1, q(z)/p(z)).

Each attempt succeeds with probability TV(p, q), so a rejected row needs 1/TV attempts on average; as a
row is rejected with probability TV, the expected number of attempts per coupled step is exactly 1. The
tail can be long when TV is tiny, so attempts run in vectorised chunks up to ``max_attempts`` per row;
hitting the bound raises (it never silently returns an inexact sample): raise ``max_attempts``, or use a
draft with the target's covariance so that reflection coupling applies.

Point masses (c = 0, the last step to t = 1): accept only an exact match, else output p's mean.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from specflow.path import per_sample


@dataclass
class IsoGaussian:
    """N(mean, std²·I) per row. ``std`` has the batch shape; the remaining dims of ``mean`` are the event."""

    mean: Tensor
    std: Tensor

    def _event_sum(self, a: Tensor) -> Tensor:
        return a.flatten(self.std.ndim).sum(-1)

    def log_prob(self, z: Tensor) -> Tensor:
        """log density up to the constant −D/2·log 2π (it cancels in every ratio used here)."""
        c = self.std.clamp_min(torch.finfo(self.std.dtype).tiny)
        D = math.prod(self.mean.shape[self.std.ndim:])
        cs = c.view(*c.shape, *([1] * (z.ndim - c.ndim)))
        return -0.5 * self._event_sum(((z - self.mean) / cs) ** 2) - D * c.log()

    def sample(self, eps: Tensor) -> Tensor:
        return self.mean + self.std.view(*self.std.shape, *([1] * (eps.ndim - self.std.ndim))) * eps

    def __getitem__(self, idx) -> "IsoGaussian":
        return IsoGaussian(self.mean[idx], self.std[idx])


@dataclass
class Coupled:
    x: Tensor         # the target sample, (R, ...)
    accepted: Tensor  # (R,) bool: x is the draft sample


def log_acceptance(y: Tensor, p: IsoGaussian, q: IsoGaussian) -> Tensor:
    """log min(1, p(y)/q(y)) per row. A point mass on either side: 0 for an exact match, else −inf."""
    ell = (p.log_prob(y) - q.log_prob(y)).clamp_max(0)
    point = (p.std == 0) | (q.std == 0)
    if bool(point.any()):
        same = (p.std == q.std) & p._event_sum(p.mean != q.mean).eq(0)
        ell = torch.where(point, torch.where(same, 0.0, -torch.inf).to(ell.dtype), ell)
    return ell


def reflect(m_hat: Tensor, m: Tensor, c: Tensor, eps: Tensor) -> Tensor:
    """m + c·(ε − 2(e·ε)e), e = (m̂ − m)/‖m̂ − m‖ per row (c = 0 gives m), as m + c·ε − 2c·(d·ε)/‖d‖²·d."""
    d = (m_hat - m).flatten(1)
    # m̂ = m is always accepted, so its (zero) mirror term is never used: the clamp only avoids 0/0.
    dd = torch.linalg.vecdot(d, d).clamp_min(torch.finfo(d.dtype).tiny)
    k = (2 * c) * torch.linalg.vecdot(d, eps.flatten(1)) / dd
    return torch.addcmul(m, per_sample(c, m), eps).addcmul_(per_sample(k, m), d.view_as(m), value=-1)


def reflection_coupling(m_hat: Tensor, m: Tensor, c: Tensor, eps: Tensor, u: Tensor) -> Coupled:
    """Couple y = m̂ + c·ε ~ N(m̂, c²) with N(m, c²) using the uniform u (all vectorised over rows)."""
    q, p = IsoGaussian(m_hat, c), IsoGaussian(m, c)
    y = q.sample(eps)
    acc = u.log() <= log_acceptance(y, p, q)
    x = torch.where(per_sample(acc, y), y, reflect(m_hat, m, c, eps))
    return Coupled(x, acc)


# draw(rows, attempts) -> (ε, w): standard normals (R, A, ...) and uniforms (R, A) for attempts (A,) of rows (R,).
Draw = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def residual_sample(p: IsoGaussian, q: IsoGaussian, draw: Draw, rows: Tensor | None = None,
                    max_attempts: int = 1 << 16) -> Tensor:
    """A sample of r ∝ (p − q)+ per row, by rejection from p (see the module docstring).

    ``rows`` are the ids passed to ``draw`` (default 0..R−1), so a keyed ``draw`` gives each row its own
    stream. Attempts run in chunks that double (16, 32, …, 1024) until every row has a sample.
    """
    R = p.mean.shape[0]
    rows = torch.arange(R, device=p.mean.device) if rows is None else rows
    x = p.mean.clone()  # a point-mass p: its residual is the point itself
    pending = (p.std > 0).nonzero().squeeze(1)
    start, chunk = 0, 16
    while pending.numel():
        if start >= max_attempts:
            raise RuntimeError(
                f"residual sampling of the maximal coupling did not finish for {pending.numel()} row(s) within "
                f"max_attempts={max_attempts}: TV(p, q) is tiny there (expected attempts = 1/TV). Raise "
                f"max_attempts, or use a draft with the target's covariance (reflection coupling)")
        att = torch.arange(start, start + chunk, device=x.device)
        eps, w = draw(rows[pending], att)
        pp, qq = p[pending], q[pending]
        pa = IsoGaussian(pp.mean.unsqueeze(1), pp.std.unsqueeze(1))
        qa = IsoGaussian(qq.mean.unsqueeze(1), qq.std.unsqueeze(1))
        z = pa.sample(eps)  # (R', A, ...)
        ok = w < -torch.expm1((qa.log_prob(z) - pa.log_prob(z)).clamp_max(0))
        got = ok.any(1)
        first = ok.to(torch.uint8).argmax(1)
        x[pending[got]] = z[got, first[got]]
        pending = pending[~got]
        start, chunk = start + chunk, min(2 * chunk, 1024)
    return x


def maximal_coupling(y: Tensor, p: IsoGaussian, q: IsoGaussian, u: Tensor, draw: Draw,
                     rows: Tensor | None = None, max_attempts: int = 1 << 16) -> Coupled:
    """Couple a draft y ~ q with p: keep y with probability min(1, p(y)/q(y)), else a residual sample."""
    acc = u.log() <= log_acceptance(y, p, q)
    x = y.clone()
    rej = (~acc).nonzero().squeeze(1)
    if rej.numel():
        rows = torch.arange(y.shape[0], device=y.device) if rows is None else rows
        x[rej] = residual_sample(p[rej], q[rej], draw, rows[rej], max_attempts)
    return Coupled(x, acc)


def torch_draw(generator: torch.Generator | None, event: tuple[int, ...], like: Tensor) -> Draw:
    """A ``Draw`` from one torch generator (for tests and one-off use; samplers use keyed draws)."""
    def draw(rows: Tensor, att: Tensor):
        g = {"generator": generator} if generator is not None else {}
        eps = torch.randn((rows.numel(), att.numel(), *event), dtype=like.dtype, **g).to(like.device)
        w = torch.rand((rows.numel(), att.numel()), dtype=like.dtype, **g).to(like.device)
        return eps, w
    return draw
