"""Draft trees for the exact speculative sampler (``verifier="tree"``).

The window's first drafted step gets K chances instead of one. Each round drafts K windows from the same
state with independent noise (the branches); all K·L states go to the target in the round's one batched
call. At the branch point the K candidates y⁽¹⁾ … y⁽ᴷ⁾ are i.i.d. draws from the same draft step
Q = N(m̂, c²I) (same state, same drafter prediction), so recursive rejection sampling chooses among them
exactly (multi-draft speculative sampling; Bullo et al. 2026 for diffusions):

    p₁ = P:         accept y⁽¹⁾ with probability min(1, P/Q)
    p_i ∝ (p_{i−1} − Q)+:   accept y⁽ⁱ⁾ with probability min(1, p_i/Q)
    all rejected:   draw from p_{K+1}

Each stage outputs min(p_i, Q) + (p_i − Q)+ = p_i, so the chosen state is an exact draw from P. With equal
isotropic covariances every p_i (i ≥ 2) has the form (a_i·P − Q)+ / r(a_i), where r(a) is the mass block.py
computes in closed form: a₂ = 1 and a_{i+1} = a_i / (1 + r(a_i)), and the acceptance ratio is
(a_i·P/Q − 1)+ / r(a_i). The last residual is drawn in one step by block.py's ``residual_draw``.

After the branch point the round continues along the chosen branch with block verification (block.py): the
sub-window from the chosen state is judged as a block, and the state after it drawn from the block's
residual (p_τ·P − Q)+. That branch's later drafts were drawn given its chosen state only, with noise and
uniforms the choice never read, so they are still exact proposals, and block verification is exact for any
window of exact proposals. (It keeps at least as many steps as the step-by-step rule.) Where the round starts with the
target's own step (its velocity was paid for last round), that step is shared by every branch and the
branches split at the next one.

The drafter must predict x̂1 independently of the drafted states (frozen, extrapolate): then every branch
has the same draft mean at the branch point. Noise is fresh and keyed per (sample, round start, step,
branch), so a sample is the same alone or in any batch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from specflow.path import per_sample
from specflow.sampling import keyed
from specflow.sampling.block import (draft_distance, kept_steps, residual_draw, residual_log_mass, residual_noise,
                                    round_noise)


def choose_branch(ell: Tensor, dist: Tensor, log_u: Tensor) -> tuple[Tensor, Tensor]:
    """Recursive rejection sampling over K i.i.d. candidates of one step: (chosen (B,), log a (B,)).

    ell (K, B): log P(y⁽ⁱ⁾) − log Q(y⁽ⁱ⁾); dist (B,): ‖m̂ − m‖/c (inf at c = 0 with m̂ ≠ m); log_u (K, B): log
    of fresh uniforms. chosen: the first accepted branch, K where all were rejected; log a: the weight of the
    residual (a·P − Q)+ to draw from where all were rejected.
    """
    K = ell.shape[0]
    ell, dist = ell.double(), dist.double()
    chosen = torch.full(ell.shape[1:], K, dtype=torch.long, device=ell.device)
    log_a = torch.zeros_like(dist)
    log_r = residual_log_mass(log_a, dist)  # r(1) = TV(P, Q): what p₂ = (P − Q)+ / r normalises by
    for i in range(K):
        if i == 0:
            log_acc = ell[0].clamp(max=0.0)
        else:  # log((a·e^ℓ − 1)+ / r(a)); −inf where a·P ≤ Q at the candidate
            s = log_a + ell[i]
            log_acc = torch.where(s > 0, torch.log(torch.expm1(s.clamp_min(1e-300))), -math.inf) - log_r
            log_acc = log_acc.nan_to_num(nan=-math.inf)  # no residual left (m̂ = m): nothing to accept
        take = (chosen == K) & (log_u[i].double() < log_acc)
        chosen = torch.where(take, i, chosen)
        if i > 0:  # rejected again: p_{i+1} ∝ (a·P − (1 + r)·Q)+
            log_a = log_a - torch.log1p(log_r.exp())
            log_r = residual_log_mass(log_a, dist)
    return chosen, log_a


def after_branch_point(ell: Tensor, dist: Tensor, log_u: Tensor, L: Tensor, bp: Tensor, none: Tensor,
                       log_a_none: Tensor) -> tuple[Tensor, Tensor]:
    """(a, log a) along the chosen branch: the steps kept (B,) and the weight of the residual the next state is
    drawn from where a < L. Steps ≤ bp are kept with weight 1 (ℓ = 0), so block verification judges the
    sub-window from the chosen state as if it started there; ``none``: every branch was rejected at the branch
    point, then a = bp and the residual is choose_branch's (a·P − Q)+ with log a = ``log_a_none``.
    ell, dist, log_u (Lmax, B) along the branch, as block.kept_steps reads them."""
    jj = torch.arange(ell.shape[0], device=ell.device)[:, None]
    tau, log_p = kept_steps(torch.where(jj <= bp, 0.0, ell), dist, log_u, L, torch.ones_like(none))
    a = torch.where(bp >= L, L, torch.where(none, bp, tau))  # bp ≥ L: only the target's own step this round
    log_a = torch.where(none & (bp < L), log_a_none, log_p.gather(0, a.clamp(max=ell.shape[0])[None])[0])
    return a, log_a


def redraw(y: Tensor, m_hat: Tensor, m: Tensor, c: Tensor, log_a: Tensor, eps: Tensor, w: Tensor) -> Tensor:
    """The state after a rejected draft ``y``: a draw from the residual (a·P − Q)+ (``y`` itself is unused: the
    rejection already spent it; tests swap in a lossy rule that keeps it)."""
    return residual_draw(m_hat, m, c, log_a, eps, w)


def run_tree(s, f, x: Tensor, grid: Tensor, generator, stats) -> Tensor:
    """``Speculative._run`` for ``verifier="tree"`` (eager: one host sync per round, as the greedy path)."""
    from specflow.sampling.drafters import make_drafter
    from specflow.sampling.speculative import _Round, _sqnorm, _step_table

    N, B, K, dev = s.steps, x.shape[0], s.branches, x.device
    t = grid.to(dev, x.dtype)
    P = _step_table(grid, s.eta, x)  # (N, 4): a, b, c, 1/(2c²) per step
    keys = keyed.sample_keys(generator, B, x)
    drafter = make_drafter(s.drafter)
    drafter.reset(x)
    xk, v = x.clone(), torch.zeros_like(x)
    k = torch.zeros(B, dtype=torch.long, device=dev)
    known = torch.zeros(B, dtype=torch.bool, device=dev)
    counts = k.new_zeros(2)
    arms = torch.zeros(len(s.arms), dtype=torch.long)
    played = None
    ar = torch.arange(B, device=dev)
    while True:
        k_h, known_h, _ = f.fetch(k, known, counts)
        if s.bandit is not None:
            W, played = s._play_bandit(k_h, known_h, grid, arms, played)
        else:
            W = torch.full((B,), s.window, dtype=torch.long)
        L_h = torch.minimum(W, N - k_h)
        Lmax = int(L_h.max())
        if Lmax == 0:
            break
        L = L_h.to(dev)
        ex = known
        bp = ex.long()  # the branch point: the first drafted step
        jj = torch.arange(Lmax + 1, device=dev)[:, None]
        J = k + jj  # (Lmax+1, B) grid index of y_j
        Jc = J[:-1].clamp(max=N - 1)
        Pj = P[Jc]  # (Lmax, B, 4)
        a_p, b_p, c_p = (per_sample(Pj[..., q], x) for q in range(3))
        S = t[Jc]
        T = t[J.clamp(max=N)]
        eps, log_u = round_noise(keys, k, Lmax, N, x, branches=K)
        eps[0] = torch.where(per_sample(ex, x)[None], eps[0, :1], eps[0])  # the target's own step: shared
        beta = b_p / per_sample(1 - S, x)
        Y = x.new_empty((Lmax + 1, K, *x.shape))
        Y[0] = xk
        for j in range(Lmax):  # y_{j+1} = (a − β)·y + β·x̂1 + c·ε, x̂1 = the paid one at step 0 where known
            x1 = drafter.predict_x1(S[j], None)
            if j == 0:
                x1 = torch.where(per_sample(ex, x), xk + per_sample(1 - S[0], x) * v, x1)
            Y[j + 1] = (a_p[j] - beta[j]) * Y[j] + beta[j] * x1 + c_p[j] * eps[j]
        # The call: y_j for known ≤ j ≤ last, every branch after the branch point, branch 0 up to it.
        last = torch.where(k + L < N, L, L - 1)
        ii = torch.arange(K, device=dev)[None, :, None]
        need = (jj[:, None] >= known.long()) & (jj[:, None] <= last) & ((ii == 0) | (jj[:, None] > bp))
        idx = need.flatten().nonzero().squeeze(1)
        V = torch.zeros_like(Y)
        V[0] = v
        rows = idx % B
        if idx.numel():
            Tb = T[:, None].expand(Lmax + 1, K, B)
            vv = f(Y.flatten(0, 2)[idx], Tb.flatten()[idx], None if f.cond is None else rows,
                   step=(J[:, None].expand(Lmax + 1, K, B).flatten()[idx]).cpu())
            V.flatten(0, 2).index_copy_(0, idx, vv)
        shared = (jj[:, None] <= bp).view(Lmax + 1, 1, B, *([1] * (x.ndim - 1)))  # before the split: branch 0's
        V = torch.where(shared, V[:, :1], V)
        m = a_p[:, None] * Y[:-1] + b_p[:, None] * V[:-1]  # (Lmax, K, B, ...) the target's means
        d = Y[1:] - m
        sq = lambda a: _sqnorm(a.flatten(0, 1)).view(Lmax, K, B)
        # log P/Q at every draft; at c = 0 as the greedy rule has it (exact match: 0, else −inf)
        ell = (0.5 * sq(eps) - sq(d) * Pj[:, None, :, 3]).nan_to_num(nan=0.0)
        # The branch point: recursive rejection sampling over the K candidates.
        bpc = bp.clamp(max=Lmax - 1)
        m_hat = Y[bpc + 1, 0, ar] - per_sample(Pj[bpc, ar, 2], x) * eps[bpc, 0, ar]
        c_b = Pj[bpc, ar, 2]
        dist = ((m_hat - m[bpc, 0, ar]).flatten(1).norm(dim=1) / c_b).nan_to_num(nan=0.0)
        chosen, log_a_all = choose_branch(ell[bpc, :, ar].T, dist, log_u[bpc, :, ar].T)
        split = bp < L  # a drafted step exists this round
        chosen = torch.where(split, chosen, 0)
        br = chosen.clamp(max=K - 1)
        # Along the chosen branch: block verification of the sub-window after the branch point (block.py). Its
        # steps up to the branch point are kept with weight 1 (ℓ = 0): the sub-window starts at the chosen
        # state, whose continuation was drafted from it with noise and uniforms the choice never read.
        mh_b = Y[1:, br, ar] - c_p * eps[:, br, ar]  # (Lmax, B, ...) the draft's means along the branch
        dist_b = draft_distance(mh_b - m[:, br, ar], Pj[..., 2])
        a, log_a = after_branch_point(ell[:, br, ar], dist_b, log_u[:, br, ar], L, bp, chosen == K, log_a_all)
        rej = a < L
        jr = a.clamp(max=Lmax - 1)  # the rejected step
        c_r = Pj[jr, ar, 2]
        m_r = m[jr, br, ar]
        xr = redraw(Y[jr + 1, br, ar], mh_b[jr, ar], m_r, c_r, log_a, *residual_noise(keys, k, N, x))
        xn = torch.where(per_sample(rej, x), xr, Y[L, br, ar])
        Ysel, Vsel = Y[:, br, ar], V[:, br, ar]
        r = _Round(Y=Ysel, T=T, P=Pj, Ch=Pj[..., 2], eps=None, eps_sq=None, log_u=None, ar=ar, V=Vsel)
        r.last = last
        s._observe(drafter, r, a, ex)
        counts += torch.stack([(torch.minimum(a + 1, L) - ex.long()).sum(), (a - ex.long()).sum()])
        xk = xn
        v = Vsel[L, ar]
        k = k + torch.where(rej, a + 1, L)
        known = ~rej & (k < N)
        stats.rounds += 1
    stats.proposed, stats.accepted = counts.tolist()
    if s.bandit is not None:
        stats.arm_counts = dict(zip(s.arms, arms.tolist()))
    return xk
