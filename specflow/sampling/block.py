"""Block verification for the exact speculative sampler (``verifier="block"``).

Sun et al. (ICLR 2025) showed that verifying a drafted window step by step is not optimal: judging it as a
block keeps more steps and is still exact. Soen, Husain, De Bortoli and Doucet (2026) carried it to
diffusions, where the catch is the residual draw in continuous space. For one round with target steps
P_j = N(m_j, c_j²I) and draft steps Q_j = N(m̂_j, c_j²I) (equal covariances), drafts y_{j+1} ~ Q_j, j < L:

    weights   p_0 = 1,   p_{j+1} = min(1, p_j · P_j(y_{j+1}) / Q_j(y_{j+1}))
    residual  r_j = ∫ (p_j P_j − Q_j)+                          (mass of what step j still owes the target)
    keep      h_L = p_L,  h_j = r_j / (r_j + 1 − p_j) (j < L),  h_0 = 1
    τ         the largest j with η_j ≤ h_j (η_j uniform): keep y_1 … y_τ
    next      τ = L: y_L (the next round starts with the target's own step, already paid for)
              τ < L: x_{k+τ+1} ~ (p_τ P_τ − Q_τ)+ / r_τ

With p_j = 1 every step this is the paper's greedy rule's first rejection; a weight p_j < 1 carries an
earlier step's "near miss" forward so that a later step can still keep the block. Exactness was checked by
enumeration on a discrete chain (every length-4 continuation's probability to 1e-17) and is tested by
two-sample tests against ``sde`` (tests/test_block.py).

Equal isotropic covariances make the residual one-dimensional. Along e = (m − m̂)/‖m − m̂‖, in noise units
u = e·(x − m̂)/c, Q is N(0, 1), P is N(d, 1) with d = ‖m − m̂‖/c, and every orthogonal direction is N(0, 1)
under both. So (a·P − Q)+ with a = p_j lives on u > u* = d/2 − log(a)/d, where a·P = Q, with mass and
survival function

    G(u) = a·Φ(d − u) − Φ(−u),     r = G(u*),

and one draw is u = G⁻¹(w·r) (bisection in log space, float64) plus a fresh N(0, I) orthogonal to e: a
one-step exact sampler, with no rejection loop. At c = 0 (the step into t = 1) both steps are point
masses: r = a when m̂ ≠ m, and the residual is m.

Why fresh noise each round: the choice of τ depends on the drafts after it, hence on their noise and their
uniforms. The greedy rule looks at nothing past its first rejection, so it can index noise by grid step and
reuse the unread part next round; block verification has read it, and reusing it would bias the next
round. Its draws are keyed by (sample, round start, step) instead (keyed.py), so a sample is still the same
alone or in any batch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from specflow.path import per_sample
from specflow.sampling import keyed

_BISECT = 80  # halvings of an interval of width ≤ d + 60: far below float64 resolution of u


def kept_steps(ell: Tensor, dist: Tensor, log_eta: Tensor, L: Tensor, ex: Tensor) -> tuple[Tensor, Tensor]:
    """(τ, log p) for one round: τ (B,) the drafted steps kept, log p (Lmax+1, B) the block weights.

    ell (Lmax, B): log P_j(y_{j+1}) − log Q_j(y_{j+1}); dist (Lmax, B): d_j = ‖m̂_j − m_j‖/c_j (inf at c = 0
    with m̂ ≠ m, 0 at c = 0 with m̂ = m); log_eta (Lmax, B): log η_{j+1}; L (B,) each sample's window (padding
    beyond it is never kept); ex (B,) step 0 is the target's own (m̂_0 = m_0: kept for sure).
    """
    Lmax = ell.shape[0]
    ell = ell.double().clone()
    ell[0] = torch.where(ex, 0.0, ell[0])
    log_p = ell.new_zeros((Lmax + 1, *ell.shape[1:]))
    for j in range(Lmax):
        log_p[j + 1] = (log_p[j] + ell[j]).clamp(max=0.0)
    log_r = residual_log_mass(log_p[:-1], dist.double())
    log_1mp = torch.log(-torch.expm1(log_p[:-1]))  # log(1 − p_j): −inf at p_j = 1
    log_h = log_r - torch.logaddexp(log_r, log_1mp)
    log_h = torch.where(torch.isnan(log_h), 0.0, log_h)  # r = 0 and p = 1 (Q = P): keep; never reached
    jj = torch.arange(Lmax + 1, device=ell.device)[:, None]
    log_h = torch.cat([log_h, log_p[-1:]])  # h_j for j < Lmax, then h_Lmax = p_Lmax
    log_h = torch.where(jj == L, log_p, log_h)  # h_L = p_L for shorter windows too
    keep = torch.cat([torch.ones_like(log_h[:1], dtype=torch.bool), log_eta.double() < log_h[1:]])
    keep &= jj <= L
    tau = (keep.long() * jj).amax(0)
    return tau, log_p


def draft_distance(delta: Tensor, c: Tensor) -> Tensor:
    """d_j = ‖m̂_j − m_j‖/c_j per (step, sample) of a (steps, samples, ...) δ = m̂ − m, as kept_steps reads it:
    inf at c = 0 with m̂ ≠ m, 0 where m̂ = m exactly."""
    a = delta.flatten(2)
    return (torch.linalg.vecdot(a, a).sqrt() / c).nan_to_num(nan=0.0)


def residual_log_mass(log_a: Tensor, d: Tensor) -> Tensor:
    """log ∫ (a·N(d, 1) − N(0, 1))+ du per element (the residual's mass; −inf where there is none)."""
    point = torch.isinf(d)  # c = 0 and m̂ ≠ m: the residual is a·δ_m
    ds = torch.where(point | (d <= 0), 1.0, d)
    u_star = ds / 2 - log_a / ds
    out = _log_survival(u_star, log_a, ds)
    out = torch.where(d <= 0, -math.inf, out)
    return torch.where(point, log_a, out)


def _log_survival(u: Tensor, log_a: Tensor, d: Tensor) -> Tensor:
    """log G(u) = log(a·Φ(d − u) − Φ(−u)) for u ≥ u*, written so that neither tail loses precision."""
    hi = log_a + torch.special.log_ndtr(d - u)
    gap = (torch.special.log_ndtr(-u) - hi).clamp(max=0.0)  # ≤ 0 for u ≥ u*
    return hi + torch.log(-torch.expm1(gap))


def residual_draw(m_hat: Tensor, m: Tensor, c: Tensor, log_a: Tensor, eps: Tensor, w: Tensor) -> Tensor:
    """One draw per row of (a·N(m, c²I) − N(m̂, c²I))+, normalised; ``eps`` a fresh N(0, I) per row, ``w``
    a fresh uniform. Rows with c = 0 get m; rows with m̂ = m (no residual: never chosen) get m̂ + c·ε."""
    delta = (m - m_hat).flatten(1).double()
    cc = c.double()
    norm = delta.norm(dim=1)
    d = norm / cc.clamp_min(torch.finfo(torch.float64).tiny)
    ok = (cc > 0) & (norm > 0)
    ds = torch.where(ok, d, 1.0)
    la = log_a.double()
    u_star = ds / 2 - la / ds
    target = torch.log(w.double()) + _log_survival(u_star, la, ds)  # log(w·r)
    lo, hi = u_star, torch.maximum(u_star, ds) + 60.0
    for _ in range(_BISECT):  # G is decreasing: find G(u) = w·r
        mid = (lo + hi) / 2
        above = _log_survival(mid, la, ds) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    u = ((lo + hi) / 2).to(m.dtype)
    e = (delta / norm.clamp_min(torch.finfo(torch.float64).tiny)[:, None]).to(m.dtype).view_as(m)
    ef = e.flatten(1)
    perp = eps - per_sample(torch.linalg.vecdot(ef, eps.flatten(1)), eps) * e
    x = m_hat + per_sample(c, m) * (per_sample(u, m) * e + perp)
    x = torch.where(per_sample(ok, m), x, m_hat + per_sample(c, m) * eps)
    return torch.where(per_sample(c > 0, m), x, m)


def round_noise(keys: Tensor, k: Tensor, Lmax: int, N: int, like: Tensor,
                branches: int = 1) -> tuple[Tensor, Tensor]:
    """Fresh (ε (Lmax, K, B, ...), log η (Lmax, K, B)) for a round starting at grid steps k, K = ``branches``
    (tree.py drafts K windows): keyed by (sample, round start, step, branch), never reused by a later round."""
    B, shape = like.shape[0], tuple(like.shape[1:])
    j = torch.arange(Lmax, device=like.device)[:, None, None]
    i = torch.arange(branches, device=like.device)[None, :, None]
    code = ((k * (N + 1) + j) * branches + i).flatten()  # (round start, step < N, branch) → one counter
    rows = keys.repeat(Lmax * branches)
    eps = keyed.normal(rows, code, torch.zeros(1, dtype=torch.long, device=like.device), shape, like.dtype)
    eta = keyed.uniform(rows, code, torch.ones(1, dtype=torch.long, device=like.device), 1, torch.float64)
    return eps.view(Lmax, branches, B, *shape), eta.view(Lmax, branches, B).log()


def residual_noise(keys: Tensor, k: Tensor, N: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Fresh (ε (B, ...), w (B,)) for the residual draw of the round starting at k."""
    code = k * (N + 1) + N  # the round's counter beside its steps' (which stop at N − 1)
    att = torch.tensor([2, 3], device=like.device)
    eps = keyed.normal(keys, code, att[:1], tuple(like.shape[1:]), like.dtype)[:, 0]
    w = keyed.uniform(keys, code, att[1:], 1, torch.float64)[:, 0, 0]
    return eps, w
