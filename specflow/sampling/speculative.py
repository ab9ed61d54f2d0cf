"""Exact speculative sampling of the ancestral SDE (De Bortoli, Galashov, Gretton, Doucet 2025, Alg. 2).

Target step k → k+1 (the ``sde`` sampler):  x_{k+1} ~ p_k = N(m_k, c_k²I),  m_k = transition_mean(x_k, v(x_k)).
Each sample sits at its own grid index k (ragged). One round, for all active samples at once:

  draft   y_0 = x_k,  y_{j+1} = m̂_j + ĉ_j·ε_{k+j}   (j < L),   m̂_j from the drafter's velocity at y_j
          (step 0 uses the target's velocity when the previous round already paid for it: m̂_0 = m_0)
  verify  ONE batched target call at every new state y_j of every active sample (y_L included, unless it is
          t = 1, so that an all-accepted round seeds the next one) → m_j
  accept  step j while  u_{k+j} < min(1, N(y_{j+1}; m_j, c_j²) / N(y_{j+1}; m̂_j, ĉ_j²))
  couple  at the first rejection j: x_{k+j+1} = reflection coupling (ĉ = c) or a residual draw (ĉ ≠ c,
          ``draft_eta``); the round ends. At c = 0 (the step to t = 1) only an exact match is accepted,
          otherwise x = m_j.

Every accepted step and every coupled step is an exact draw from p_k (coupling.py), so the output law is
that of ``sde`` on the same grid. Noise is indexed by (grid step, sample): ε_{k+j}, u_{k+j} come from a
NoiseTable, so with draft = target every step is accepted and the output equals ``sde`` sample for sample.
The drafter only ever observes target evaluations at states of the chain (never at discarded drafts), so a
proposal never depends on the noise of the step it proposes. The window L is fixed, or chosen per sample by
a bandit (context: time bucket of t_k; cost of a round: 1 sequential call + λ·the sample's target rows, with
λ = ``compute_price``; the bandit learns the rate of steps advanced per unit of that cost, bandit.py).
``verifier="block"`` judges the window as a block instead (block.py): same law, at least as many steps kept.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
from torch import Tensor

from specflow.path import per_sample, transition_coefficients
from specflow.sampling import keyed
from specflow.sampling.bandit import (POLICIES, Bandit, check_arms, check_price, check_rate_state, time_bucket,
                                      window_cost)
from specflow.sampling.block import draft_distance, kept_steps, residual_draw, residual_noise, round_noise
from specflow.sampling.base import Sampler, register
from specflow.sampling.coupling import IsoGaussian, log_acceptance, reflect, residual_sample
from specflow.sampling.drafters import DRAFTERS, make_drafter
from specflow.sampling.graphs import for_tensor as graphs_for
from specflow.sampling.noise import NoiseTable
from specflow.sampling.opcount import host_side
from specflow.sampling.tree import run_tree


VERIFIERS = ("greedy", "block", "tree")


@dataclasses.dataclass
class _Round:
    """One round's padded tensors over the whole batch: index j (0..L) first, then the B samples. A sample
    with a shorter window (or finished, L = 0) carries padding that is never evaluated nor accepted."""

    Y: Tensor    # (L+1, B, ...) drafted states y_j
    T: Tensor    # (L+1, B) their times
    P: Tensor    # (L, B, 4) the target's step j: a, b, c, 1/(2c²) (m_j = a·y_j + b·v_j, std c)
    Ch: Tensor   # (L, B) the draft's std ĉ_j
    eps: Tensor  # (L, B, ...) ε_{k+j}: y_{j+1} = m̂_j + ĉ_j·ε_{k+j}
    eps_sq: Tensor  # (L, B) ‖ε_{k+j}‖²/2
    log_u: Tensor   # (L, B) log u_{k+j}
    ar: Tensor      # (B,) 0..B−1: the sample index, for per-sample gathers
    last: Tensor = None  # (B,) the last j evaluated (L, or L − 1 when y_L is at t = 1; −1: none)
    V: Tensor = None     # (L+1, B, ...) target velocities where evaluated (V[0] = the paid one where known)
    H: Tensor = None     # (L+1, B, ...) the target's trunk features where evaluated (drafters that read them)
    m: Tensor = None     # (L, B, ...) the target's means m_j (set by _verify)
    log_p: Tensor = None  # (L+1, B) block verification's weights log p_j (set by _verify, block only)


@register
@dataclasses.dataclass
class Speculative(Sampler):
    """Exact speculative sampler (see module docstring). Options:

    eta: the target's η (0 < η ≤ 1; the output law is ``sde`` with this η).
    drafter: a name from ``specflow.sampling.drafters`` ("frozen", "extrapolate", "model", …).
    window: steps drafted per round, an int ≥ 1 or "bandit" (then chosen among ``arms`` per time bucket of
        ``buckets``, by ``policy`` = "thompson" (default) | "ucb1", seeded by ``seed``; the bandit learns across
        calls).
    compute_price: λ ≥ 0, what one target row of a sample costs in units of one sequential call, for the
        window bandit's objective (bandit.window_cost): 0 prices latency only (the largest window tends to
        win), larger λ prices the rows too (compute per sample; λ = 1: a row costs as much as a call).
    draft_eta: None = the draft proposes with η (reflection coupling); else the draft's own η, whose
        transition has another covariance, coupled by the general maximal coupling.
    cuda_graphs: on CUDA, replay the round's fixed-shape pieces as CUDA graphs (graphs.py) where the drafter
        predicts x̂1 (frozen, extrapolate) and the coupling is reflection; same samples, fewer launches.
    compile: fuse the round's two pieces with torch.compile (one graph per window length, no breaks) before
        they are captured as CUDA graphs: fewer, larger kernels per round. Each new window length pays a
        compile (seconds) on first use; x̂1 drafters and draft_eta=None only. Not measured on a GPU yet.
    row_bucket: pad each target call to a multiple of this many rows (repeating one row; the padding is
        paid for, so it counts in total_nfe). 0: no padding. Ragged calls have a new row count almost every
        round, and conv libraries (cuDNN) plan per shape; a bucket keeps the shapes few.
    verifier: "greedy" (the paper's rule: accept step by step up to the first rejection) or "block" (judge
        the window as a block and draw the residual in one step, block.py: keeps at least as many steps,
        same law), or "tree" (``branches`` windows drafted from each state, verified in the one call, the
        first drafted step chosen among them by recursive rejection sampling, tree.py: every branch's rows
        count in total_nfe). Both draw fresh keyed noise each round, need the draft's covariance
        (draft_eta=None) and run eagerly (no CUDA graphs, no compile); tree needs a drafter whose prediction
        does not read the drafted states (frozen, extrapolate).
    branches: the tree's branch count K ≥ 2 (verifier="tree" only; default 2): up to K·L + 1 target rows
        per round.

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
    compute_price: float = 0.0
    policy: str = "thompson"  # met the hindsight goal where UCB1 missed it (RESULTS §Adaptive policies)
    buckets: int = 4
    draft_eta: float | None = None
    seed: int = 0
    cuda_graphs: bool = True
    compile: bool = False
    row_bucket: int = 0
    verifier: str = "greedy"
    branches: int | None = None

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
        self.compute_price = check_price(self.compute_price)
        if not isinstance(self.row_bucket, int) or isinstance(self.row_bucket, bool) or self.row_bucket < 0:
            raise ValueError(f"row_bucket must be an integer >= 0 (0: no padding), got {self.row_bucket!r}")
        self._check_verifier()
        if self.policy not in POLICIES:
            raise ValueError(f"unknown bandit policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        if self.compile and not (DRAFTERS[self.drafter].predicts_x1 and self.draft_eta is None):
            raise ValueError(f"compile=True fuses the x̂1-drafter round with reflection coupling: use drafter "
                             f"'frozen' or 'extrapolate' with draft_eta=None (got drafter={self.drafter!r}, "
                             f"draft_eta={self.draft_eta}), or compile=False")
        self.bandit = (Bandit(self.arms, self.buckets, self.policy, self.seed)
                        if self.window == "bandit" else None)

    @property
    def defers_checks(self) -> bool:  # each call's NaN check rides on the next round's fetch; the general
        return self.draft_eta is None  # coupling's residual draws would spin on a NaN mean first

    @property
    def needs_draft(self) -> bool:
        return DRAFTERS[self.drafter].needs_network

    @property
    def needs_features(self) -> bool:  # the shell then keeps the target's features of every call
        return getattr(DRAFTERS[self.drafter], "needs_features", False)

    def state_dict(self) -> dict:
        if self.bandit is None:
            return {}
        return {"bandit": self.bandit.state_dict(), "objective": self._objective()}

    def _objective(self) -> dict:
        # the objective's name in saved states (steps per window_cost); kept so earlier states still load
        return {"reward": "window_reward", "compute_price": self.compute_price}

    def load_state_dict(self, state: dict) -> None:
        if self.bandit is None or set(state) - {"bandit", "objective"}:
            return super().load_state_dict(state)
        theirs = state.get("objective", {"reward": "window_reward", "compute_price": 0.0})  # older states: λ = 0
        if theirs != self._objective():
            raise ValueError(f"bandit state was learnt for the objective {theirs} but this sampler's is "
                             f"{self._objective()}: its rewards are in other units; build the sampler with "
                             f"compute_price={theirs.get('compute_price')}, or start without the saved state")
        if "bandit" in state:
            check_rate_state(state["bandit"], self.name)
            self.bandit.load_state_dict(state["bandit"])

    def _check_verifier(self):
        v = self.verifier
        if v not in VERIFIERS:
            raise ValueError(f"unknown verifier {v!r}; valid: {', '.join(VERIFIERS)}")
        if v == "tree" and self.window == "bandit" and self.compute_price > 0:
            raise ValueError("compute_price > 0 prices a round's target rows, which the window bandit counts for "
                             "one branch; with verifier='tree' use compute_price=0 (or a fixed window)")
        if v == "tree":
            if self.branches is None:
                self.branches = 2
            K = self.branches
            if not isinstance(K, int) or isinstance(K, bool) or K < 2:
                raise ValueError(f"verifier='tree' drafts `branches` windows per round: an integer >= 2, got "
                                 f"{K!r} (with 1 branch the tree is verifier='greedy')")
            if not DRAFTERS[self.drafter].predicts_x1:
                raise ValueError(f"verifier='tree' needs every branch to share the draft mean at its branch "
                                 f"point, which holds for drafters that predict x̂1 without reading the drafted "
                                 f"states ('frozen', 'extrapolate'); drafter={self.drafter!r} reads them: use "
                                 f"verifier='greedy' or 'block' with it")
        elif self.branches is not None:
            raise ValueError(f"branches={self.branches!r} applies to verifier='tree' only (got verifier={v!r})")
        if v != "greedy" and self.draft_eta is not None:
            raise ValueError(f"verifier={v!r} draws its residuals along the line between the two means, which "
                             f"is exact only when the draft's step has the target's covariance: use "
                             f"draft_eta=None (got draft_eta={self.draft_eta}), or verifier='greedy'")
        if v != "greedy" and self.compile:
            raise ValueError(f"verifier={v!r} runs eagerly: use compile=False (or verifier='greedy')")
        if v == "tree" and self.row_bucket:
            raise ValueError("verifier='tree' does not pad its calls: use row_bucket=0 (or verifier='greedy')")

    # ---------------------------------------------------------------------------------------------------
    # The round is written for GPU latency: every sample stays in the batch (finished ones with an empty
    # window), tables are gathered once per round, and the host syncs ONCE per round: ``f.fetch`` copies each
    # sample's k and known (plus the last call's NaN check and the counts) down, and the host plans the
    # round from them (_Plan: windows, the rows of the target call, the bandit's choices). Around the one
    # target call the round is two fixed-shape pieces, ``_propose`` (draft) and ``_settle`` (verify, couple,
    # observe, advance), that update the chain in place; on CUDA they are captured as CUDA graphs per window
    # length (graphs.py). benchmarks/speculative.py measures the time outside the model.
    def _run(self, f, x, grid, draft, generator, stats):
        if self.verifier == "tree":
            return run_tree(self, f, x, grid, generator, stats)
        N, B, dev = self.steps, x.shape[0], x.device
        block = self.verifier == "block"
        tab = dict(t=grid.to(dev, x.dtype), P=_step_table(grid, self.eta, x))
        if not block:  # block verification draws fresh noise every round (block.py)
            noise = NoiseTable(N, x, generator, uniforms=True)  # ε_k, u_k per (grid step, sample)
            tab.update(eps=noise.eps, eps_sq=0.5 * _sqnorm(noise.eps), log_u=noise.u.log())
        tab["Q"] = tab["P"] if self.draft_eta is None else _step_table(grid, self.draft_eta, x)
        keys = keyed.sample_keys(generator, B, x) if self.draft_eta is not None or block else None
        tab["keys"] = keys
        drafter = make_drafter(self.drafter)
        drafter.reset(x)
        c = _Chain(x=x.clone(), v=torch.zeros_like(x), k=torch.zeros(B, dtype=torch.long, device=dev),
                   known=torch.zeros(B, dtype=torch.bool, device=dev),
                   W=torch.full((B,), self.window if self.bandit is None else 1, dtype=torch.long, device=dev))
        jj_cpu = torch.arange((max(self.arms) if self.bandit is not None else self.window) + 1)[:, None]
        jj = jj_cpu.to(dev)
        graphs = graphs_for(x, self.cuda_graphs and drafter.predicts_x1 and self.draft_eta is None
                            and not block)
        propose, settle = _compiled(type(self)) if self.compile else (type(self)._propose, type(self)._settle)
        arms = torch.zeros(len(self.arms), dtype=torch.long)
        played = None
        while True:
            k, known, counts = f.fetch(c.k, c.known, c.counts)  # the round's one host sync
            if self.bandit is not None:
                W, played = self._play_bandit(k, known, grid, arms, played)
                c.W.copy_(W, non_blocking=True)  # pageable → device: staged at once, no wait on the device
            p = _Plan(N, k, known, W if self.bandit is not None else self.window, jj_cpu, self.row_bucket)
            if p.Lmax == 0:  # every sample is at t = 1
                break
            idx = p.rows.to(dev, non_blocking=True)  # uploaded now, while the device is idle
            r = graphs(("propose", p.Lmax), lambda: propose(self, c, p, jj, tab, drafter, draft), group=p.Lmax)
            self._evaluate(f, r, c, p, idx)
            graphs(("settle", p.Lmax), lambda: settle(self, c, r, jj, drafter, keys), group=p.Lmax)
            stats.rounds += 1
        stats.proposed, stats.accepted = counts.tolist()
        if self.bandit is not None:
            stats.arm_counts = dict(zip(self.arms, arms.tolist()))
        return c.x

    @host_side
    def _play_bandit(self, k: Tensor, known: Tensor, grid: Tensor, arms: Tensor, played):
        """On the host: credit last round's choices (``played``) with the steps they advanced and the round's
        cost (window_cost), then choose every sample's window for this round; returns (W, played)."""
        N = self.steps
        if played is not None:
            ctx, W, k0, rows = played
            fits = W <= N - k0  # an arm clamped at the end of the grid (or a finished sample): no credit
            self.bandit.update(ctx[fits], W[fits], (k - k0)[fits], cost=window_cost(rows[fits], self.compute_price))
        if not bool((k < N).any()):  # all done: no choice to make (a Thompson choice would draw)
            return torch.zeros_like(k), None
        ctx = time_bucket(grid[k], self.buckets)
        W = self.bandit.select(ctx, limit=N - k)
        arms += torch.bincount(self.bandit.index(W[k < N]), minlength=len(arms))
        L = torch.minimum(W, N - k)
        rows = torch.where(k + L < N, L, L - 1) + 1 - known.long()  # this round's target rows per sample (_Plan)
        return W, (ctx, W, k, rows)

    def _propose(self, c: "_Chain", p: "_Plan", jj, tab, drafter, draft) -> _Round:
        """The draft of this round (fixed shapes for a given p.Lmax, no sync). Captured as a CUDA graph keyed by
        p.Lmax, so on that path it must read nothing else from the host plan (network drafters, never
        captured, also read p.L and p.known)."""
        torch.minimum(c.W, self.steps - c.k, out=c.L)  # = p.L, on the device
        r = self._draft(c.x, c.v, c.known, c.k, p, jj, tab, drafter, draft)
        r.last = torch.where(c.k + c.L < self.steps, c.L, c.L - 1)  # as the host plan has it
        r.V = torch.zeros_like(r.Y)
        r.V[0] = c.v  # the paid velocity where known; the evaluation overwrites the other rows
        return r

    def _evaluate(self, f, r: _Round, c: "_Chain", p: "_Plan", idx: Tensor) -> None:
        """The round's one target call: y_j for j in [known, last] of each sample (p.rows = idx on the
        device: flat (j, sample) positions), written into r.V."""
        B, n = c.k.shape[0], p.n
        if n:  # none only when every sample takes its last step with a velocity already paid for
            rows = None if f.cond is None else idx % B
            vv = f(r.Y.flatten(0, 1)[idx], r.T.flatten()[idx], rows, step=p.steps)
            r.V.flatten(0, 1).index_copy_(0, idx[:n], vv[:n])
            h = f.features if self.needs_features else None
            if h is not None:
                r.H = h.new_zeros((r.Y.shape[0] * B, *h.shape[1:]))
                r.H.index_copy_(0, idx[:n], h[:n])
                r.H = r.H.view(r.Y.shape[0], B, *h.shape[1:])

    def _settle(self, c: "_Chain", r: _Round, jj, drafter, keys) -> None:
        """Accept, couple, show the drafter the new target evaluations and advance the chain, in place."""
        a = self._verify(r, c.known, c.L, jj)  # leading accepted steps
        x, rej = self._next_state(r, a, c.L, c.k, keys)
        self._observe(drafter, r, a, c.known)
        ex = c.known.long()  # the target's own step is neither proposed nor accepted
        c.counts += torch.stack([(torch.minimum(a + 1, c.L) - ex).sum(), (a - ex).sum()])
        c.x.copy_(x)
        c.v.copy_(r.V[c.L, r.ar])
        c.k += torch.where(rej, a + 1, c.L)  # steps advanced
        torch.logical_and(~rej, c.k < self.steps, out=c.known)  # an all-accepted round evaluated y_L: it seeds the next

    def _draft(self, x, v, ex, k, p, jj, tab, drafter, draft) -> _Round:
        """y_{j+1} = m̂_j + ĉ_j·ε_{k+j} for j < L (per sample); step 0 is the target's own where ``ex``."""
        N, B, Lmax = self.steps, x.shape[0], p.Lmax
        J = k + jj[:Lmax + 1]  # grid index of y_j
        Jc = J[:-1].clamp(max=N - 1)  # grid step j (padding repeats the last step: finite, never used)
        ar = torch.arange(B, device=x.device)  # the round's one sample index (r.ar)
        P = tab["P"][Jc]
        Q = P if tab["Q"] is tab["P"] else torch.cat([torch.where(ex[:, None], P[:1], tab["Q"][Jc[:1]]),
                                                     tab["Q"][Jc[1:]]])  # the target's own step uses p
        if self.verifier == "block":
            eps, log_u = (a[:, 0] for a in round_noise(tab["keys"], k, Lmax, N, x))
            eps_sq = 0.5 * _sqnorm(eps)
        else:
            eps, eps_sq, log_u = tab["eps"][Jc, ar], tab["eps_sq"][Jc, ar], tab["log_u"][Jc, ar]
        r = _Round(Y=x.new_empty((Lmax + 1, *x.shape)), T=tab["t"][J.clamp(max=N)], P=P, Ch=Q[..., 2],
                   eps=eps, eps_sq=eps_sq, log_u=log_u, ar=ar)
        S = tab["t"][Jc]  # each step's start time (= T[:-1] where real; < 1 even in padding)
        a_q, b_q = per_sample(Q[..., 0], x), per_sample(Q[..., 1], x)
        ce = per_sample(Q[..., 2], x) * r.eps  # ĉ_j·ε_{k+j}
        r.Y[0] = x
        if drafter.predicts_x1:
            # v̂ = (x̂1(s) − y)/(1 − s) folded into the step: y_{j+1} = (a − β)·y + β·x̂1 + ĉε, β = b/(1 − s)
            beta = b_q / per_sample(1 - S, x)
            alpha = a_q - beta
            for j in range(Lmax):
                x1 = drafter.predict_x1(S[j], None)  # every row (padding included): no gathers
                if j == 0:  # the target's own x̂1 where its velocity at x_k was paid for
                    x1 = torch.where(per_sample(ex, x), torch.addcmul(x, per_sample(1 - S[0], x), v), x1)
                torch.addcmul(ce[j], alpha[j], r.Y[j], out=r.Y[j + 1])
                r.Y[j + 1].addcmul_(beta[j], x1)
            return r
        for j in range(Lmax):  # a velocity drafter (a network): only the real rows are drafted
            y = r.Y[j]
            v_hat = v.clone() if j == 0 else torch.zeros_like(y)
            pos_h = ((p.L > j) & ~p.known if j == 0 else p.L > j).nonzero().squeeze(1)  # planned on the host
            if pos_h.numel():
                pos = pos_h.to(x.device, non_blocking=True)
                v_hat[pos] = drafter(y[pos], S[j, pos], pos, j, draft, step=p.k[pos_h] + j)
            torch.addcmul(ce[j], a_q[j], y, out=r.Y[j + 1])
            r.Y[j + 1].addcmul_(b_q[j], v_hat)
        return r

    def _verify(self, r: _Round, ex, L, jj) -> Tensor:
        """Leading accepted steps a ∈ [0, L] per sample: u_{k+j} < min(1, p_j(y_{j+1}) / q_j(y_{j+1}))."""
        y, a_p, b_p = r.Y[:-1], per_sample(r.P[..., 0], r.Y[0]), per_sample(r.P[..., 1], r.Y[0])
        r.m = torch.addcmul(a_p * y, b_p, r.V[:-1])  # the target's mean from each y_j
        d = r.Y[1:] - r.m
        if self.draft_eta is None:  # equal covariance: log p − log q = (‖ε‖² − ‖y − m‖²/c²) / 2
            ell = torch.addcmul(r.eps_sq, _sqnorm(d), r.P[..., 3], value=-1)  # both halved in the tables
            ell = ell.nan_to_num(nan=0.0)  # c = 0 (the step to t = 1) with m̂ = m exactly: 0·∞, accept
        else:
            ell = log_acceptance(r.Y[1:], IsoGaussian(r.m, r.P[..., 2]),
                                 IsoGaussian(r.Y[1:] - per_sample(r.Ch, r.Y[0]) * r.eps, r.Ch))
        if self.verifier == "block":  # δ = m̂ − m = (y − m) − c·ε; its length in noise units (inf: c = 0)
            c = r.P[..., 2]
            tau, r.log_p = kept_steps(ell, draft_distance(d - per_sample(c, r.Y[0]) * r.eps, c), r.log_u, L, ex)
            return tau
        ok = r.log_u < ell  # strict: u = 0 never accepts a zero ratio
        ok |= jj[1:r.Y.shape[0]] > L  # padding
        ok[0] |= ex  # the target's own step
        return torch.minimum(ok.long().cumprod(0).sum(0), L)

    def _next_state(self, r: _Round, a, L, k, keys):
        """x_{k+adv}: y_L where all L steps were accepted, else the coupled state at the first rejection."""
        ar = r.ar
        rej = a < L
        x = r.Y[torch.where(rej, a + 1, L), ar]
        j = a.clamp(max=r.m.shape[0] - 1)  # the first rejected step (garbage where nothing was rejected)
        m, c, eps = r.m[j, ar], r.P[j, ar, 2], r.eps[j, ar]
        if self.verifier == "block":  # the residual (p_τ·P_τ − Q_τ)+, drawn in one step with fresh noise
            m_hat = torch.addcmul(r.Y[j + 1, ar], per_sample(c, eps), eps, value=-1)
            e2, w = residual_noise(keys, k, self.steps, x)
            xr = residual_draw(m_hat, m, c, r.log_p[j, ar], e2, w)
            return torch.where(per_sample(rej, x), xr, x), rej
        if self.draft_eta is None:  # reflection maximal coupling, dense (no sync to find the rejected rows)
            m_hat = torch.addcmul(r.Y[j + 1, ar], per_sample(c, eps), eps, value=-1)
            return torch.where(per_sample(rej, x), self._couple(m_hat, m, c, eps), x), rej
        i = rej.nonzero().squeeze(1)  # general maximal coupling: residual (p − q)+ by keyed rejection sampling
        if i.numel():
            ch = r.Ch[j[i], i]
            q = IsoGaussian(r.Y[j[i] + 1, i] - per_sample(ch, eps[i]) * eps[i], ch)
            x[i] = residual_sample(IsoGaussian(m[i], c[i]), q, _keyed_draw(keys[i], k[i] + a[i], x))
        return x, rej

    def _couple(self, m_hat, m, c, eps):
        return reflect(m_hat, m, c, eps)

    def _observe(self, drafter, r: _Round, a, ex) -> None:
        """Feed the drafter the target evaluations at chain states (y_j, ex ≤ j ≤ min(a, last)), in order of
        time: the last ``drafter.memory`` of them per sample, as dense masked updates (no sync). Never a
        discarded draft's, so no proposal sees its own step's noise."""
        if self.needs_features and r.H is None:  # no target call this round: nothing to observe
            return
        lo, hi = ex.long(), torch.minimum(a, r.last)  # each sample's evaluated chain states: lo..hi
        for m in reversed(range(drafter.memory)):
            j = (hi - m).clamp(min=0)
            h = () if r.H is None else (r.H[j, r.ar],)
            drafter.observe(hi - m >= lo, r.Y[j, r.ar], r.T[j, r.ar], r.V[j, r.ar], *h, final=m == 0)


class _Plan:
    """A round planned on the host from each sample's k and known (fetched once): the windows L, the last
    j evaluated, and the flat (j, sample) rows of the one target call (padded to ``bucket``). numpy: this
    runs between the round's sync and its first launch, so the device waits for it."""

    @host_side
    def __init__(self, N: int, k: Tensor, known: Tensor, W, jj: Tensor, bucket: int):
        kn, kw = k.numpy(), known.numpy()
        L = np.minimum(W if isinstance(W, int) else W.numpy(), N - kn)
        self.Lmax = int(L.max())
        last = np.where(kn + L < N, L, L - 1)  # y_L at t = 1 is never evaluated
        J = jj.numpy()[:self.Lmax + 1]
        rows = np.flatnonzero((J >= kw) & (J <= last))
        self.n = rows.size
        if bucket and self.n % bucket:  # repeat a row up to the bucket: few distinct shapes for cuDNN
            rows = np.concatenate([rows, np.full(bucket - self.n % bucket, rows[0])])
        self.rows = torch.from_numpy(rows)
        self.steps = torch.from_numpy((kn + J).reshape(-1)[rows])  # each row's grid step, for error messages
        self.k, self.known, self.L = k, known, torch.from_numpy(L)


@dataclasses.dataclass
class _Chain:
    """Each sample's place in the chain, updated in place round after round (CUDA graphs read these)."""

    x: Tensor      # (B, ...) state x_k
    v: Tensor      # (B, ...) target velocity at (x_k, t_k) where ``known``
    k: Tensor      # (B,) grid index
    known: Tensor  # (B,) bool: v was paid for (the last round accepted all its steps)
    W: Tensor      # (B,) window asked for
    L: Tensor = None    # (B,) window this round: min(W, N − k)
    counts: Tensor = None  # (2,) draft steps proposed and accepted over the run

    def __post_init__(self):
        self.L, self.counts = torch.zeros_like(self.k), self.k.new_zeros(2)


_COMPILED: dict = {}


def _compiled(cls):
    """cls._propose and cls._settle through torch.compile: each a single graph per window length."""
    if cls not in _COMPILED:
        def fused(fn):
            compiled = torch.compile(fn, dynamic=False, fullgraph=True)  # a graph per window length (unrolled)

            def call(*args):
                if fn not in _COMPILE_FAILED:
                    try:
                        with torch._dynamo.config.patch(recompile_limit=64):  # window lengths 1 … 16+ all compiled
                            return compiled(*args)
                    except torch._dynamo.exc.TorchDynamoException as e:  # tracing/compiling: before anything ran
                        _COMPILE_FAILED.add(fn)
                        warnings.warn(f"torch.compile failed on {fn.__qualname__} ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200]}); running it eagerly — same samples, "
                                      f"unfused kernels", RuntimeWarning, stacklevel=2)
                return fn(*args)
            return call
        _COMPILED[cls] = fused(cls._propose), fused(cls._settle)
    return _COMPILED[cls]


_COMPILE_FAILED: set = set()


def _step_table(grid: Tensor, eta: float, like: Tensor) -> Tensor:
    """(N, 4): a, b, c, 1/(2c²) of every grid step's transition (∞ at c = 0), computed once in float64 on the
    host, then moved to ``like``'s device and dtype."""
    a, b, c = transition_coefficients(grid[:-1], grid[1:], eta)
    return torch.stack([a, b, c, torch.where(c > 0, 0.5 / c.square(), torch.inf)], 1).to(like.device, like.dtype)


def _sqnorm(a: Tensor) -> Tensor:
    """‖a‖² over the event dims of (steps, samples, ...) tensors."""
    a = a.flatten(2)
    return torch.linalg.vecdot(a, a)


def _keyed_draw(keys: Tensor, steps: Tensor, like: Tensor):
    """Residual-sampling draws for rows (keys, steps): a pure function of (key, step, attempt)."""
    def draw(rows: Tensor, att: Tensor):
        eps = keyed.normal(keys[rows], steps[rows], 2 * att, tuple(like.shape[1:]), like.dtype)
        w = keyed.uniform(keys[rows], steps[rows], 2 * att + 1, 1, like.dtype)[..., 0]
        return eps, w
    return draw
