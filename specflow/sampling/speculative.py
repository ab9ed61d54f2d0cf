"""Exact speculative sampling of the ancestral SDE (De Bortoli, Galashov, Gretton, Doucet 2025, Alg. 2).

Target step k → k+1 (the ``sde`` sampler):  x_{k+1} ~ p_k = N(m_k, c_k²I),  m_k = transition_mean(x_k, v(x_k)).
Each sample sits at its own grid index k (ragged). One round, for all active samples at once:

  draft   y_0 = x_k,  y_{j+1} = m̂_j + ĉ_j·ε_{k+j}   (j < L),   m̂_j from the drafter's velocity at y_j
          (step 0 uses the target's velocity when the previous round already paid for it: m̂_0 = m_0)
  verify  ONE batched target call at every new state y_j of every active sample (y_L included, unless it is
          t = 1, so that an all-accepted round seeds the next one) → m_j
  accept  step j while  u_{k+j} ≤ min(1, N(y_{j+1}; m_j, c_j²) / N(y_{j+1}; m̂_j, ĉ_j²))
  couple  at the first rejection j: x_{k+j+1} = reflection coupling (ĉ = c) or a residual draw (ĉ ≠ c,
          ``draft_eta``); the round ends. At c = 0 (the step to t = 1) only an exact match is accepted,
          otherwise x = m_j.

Every accepted step and every coupled step is an exact draw from p_k (coupling.py), so the output law is
that of ``sde`` on the same grid. Noise is indexed by (grid step, sample): ε_{k+j}, u_{k+j} come from a
NoiseTable, so with draft = target every step is accepted and the output equals ``sde`` sample for sample.
The drafter only ever observes target evaluations at states of the chain (never at discarded drafts), so a
proposal never depends on the noise of the step it proposes. The window L is fixed, or chosen per sample by
a bandit (context: time bucket of t_k; reward: steps advanced per sequential target call, i.e. per round).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from specflow.path import transition_coefficients
from specflow.sampling import keyed
from specflow.sampling.bandit import POLICIES, Bandit, check_arms, time_bucket
from specflow.sampling.base import Sampler, register
from specflow.sampling.coupling import IsoGaussian, log_acceptance, reflect, residual_sample
from specflow.sampling.drafters import DRAFTERS, make_drafter
from specflow.sampling.noise import NoiseTable


@dataclasses.dataclass
class _Round:
    """One round's padded tensors: index j (0..L) first, then the A active samples."""

    Y: Tensor   # (L+1, A, ...) drafted states y_j
    T: Tensor   # (L+1, A) their times
    eps: Tensor  # (L, A, ...) ε_{k+j}: y_{j+1} = m̂_j + ĉ_j·ε_{k+j}
    Ch: Tensor  # (L, A) draft stds ĉ_j
    coef: tuple  # target step j: m_j = a_j·y_j + b_j·v_j, std c_j; each (L, A)
    V: Tensor = None   # (L+1, A, ...) target velocities where evaluated (or known)
    E: Tensor = None   # (L+1, A) bool: evaluated by this round's target call
    H: Tensor = None   # (L+1, A, ...) the target's trunk features where evaluated (drafters that read them)
    last: Tensor = None  # (A,) the last j evaluated (L, or L − 1 when y_L is at t = 1)


@register
@dataclasses.dataclass
class Speculative(Sampler):
    """Exact speculative sampler (see module docstring). Options:

    eta: the target's η (0 < η ≤ 1; the output law is ``sde`` with this η).
    drafter: a name from ``specflow.sampling.drafters`` ("frozen", "extrapolate", "model", …).
    window: steps drafted per round, an int ≥ 1 or "bandit" (then chosen among ``arms`` per time bucket of
        ``buckets``, by ``policy`` = "ucb1" | "thompson", seeded by ``seed``; the bandit learns across calls).
    draft_eta: None = the draft proposes with η (reflection coupling); else the draft's own η, whose
        transition has another covariance, coupled by the general maximal coupling.

    Determinism: a seeded generator reproduces a batch exactly. With per-sample generators
    (``noise.per_sample_generators``) and a fixed window, a sample is the same alone or in any batch (the
    residual draws are keyed by (sample, step, attempt), see keyed.py); with ``window="bandit"`` the
    windows depend on the batch through the shared bandit, so only the law is batch-independent.
    """

    name = "speculative"
    eta: float = 1.0
    drafter: str = "extrapolate"
    window: int | str = 8
    arms: tuple = (2, 4, 8, 16)
    policy: str = "ucb1"
    buckets: int = 4
    draft_eta: float | None = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 < float(self.eta) <= 1.0):
            raise ValueError(f"eta must lie in (0, 1] for exact speculative sampling, got {self.eta} "
                             f"(η = 0 is deterministic: use 'sfm' or 'euler')")
        if self.draft_eta is not None and not (0.0 < float(self.draft_eta) <= 1.0):
            raise ValueError(f"draft_eta must be None (same as eta) or lie in (0, 1], got {self.draft_eta}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.drafter!r}; valid: {', '.join(sorted(DRAFTERS))}")
        if self.window != "bandit" and (not isinstance(self.window, int) or isinstance(self.window, bool)
                                        or self.window < 1):
            raise ValueError(f"window must be an integer >= 1 or 'bandit', got {self.window!r}")
        self.arms = check_arms(self.arms)
        if self.policy not in POLICIES:
            raise ValueError(f"unknown bandit policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        self._bandit = (Bandit(self.arms, self.buckets, self.policy, self.seed)
                        if self.window == "bandit" else None)

    @property
    def needs_draft(self) -> bool:
        return DRAFTERS[self.drafter].needs_network

    @property
    def needs_features(self) -> bool:  # the shell then keeps the target's features of every call
        return getattr(DRAFTERS[self.drafter], "needs_features", False)

    def state_dict(self) -> dict:
        return {"bandit": self._bandit.state_dict()} if self._bandit is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self._bandit is None or set(state) - {"bandit"}:
            return super().load_state_dict(state)
        if "bandit" in state:
            self._bandit.load_state_dict(state["bandit"])

    # ---------------------------------------------------------------------------------------------------
    def _run(self, f, x, grid, draft, generator, stats):
        N, B = self.steps, x.shape[0]
        x = x.clone()  # updated in place per sample below; never write into the caller's noise
        noise = NoiseTable(N, x, generator, uniforms=True)  # ε_k, u_k per (grid step, sample)
        keys = keyed.sample_keys(generator, B, x) if self.draft_eta is not None else None
        drafter = make_drafter(self.drafter)
        drafter.reset(x)
        k = torch.zeros(B, dtype=torch.long, device=x.device)  # each sample's grid index
        known = torch.zeros(B, dtype=torch.bool, device=x.device)  # target velocity at (x_k, t_k) paid for
        v = torch.zeros_like(x)
        proposed = accepted = torch.zeros((), dtype=torch.long, device=x.device)
        arms = torch.zeros(len(self.arms), dtype=torch.long)
        while (act := (k < N).nonzero().squeeze(1)).numel():
            ka, ex = k[act], known[act]
            W = self._windows(grid[ka], N - ka)
            L = torch.minimum(W, N - ka)
            r = self._draft(x[act], v[act], ex, ka, act, L, grid, noise, drafter, draft)
            self._evaluate(f, r, ex, v[act], ka, act, L, N)
            a, p, q = self._verify(r, ex, ka, act, L, noise)  # a: leading accepted steps
            rej = a < L
            adv = torch.where(rej, a + 1, L)
            ar = torch.arange(act.numel(), device=x.device)
            x_new = r.Y[adv, ar]  # all accepted: y_L (rejected rows are replaced below)
            if bool(rej.any()):
                i = rej.nonzero().squeeze(1)
                pi, qi = p[a[i], i], q[a[i], i]
                if self.draft_eta is None:  # reflection maximal coupling
                    x_new[i] = reflect(qi.mean, pi.mean, pi.std, r.eps[a[i], i])
                else:  # general maximal coupling: residual (p − q)+ by keyed rejection sampling
                    x_new[i] = residual_sample(pi, qi, _keyed_draw(keys[act[i]], ka[i] + a[i], x))
            self._observe(drafter, r, a, ex, act)
            x[act], k[act], v[act] = x_new, ka + adv, r.V[L, ar]
            known[act] = ~rej & (ka + adv < N)  # an all-accepted round evaluated y_L: it seeds the next
            proposed = proposed + (torch.minimum(a + 1, L) - ex.long()).sum()
            accepted = accepted + (a - ex.long()).sum()
            stats.rounds += 1
            if self._bandit is not None:
                fits = W <= N - ka  # an arm clamped at the end of the grid is not credited
                ctx = time_bucket(grid[ka], self.buckets)
                self._bandit.update(ctx[fits], W[fits], adv[fits].to(torch.float64))  # steps per call
                arms += torch.bincount(self._bandit.index(W), minlength=len(arms))
        stats.proposed, stats.accepted = int(proposed), int(accepted)
        if self._bandit is not None:
            stats.arm_counts = {int(a): int(n) for a, n in zip(self.arms, arms)}
        return x

    def _windows(self, t: Tensor, remaining: Tensor) -> Tensor:
        if self._bandit is None:
            return torch.full_like(remaining, self.window)
        return self._bandit.select(time_bucket(t, self.buckets), limit=remaining).to(remaining.device)

    def _draft(self, x, v, ex, ka, act, L, grid, noise, drafter, draft) -> _Round:
        """y_{j+1} = m̂_j + ĉ_j·ε_{k+j} for j < L (per sample); step 0 is the target's own when ``ex``."""
        Lmax, Lmin, A = int(L.max()), int(L.min()), act.numel()
        T = grid[(ka + torch.arange(Lmax + 1, device=x.device)[:, None]).clamp(max=self.steps)].to(x.dtype)
        coef = transition_coefficients(T[:-1], T[1:], self.eta)  # the target's step, (Lmax, A) each
        a_q, b_q, c_q = coef if self.draft_eta is None else transition_coefficients(T[:-1], T[1:], self.draft_eta)
        if self.draft_eta is not None:  # the target's own step (ex) uses the target's transition
            a_q, b_q, c_q = (torch.cat([torch.where(ex, p[:1], q[:1]), q[1:]]) for p, q in zip(coef, (a_q, b_q, c_q)))
        eps = noise.eps[(ka + torch.arange(Lmax, device=x.device)[:, None]).clamp(max=self.steps - 1), act]
        r = _Round(Y=x.new_zeros((Lmax + 1, *x.shape)), T=T, eps=eps, Ch=c_q, coef=coef)
        r.Y[0] = x
        shape = (Lmax, A, *([1] * (x.ndim - 1)))
        a_q, b_q, ce = a_q.view(shape), b_q.view(shape), c_q.view(shape) * eps  # ce_j = ĉ_j·ε_{k+j}
        for j in range(Lmax):
            if j < Lmin:  # every sample drafts step j: plain views, no gathers
                b, y, t = act, r.Y[j], T[j]
            else:
                pos = (L > j).nonzero().squeeze(1)
                b, y, t = act[pos], r.Y[j, pos], T[j, pos]
            if j == 0:  # the velocity at x_k is the target's own where it was paid for, else drafted
                v_hat = v.clone()
                d = (~ex).nonzero().squeeze(1)
                if d.numel():
                    v_hat[d] = drafter(y[d], t[d], b[d], 0, draft)
            else:
                v_hat = drafter(y, t, b, j, draft)
            if j < Lmin:  # y_{j+1} = a_j·y_j + b_j·v̂_j + ĉ_j·ε, written in place
                torch.mul(a_q[j], y, out=r.Y[j + 1])
                r.Y[j + 1] += b_q[j] * v_hat
                r.Y[j + 1] += ce[j]
            else:
                r.Y[j + 1, pos] = a_q[j, pos] * y + b_q[j, pos] * v_hat + ce[j, pos]
        return r

    def _evaluate(self, f, r: _Round, ex, v, ka, act, L, N) -> None:
        """The round's one target call: y_j for j in [ex, L] of each sample (not y_L at t = 1)."""
        jj = torch.arange(r.Y.shape[0], device=ka.device)[:, None]
        r.last = last = torch.where(ka + L < N, L, L - 1)
        r.E = (jj >= ex.long()) & (jj <= last)
        rows = act.expand(r.Y.shape[0], -1)[r.E]
        r.V = torch.zeros_like(r.Y)
        if rows.numel():  # none only when every sample takes its last step with a velocity already paid for
            r.V[r.E] = f(r.Y[r.E], r.T[r.E], rows, step=_Steps(ka, ka + last))
            h = getattr(f, "features", None) if self.needs_features else None
            if h is not None:
                r.H = h.new_zeros((*r.E.shape, *h.shape[1:]))
                r.H[r.E] = h
        r.V[0, ex] = v[ex]

    def _verify(self, r: _Round, ex, ka, act, L, noise):
        """Leading accepted steps a ∈ [0, L] per sample, and the target/draft laws p_j, q_j of every step."""
        Lmax = r.eps.shape[0]
        a_p, b_p, _ = (c.view(*c.shape, *([1] * (r.Y.ndim - 2))) for c in r.coef)
        p = IsoGaussian(a_p * r.Y[:-1] + b_p * r.V[:-1], r.coef[2])  # the target's step from each y_j
        q = IsoGaussian(r.Y[1:] - r.Ch.view(a_p.shape) * r.eps, r.Ch)  # the draft's: m̂_j = y_{j+1} − ĉ_j·ε
        u = noise.u[(ka + torch.arange(Lmax, device=ka.device)[:, None]).clamp(max=self.steps - 1), act]
        ok = u.log() <= log_acceptance(r.Y[1:], p, q)
        ok |= torch.arange(Lmax, device=ka.device)[:, None] >= L[None]  # padding
        ok[0] |= ex  # the target's own step
        a = torch.minimum(ok.long().cumprod(0).sum(0), L)
        return a, p, q

    def _observe(self, drafter, r: _Round, a, ex, act) -> None:
        """Feed the drafter the target evaluations at chain states (y_j, ex ≤ j ≤ min(a, last)), in order of
        time: the last ``drafter.memory`` of them per sample (default 2: what frozen, extrapolate and medusa
        read; ``memory = None``: all). Never a discarded draft's, so no proposal sees its own step's noise."""
        lo, hi = ex.long(), torch.minimum(a, r.last)  # each sample's evaluated chain states: lo..hi
        memory = getattr(drafter, "memory", 2)
        for m in reversed(range(r.Y.shape[0] if memory is None else memory)):
            j = hi - m
            pos = (j >= lo).nonzero().squeeze(1)
            if pos.numel():
                j = j[pos]
                h = () if r.H is None else (r.H[j, pos],)
                drafter.observe(act[pos], r.Y[j, pos], r.T[j, pos], r.V[j, pos], *h)


def _keyed_draw(keys: Tensor, steps: Tensor, like: Tensor):
    """Residual-sampling draws for rows (keys, steps): a pure function of (key, step, attempt)."""
    def draw(rows: Tensor, att: Tensor):
        eps = keyed.normal(keys[rows], steps[rows], 2 * att, tuple(like.shape[1:]), like.dtype)
        w = keyed.uniform(keys[rows], steps[rows], 2 * att + 1, 1, like.dtype)[..., 0]
        return eps, w
    return draw


class _Steps:
    """The grid steps of a ragged call, formatted only if an error message needs them (no device sync)."""

    def __init__(self, lo: Tensor, hi: Tensor):
        self.lo, self.hi = lo, hi

    def __str__(self) -> str:
        lo, hi = int(self.lo.min()), int(self.hi.max())
        return str(lo) if lo == hi else f"{lo}..{hi}"
