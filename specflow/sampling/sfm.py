"""Speculative flow matching (``sfm``, "trust, but verify") and its lossy sibling ``rca``.

Both are deterministic ODE samplers on the grid t_0 < … < t_N. Each sample is at its own grid index k
(ragged) and holds x_k and the target's velocity v_k there (already paid for). One round, for every active
sample at once:

  leap    y_0 = x_k,  y_{j+1} = y_j + h_{k+j}·v̂_j  (j < L),   v̂_0 = v_k (real),  v̂_j = drafter(y_j, t_{k+j})
          x̃ = y_L at s = t_{k+L};   the target is called ONCE, batched over all active samples: v = v(x̃, s).

``sfm`` verifies the leap (leap lengths L ≥ 2; L = 1 is an exact Euler step and needs no check):

  δ = ‖x̂1_draft − x̂1_target‖ / ‖x̂1_target‖,   x̂1_target = x̃ + (1 − s)·v,  x̂1_draft = x̃ + (1 − s)·v̂(x̃, s),

  norms over all of a sample's coordinates, v̂(x̃, s) the drafter's velocity at the leap's end (what the
  draft predicts there: for the extrapolate drafter, its extrapolated x̂1(s) itself). δ measures how well
  the drafter's model of the flow still matches the target one step beyond the last drafted velocity.
  - δ ≤ tol: accept. x_{k+L} = x̃ and v_{k+L} = v (the check's evaluation is the next step's velocity).
  - δ > tol: reject. The leap is discarded and the sample retries from x_k with L = 1, i.e. one ordinary
    Euler step x_{k+1} = x_k + h_k·v_k whose endpoint the next round evaluates. A rejection therefore
    costs one wasted target row (the check) plus one call for one step.
  The last step to t = 1 is taken with v_{N−1} and never evaluated at t = 1 (so leaps end at s ≤ t_{N−1}:
  at s = 1 both x̂1 equal x̃ and the check would be vacuous).

Guarantee. Every step the output takes is either an exact Euler step with the target's velocity or an
accepted leap. With tol → 0 no leap is accepted and the output is euler-N exactly (bit for bit in float64).
An accepted leap can leave an error: the drafter's Euler steps deviate from the target's; the check bounds
the draft/target disagreement *at its end point only* (δ ≤ tol on x̂1 there), not the path's deviation
along the leap, and accepted errors propagate through the ODE like any other local error — tol is a
per-leap check, not a global bound. A rejected leap leaves nothing behind: its state is discarded.

``rca`` (residual correction and acceptance) takes the same leap and always accepts it after a trapezoid
correction with the endpoint velocity; it is LOSSY BY DESIGN (no fallback, no check):

  x_{k+L} = x_k + (t_{k+L} − t_k)·(v_k + v(x̃, t_{k+L}))/2,    v_{k+L} := v(x̃, t_{k+L})  (reused, not re-evaluated)

With leap = 1 this is the one-call-per-step predictor–corrector "Heun with the predictor's velocity
reused": second order, N + 1 calls (Heun pays 2N); with N = 1 it is Heun's step exactly. Its
``leap="bandit"`` learns L per time bucket from the size of the correction it applies (see ``RCA``).

Check (``check="x1" | "local"``): ``x1`` is the seed's δ above. ``local`` accepts a leap when its embedded
local error estimate is within tol instead,

  e = ‖x̃ − x_trap‖ / ‖x̂1_target‖ ≤ tol,   x_trap = x_k + (s − t_k)·(v_k + v(x̃, s))/2,

the leap against the trapezoid with its own end velocity (as in embedded Runge–Kutta pairs: both velocities are
paid for, and no draft is evaluated at the leap's end). δ asks whether the drafter still agrees with the target
one step past the leap; e estimates the error the leap leaves behind, which is what the output pays for. Its
tol is on another scale (toy64 and fashion: 3e-4 … 3e-2; δ's: 0.01 … 0.2). Neither front dominates the other
(benchmarks/RESULTS.md); ``x1`` stays the default as the seed's definition.

Base (``base="euler" | "ab2"``): the step every leap, fallback and last step is made of. With ``ab2`` each is a
variable-step Adams–Bashforth 2 step with the velocity of this step and the one the sample used at its step
before (real or drafted; r = h_i/h_{i−1}; a sample's first step is Euler): with no leap accepted the output is
``ab2``-N exactly, and an accepted leap carries second-order error. The checks are unchanged. ``rca`` keeps its
own trapezoid (no base option).

Bandit (``leap="bandit"``): L is chosen per sample among ``arms`` with context = time bucket of t_k; the
bandit learns each arm's rate of steps advanced per unit of cost, Σ steps / Σ cost over its decisions (not the
mean of per-decision ratios, which overvalues a leap that is often rejected: bandit.py), cost = the target calls
a decision caused + μ·(the local error it left):

  accepted:  L steps for 1 + μ·e,   e the leap's embedded local error estimate (``check="local"`` above)
  rejected:  1 step for 2 + μ·e_1   (two calls; the discarded leap leaves no error, the retry's base step leaves
             its own e_1, so the rejection is credited a round late, when e_1 is known)

Why error is priced: the x̂1 check bounds the draft/target disagreement at the leap's end, not the path's
deviation along it, and at a fixed tol an accepted long leap leaves more error per step (fashion, N = 50, tol
.05: a leap's true local error per step 2.7e-4 at L = 2, 4.8e-4 at L = 4, 1.1e-3 at L = 8; e tracks it with
log-correlation 0.94–0.97, δ with 0.58–0.73), so a reward of calls alone drifts to long leaps and their error.
μ (calls per unit of e) is calibrated on the first batch the bandit sees, like fastflow's: that batch takes
base steps only (L = 1: ``base``-N exactly) and sets μ = mu_scale / (N·median(e of its steps)), N·median(e)
standing for the error base-N leaves. Summed over a run, the cost is then calls + mu_scale·(Σe / base-N's Σe):
as much error again as base-N leaves is worth mu_scale calls (default 3: the best of 1, 3, 10 measured,
benchmarks/RESULTS.md). μ belongs to the grid it was calibrated on (it divides by N). ``mu=0`` prices calls
only (the objective before; ``mu`` given: no calibration). Leaps end at t_{N−1} at the latest: near there a
longer arm, once tried, is played cut (uncredited), as a fixed leap is (bandit.py ``select``).

With ``check="local"`` μ is not calibrated but follows from tol, which is then on the same scale: a leap is worth
its error while μ·e stays below about 1/2 (L/(1 + μ·e) stops growing with L where the leap's error, ∝ L³, reaches
1/(2μ)), so μ = LOCAL_MU_TOL/tol = 4/tol aims the leaps at tol/8 and the check rejects the ones that miss by 8×.
One knob then sets both, and unlike a calibrated μ (∝ N², through base-N's error) it means the same on every
grid. With tol = ∞ (no check) give μ itself. Pooled over N = 25…200 on toy64 (``deterministic.py --front``,
benchmarks/RESULTS.md), this priced bandit — local check or none — is as cheap as the best fixed leap at equal
error or cheaper at 16 of its 17 Pareto points with Thompson sampling (median 0.90×; 12 of 12 with other noise),
the x̂1-checked one at 2 of 11; on Fashion-MNIST 7 of 19 at guidance 1 (median 1.03×: a tie, the same with other
noise), 9 of 13 at 3 (0.85×). The tie's cause there (benchmarks/leap_sensitivity.py): per sample Σe predicts the
output's error weakly, it is nearly flat between schedules whose errors differ 1.7×, and a decision is charged its
own e only, not the e it causes in the leaps after it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

from specflow.path import per_sample, x1_hat
from specflow.sampling.bandit import (POLICIES, Bandit, check_arms, check_rate_state, check_scale, finite_nonneg,
                                      time_bucket)
from specflow.sampling.base import Sampler, register
from specflow.sampling.drafters import DRAFTERS, make_drafter
from specflow.sampling.graphs import for_tensor as graphs_for
from specflow.sampling.opcount import host_side
from specflow.sampling.solvers import ab2_weights, check_base


CHECKS = ("x1", "local")
# With the local check, tol and the bandit's price of error are on one scale: the bandit settles where a leap's
# error is about 1/(2μ), so μ = LOCAL_MU_TOL/tol aims its leaps at tol/8 and the check rejects those that miss by
# 8× (toy64, pooled over N: tol = 2/μ … 8/μ measured alike, benchmarks/RESULTS.md)
LOCAL_MU_TOL = 4.0


def _calibrated_mu(errors, mu_scale: float, N: int) -> float:
    """μ = mu_scale/(N·median e) over the calibration's finite errors (an overflowing low-precision step must
    not decide the price); 0 (calls only) when no error is positive."""
    e = np.asarray(errors, dtype=np.float64)
    e = e[np.isfinite(e)]
    med = float(np.median(e)) if e.size else 0.0
    return mu_scale / (N * med) if med > 0 else 0.0


def _norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1)


def _relative(diff: Tensor, ref: Tensor) -> Tensor:
    """‖diff‖/‖ref‖ per sample (a zero ref gives a large finite value, never inf/NaN: it feeds a reward)."""
    return _norm(diff) / _norm(ref).clamp_min(torch.finfo(ref.dtype).eps)


def _leap_error(y: Tensor, x_trap: Tensor, s: Tensor, v_s: Tensor) -> Tensor:
    """The leap's embedded local error estimate e = ‖x̃ − x_trap‖/‖x̂1_target(x̃, s)‖ per sample (module docstring):
    sfm's local check and priced reward, and the size of rca's correction."""
    return _relative(y - x_trap, x1_hat(y, s, v_s))


def _euler(y, v, k, h, d=None, m=None, d_out=None, pos=None):
    return y + per_sample(h[k], y) * v


def _ab2(y, v, k, h, d, m, d_out=None, pos=None):
    """One variable-step AB2 step per row from grid index k with velocity v and the row's previous one d
    (Euler at k = 0); then d ← v where m (the rows that took the step; ``d_out``[pos] when d is a gathered copy)."""
    w, w_prev = ab2_weights(h[k], h[(k - 1).clamp(min=0)])
    first = k == 0  # Euler
    w, w_prev = torch.where(first, 1.0, w), torch.where(first, 0.0, w_prev)
    out = y + per_sample(h[k], y) * (per_sample(w, y) * v + per_sample(w_prev, y) * d)
    if d_out is None:
        d.copy_(torch.where(per_sample(m, d), v, d))
    else:
        d_out[pos] = torch.where(per_sample(m, d), v, d)
    return out


@register
@dataclasses.dataclass
class SFM(Sampler):
    """Speculative flow matching: leap with a drafter, verify with one target call, fall back to Euler.

    Options: ``drafter`` (see drafters.py), ``leap`` (int ≥ 1 or "bandit"), ``arms`` (leap lengths for the bandit),
    ``tol`` (the check's relative tolerance, > 0), ``check`` ("x1" | "local"), ``policy`` ("thompson" | "ucb1"),
    ``buckets`` (time buckets = bandit contexts), ``seed`` (bandit seed), ``mu`` / ``mu_scale`` (the bandit's price
    of error; None: 4/tol with the local check, else calibrated on the first batch at scale mu_scale),
    ``cuda_graphs`` (on CUDA, replay the round's two fixed-shape pieces as CUDA graphs, see graphs.py; drafters
    without a network). See the module docstring.
    """

    name = "sfm"
    defers_checks = True  # each call's NaN check rides on the next round's fetch
    drafter: str = "extrapolate"
    leap: int | str = 4
    arms: tuple = (1, 2, 4, 8)
    tol: float = 0.05
    policy: str = "thompson"  # per-row draws: UCB1 moves a batch in lockstep, so one exploration hits every sample
    buckets: int = 4
    seed: int = 0
    cuda_graphs: bool = True
    base: str = "euler"
    mu: float | None = None
    mu_scale: float = 3.0
    check: str = "x1"

    def __post_init__(self):
        super().__post_init__()
        check_base(self.base)
        if self.mu is not None and not finite_nonneg(self.mu):
            raise ValueError(f"mu (calls per unit of a leap's relative local error) must be a finite number >= 0, "
                             f"or None (4/tol with check='local', else calibrated on the first batch); got {self.mu!r}")
        check_scale(self.mu_scale)
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}; valid: {', '.join(CHECKS)}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.drafter!r}; valid: {', '.join(sorted(DRAFTERS))}")
        if self.leap != "bandit" and (not isinstance(self.leap, int) or isinstance(self.leap, bool)
                                      or self.leap < 1):
            raise ValueError(f"leap must be an integer >= 1 or 'bandit', got {self.leap!r}")
        if isinstance(self.tol, bool) or not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise ValueError(f"tol must be a relative tolerance > 0 (e.g. 0.05), got {self.tol!r}")
        self.mu_ = None if self.mu is None else float(self.mu)
        if self.mu is None and self.check == "local" and math.isfinite(self.tol):  # tol and μ on one scale
            self.mu_ = LOCAL_MU_TOL / self.tol
            if not math.isfinite(self.mu_):
                raise ValueError(f"tol={self.tol!r} is too small to price error at {LOCAL_MU_TOL:g}/tol; "
                                 "give tol >= 1e-300")
            if self.mu_scale != type(self).mu_scale:
                raise ValueError(f"mu_scale has no effect with check='local': the bandit's price follows from tol "
                                 f"(μ = {LOCAL_MU_TOL:g}/tol); give mu itself to set it, or leave mu_scale out")
        self._mu_fixed = self.mu_ is not None  # given or derived from tol: a loaded state must match it
        self.arms = check_arms(self.arms)
        if self.arms[0] < 1:
            raise ValueError(f"leap arms must be positive step counts, got {self.arms}; e.g. arms=(1, 2, 4, 8)")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown bandit policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        self.bandit = (Bandit(self.arms, contexts=self.buckets, policy=self.policy, seed=self.seed)
                       if self.leap == "bandit" else None)

    @property
    def needs_draft(self) -> bool:  # the trained drafters take their network from sample(draft=...)
        return DRAFTERS[self.drafter].needs_network

    @property
    def needs_features(self) -> bool:  # medusa: the target call also returns its trunk features
        return DRAFTERS[self.drafter].needs_features

    @property
    def _prices_error(self) -> bool:
        """The bandit's reward reads each leap's error estimate (μ ≠ 0, or None: still to be calibrated)."""
        return self.bandit is not None and self.mu_ != 0

    @host_side
    def _plan(self, k: Tensor, retry: Tensor, err: Tensor | None, grid: Tensor, arms: Tensor, played, calibration):
        """On the host (numpy: the device waits for this), from each sample's k, retry flag and last round's local
        error estimate (fetched once per round; None when no reward reads it): credit the bandit decisions
        settled last round (``played``: the rows, contexts, leaps and a held flag of decisions awaiting credit)
        or, while calibrating μ (``calibration``: the errors so far and last round's rows), collect the errors of
        last round's base steps; then choose this round's leaps L (a rejected leap retries with L = 1); returns
        (L, live rows, the longest live leap, played)."""
        N, k, retry = self.steps, k.numpy(), retry.numpy()
        priced = err is not None and not calibration
        held, err = None, (err.numpy().astype(np.float64) if err is not None else None)
        if calibration and calibration["rows"] is not None:  # last round's steps were all L = 1, all accepted
            calibration["errors"].extend(err[calibration["rows"]].tolist())
        elif played is not None:  # reward: steps advanced per unit of cost, cost = calls + μ·error
            rows, ctx, L, was_held = played
            rejected = retry[rows] & ~was_held
            # accepted: L steps for 1 + μ·e; a rejection is credited a round late, once its retry step's error
            # e is known: 1 step for 2 + μ·e (two calls)
            price = self.mu_ * err[rows] if priced else np.zeros(rows.size)
            steps, cost = np.where(was_held, 1, L), np.where(was_held, 2 + price, 1 + price)
            done = ~rejected
            self.bandit.update(ctx[done], L[done], steps[done], cost=cost[done])  # the rate Σ steps / Σ cost
            held = rows[rejected], ctx[rejected], L[rejected], np.ones(int(rejected.sum()), bool)
        played = None
        rows = np.flatnonzero(k < N)
        if rows.size == 0:  # all done: no choice to make (a Thompson choice would draw)
            return torch.from_numpy(k), torch.from_numpy(rows), 0, None
        cap = np.maximum(N - 1 - k, 1)  # leaps end at t_{N−1} at the latest
        if calibration:  # base steps only
            L = np.ones_like(k)
            calibration["rows"] = rows
        elif self.bandit is None:
            L = np.minimum(cap, self.leap)
        else:
            ctx = time_bucket(grid[k], self.buckets).numpy()
            chosen = self.bandit.select(ctx, limit=cap).numpy()
            L = np.minimum(chosen, cap)
            mine = rows[((chosen <= cap) & ~retry)[rows]]  # the bandit's own decisions (not retries, not capped)
            played = mine, ctx[mine], L[mine], np.zeros(mine.size, bool)
            if held is not None:
                played = tuple(np.concatenate(p) for p in zip(played, held))
        L = np.where(retry, 1, L)
        arms += torch.from_numpy(np.bincount(L[rows], minlength=arms.numel()))
        return torch.from_numpy(L), torch.from_numpy(rows), int(L[rows].max()), played

    @staticmethod
    def _leap(drafter, net, x: Tensor, v: Tensor, k: Tensor, L: Tensor, t: Tensor, h: Tensor, L_host: Tensor,
              Lmax: int, d: Tensor | None = None):
        """y_L from y_0 = x with v̂_0 = v (real) and drafter velocities after, for every row of x (sample b
        is row b); a row with a shorter leap keeps its end point. ``t``, ``h``: grid times and step sizes in
        x's dtype; ``L_host``: L on the host, Lmax its largest live value. Cheap drafters draft every row (no
        gathers, no syncs); networks only the leaping rows. ``d``: None for Euler steps; for AB2 steps, each
        row's velocity of its step before (written in place: on return, the velocity of the leap's last step)."""
        N = h.shape[0]
        step = _euler if d is None else _ab2
        y = step(x, v, k.clamp(max=N - 1), h, d, L > 0)  # j = 0: an exact base step
        for j in range(1, Lmax):
            kj, m = (k + j).clamp(max=N - 1), L > j
            if drafter.needs_network:
                pos = (L_host > j).nonzero().squeeze(1).to(x.device, non_blocking=True)
                if pos.numel():
                    vj = drafter(y[pos], t[kj[pos]], pos, j, net, step=kj[pos])
                    y[pos] = step(y[pos], vj, kj[pos], h, None if d is None else d[pos], m[pos], d, pos)
            else:
                y = torch.where(per_sample(m, x), step(y, drafter(y, t[kj], None, j, net), kj, h, d, m), y)
        return y

    # The round is written for GPU latency, like speculative's: every sample stays in the batch, the host
    # syncs once per round (fetch of k and the retry flags, then _plan on the host), and around the one
    # target call the round is two fixed-shape pieces that update the chain in place — ``_leap`` (draft) and
    # ``_settle`` (check, commit, observe, last step) — captured as CUDA graphs per leap length on CUDA.
    def _run(self, f, x, grid, draft, generator, stats):
        N, B, dev = self.steps, x.shape[0], x.device
        t, h = grid.to(dev, x.dtype), grid.diff().to(dev, x.dtype)
        drafter = make_drafter(self.drafter)
        drafter.reset(x)
        v = f(x, t[0], step=0)  # v_0: the one call every sampler pays
        drafter.observe(torch.arange(B, device=dev), x, t[0].expand(B), v, f.features)
        z = torch.zeros(B, dtype=torch.long, device=dev)
        # the chain owns its tensors (v is written in place later; a model may keep its output buffer)
        c = _Chain(x=x.clone(), v=v.clone(), k=z.clone(), retry=z.bool(), L=z.clone(), v_s=torch.zeros_like(x),
                   err=x.new_zeros(B, dtype=torch.float32),  # float32: host-readable for any x dtype
                   counts=z.new_zeros(2),  # counts: proposed, accepted leaps
                   d=torch.zeros_like(x) if self.base == "ab2" else None,
                   d_leap=torch.zeros_like(x) if self.base == "ab2" else None)
        self._last_step(c, h)
        graphs = graphs_for(x, self.cuda_graphs and not drafter.needs_network)
        arms = torch.zeros(max(self.arms if self.bandit is not None else (self.leap,)) + 1, dtype=torch.long)
        played = None
        calibration = {"errors": [], "rows": None} if self.bandit is not None and self.mu_ is None else None
        priced = self._prices_error  # fixed for the run: μ changes only after it
        while True:
            k_h, retry_h, counts, *err_h = f.fetch(c.k, c.retry, c.counts, *((c.err,) if priced else ()))  # the
            L_h, rows_h, Lmax, played = self._plan(k_h, retry_h, err_h[0] if priced else None, grid, arms, played,
                                                   calibration)  # round's one host sync, then the host's plan
            if Lmax == 0:  # every sample is at t = 1
                break
            c.L.copy_(L_h, non_blocking=True)  # pageable → device: staged at once, no wait on the device
            rows = rows_h.to(dev, non_blocking=True)
            y, s = graphs(("leap", Lmax), lambda: (self._leap(drafter, draft, c.x, c.v, c.k, c.L, t, h, L_h, Lmax,
                                                              c.leap_history()),
                                                   t[(c.k + c.L).clamp(max=N)]), group=Lmax)
            v_s = f(y[rows], s[rows], rows=rows, step=(k_h + L_h)[rows_h])  # the one target call; step: of s
            c.v_s.index_copy_(0, rows, v_s)  # dense again (other rows: stale, never used)
            h_s = None if f.features is None else f.features.new_zeros((B, *f.features.shape[1:])).index_copy_(
                0, rows, f.features)  # the trunk features, for drafters that read them
            graphs(("settle", Lmax), lambda: self._settle(c, drafter, draft, y, s, rows, h_s, t, h, Lmax),
                   group=Lmax)
            stats.rounds += 1
        if calibration:  # μ: as much error again as base-N leaves (N median base steps) is worth mu_scale calls
            self.mu_ = _calibrated_mu(calibration["errors"], self.mu_scale, N)
        stats.proposed, stats.accepted = counts.tolist()
        for a, n in enumerate(arms.tolist()):
            if n:
                stats.arm_counts[a] = stats.arm_counts.get(a, 0) + n
        return c.x

    def _settle(self, c: "_Chain", drafter, draft, y, s, rows, h_s, t, h, Lmax) -> None:
        """Check every leap, commit the accepted ones, show the drafter the target at x̃, take last steps —
        dense over the batch (finished samples masked), in place. Network drafters check the leaping rows only."""
        live = c.k < self.steps
        # The local check and the priced reward read the leap's embedded error estimate; it costs no call (both
        # velocities are paid for). Graphs are built per run, and mu_ changes only between runs.
        if self.check == "local" or self._prices_error:
            trap = c.x + per_sample(s.to(y.dtype) - t[c.k], c.x) * (c.v + c.v_s) / 2
            c.err.copy_(_leap_error(y, trap, s.to(y.dtype), c.v_s))
        if self.check == "local":  # no draft at the leap's end needed
            ok = ((c.L == 1) | (c.err <= self.tol)) & live
        elif drafter.needs_network:  # eager: its rows are this round's
            ok = torch.zeros_like(live).index_copy_(
                0, rows, self._accept(drafter, draft, y[rows], s[rows], c.v_s[rows], rows, c.L[rows], Lmax,
                                      step=(c.k + c.L)[rows]))  # the leap end's grid step, for errors
        else:
            ok = self._accept(drafter, draft, y, s, c.v_s, None, c.L, Lmax) & live
        leaps = (c.L > 1) & live
        c.counts += torch.stack([leaps.sum(), (ok & leaps).sum()])
        x_new, v_new = self._commit(c.x, c.v, y, c.v_s, t[c.k], s)
        c.x.copy_(torch.where(per_sample(ok, c.x), x_new, c.x))
        c.v.copy_(torch.where(per_sample(ok, c.x), v_new, c.v))
        if c.d is not None:  # AB2: an accepted leap's last velocity; a rejected one leaves nothing behind
            c.d.copy_(torch.where(per_sample(ok, c.x), c.d_leap, c.d))
        torch.where(ok, c.k + c.L, c.k, out=c.k)
        drafter.observe(ok, y, s, c.v_s, *(() if h_s is None else (h_s,)))  # the target at x̃ (accepted)
        torch.logical_and(~ok, live, out=c.retry)
        self._last_step(c, h)

    def _last_step(self, c: "_Chain", h: Tensor) -> None:
        """The final step to t = 1: the base step with the paid v_{N−1}, never an evaluation at t = 1."""
        N = self.steps
        last = c.k == N - 1
        k = torch.full_like(c.k, N - 1)
        x_N = _euler(c.x, c.v, k, h) if c.d is None else _ab2(c.x, c.v, k, h, c.d, last)  # d: done rows only
        c.x.copy_(torch.where(per_sample(last, c.x), x_N, c.x))
        c.k.masked_fill_(last, N)

    def _accept(self, drafter, net, y, s, v_s, rows, L, j, step=None) -> Tensor:
        """δ ≤ tol per row; L = 1 rows are exact Euler steps and always accepted."""
        s = s.to(y.dtype)
        x1_t = x1_hat(y, s, v_s)
        delta = _relative(x1_hat(y, s, drafter(y, s, rows, j, net, step=step)) - x1_t, x1_t)
        return (L == 1) | (delta <= self.tol)

    def _commit(self, x, v, y, v_s, t, s):
        """State and velocity an accepted leap leaves: sfm keeps (x̃, v(x̃, s))."""
        return y, v_s

    def state_dict(self) -> dict:
        return ({"sampler": self.name, "bandit": self.bandit.state_dict(), "base": self.base, "mu": self.mu_,
                 "check": self.check, "steps": self.steps}
                if self.bandit is not None else {})

    def load_state_dict(self, state: dict) -> None:
        if self.bandit is None:
            return super().load_state_dict(state)
        if "bandit" not in state:
            raise ValueError(f"expected a state with a 'bandit' entry for {self.name!r}, got keys {sorted(state)}")
        # rewards earned by the other leap sampler (sfm: per sample, with rejections; rca: per batch round), by
        # another integrator's leaps, another check's acceptances or on another grid (μ divides by N) mean
        # something else here
        if state.get("sampler", "sfm") != self.name:
            raise ValueError(f"this bandit state was learnt by {state.get('sampler', 'sfm')!r}, not {self.name!r}: "
                             f"their rewards differ; start without the state")
        for key, default in (("base", "euler"), ("check", "x1"), ("steps", self.steps)):
            if state.get(key, default) != getattr(self, key):
                raise ValueError(f"{self.name} state was learnt with {key}={state.get(key, default)!r} but this "
                                 f"sampler has {key}={getattr(self, key)!r}; build it with the same {key}, or start "
                                 f"without the state")
        if "mu" not in state:  # learnt before errors were priced: its rewards are calls only
            raise ValueError(f"this {self.name} bandit state was learnt with rewards of calls only (before its "
                             "objective priced the leaps' error); start without the state, or relearn it")
        mu = state["mu"]
        if mu is not None and not finite_nonneg(mu):
            raise ValueError(f"{self.name} state has mu={mu!r}; expected None or a finite number >= 0")
        if self._mu_fixed and mu != self.mu_:
            learnt = "not learnt yet (saved before its first batch)" if mu is None else f"learnt with mu={mu!r}"
            given = (f"mu={self.mu!r}" if self.mu is not None else
                     f"mu={self.mu_:g} (= {LOCAL_MU_TOL:g}/tol with the local check)")
            raise ValueError(f"{self.name} state was {learnt} but this sampler has {given}: rewards priced at another "
                             f"rate; build it with the same mu (or tol), or start without the state")
        check_rate_state(state["bandit"], self.name)
        self.bandit.load_state_dict(state["bandit"])
        self.mu_ = None if mu is None else float(mu)


@dataclasses.dataclass
class _Chain:
    """Each sample's place in the ODE, updated in place round after round (CUDA graphs read these)."""

    x: Tensor       # (B, ...) state x_k
    v: Tensor       # (B, ...) the target's velocity at (x_k, t_k), paid for
    k: Tensor       # (B,) grid index (N: done)
    retry: Tensor   # (B,) bool: the last leap was rejected, so this round steps L = 1
    L: Tensor       # (B,) this round's leap lengths (planned on the host)
    v_s: Tensor     # (B, ...) the target at this round's leap ends (rows of the call; others stale)
    err: Tensor     # (B,) float32: this round's leaps' embedded local error estimates (local check, priced bandit)
    counts: Tensor  # (2,) proposed and accepted leaps (L > 1) over the run
    d: Tensor | None = None       # base="ab2": the velocity each sample used at its step before x_k
    d_leap: Tensor | None = None  # its copy that this round's leap advances (kept only if the leap is)

    def leap_history(self) -> Tensor | None:
        """d for the leap to advance: a copy, so that a rejected leap leaves d as it was."""
        return None if self.d is None else self.d_leap.copy_(self.d)


@register
@dataclasses.dataclass
class RCA(SFM):
    """Residual correction and acceptance — LOSSY BY DESIGN: every leap is accepted after the trapezoid
    correction x_{k+L} = x_k + (t_{k+L} − t_k)·(v_k + v(x̃, t_{k+L}))/2, and v(x̃, t_{k+L}) is reused as
    v_{k+L} without re-evaluating at the corrected state. One target call per L steps, no error control.
    Leaps may end at t = 1 (the trapezoid needs v there, as Heun does).

    ``leap="bandit"``: one L per round for the whole batch (all samples move together, so a per-sample choice
    would save no call), chosen among ``arms`` per time bucket. The correction itself is the error signal:
    e = ‖x̃ − x_{k+L}‖/‖x̂1(x̃)‖ is sfm's embedded estimate, here the size of the correction rca applies, and
    the round earns L steps for a cost of 1 + μ·mean e — sfm's rate of steps per (call + μ·error), without
    rejections. μ is calibrated as sfm's on a first batch of L = 1 rounds (the one-call predictor–corrector),
    from the median of their batch-mean e; a bandit round costs one host sync (a fixed leap: none). Its default
    mu_scale is 10 (measured on toy64, benchmarks/RESULTS.md); Thompson sampling, as sfm's, matters more here: a
    batch makes only N/L decisions, too few for UCB1's exploration to settle.
    """

    name = "rca"
    leap: int | str = 4
    mu_scale: float = 10.0

    @classmethod
    def option_names(cls) -> list[str]:  # sfm's check and graph options mean nothing here
        return ["steps", "schedule", "grid", "drafter", "leap", "arms", "policy", "buckets", "seed", "mu",
                "mu_scale"]

    @host_side
    def _choose(self, t: float, room: int) -> tuple[Tensor, int, bool]:
        """The bandit's context at time t, its leap (at most ``room``) and whether that is its own choice."""
        ctx = time_bucket(torch.tensor([t], dtype=torch.float64), self.buckets)
        chosen = int(self.bandit.select(ctx, limit=torch.tensor([room]))[0])
        return ctx, min(chosen, room), chosen <= room

    def _run(self, f, x, grid, draft, generator, stats):
        N, B = self.steps, x.shape[0]
        drafter = make_drafter(self.drafter)
        drafter.reset(x)
        rows = torch.arange(B, device=x.device)
        t, h, g = grid.to(x.device, x.dtype), grid.diff().to(x.device, x.dtype), grid.tolist()
        v = f(x, t[0], step=0)
        drafter.observe(rows, x, t[0].expand(B), v, f.features)
        calibration = [] if self.bandit is not None and self.mu_ is None else None
        k = 0
        while k < N:  # all samples move together: no check, so nothing makes them ragged
            mine = False
            if self.bandit is None:
                L = min(self.leap, N - k)
            elif calibration is not None:
                L = 1
            else:
                ctx, L, mine = self._choose(g[k], N - k)
            dt = g[k + L] - g[k]
            x_next = x.add(v, alpha=dt / 2)  # the trapezoid's first half: v is read before any further call
            y = self._leap(drafter, draft, x, v, torch.full((B,), k, device=x.device),
                           torch.full((B,), L, device=x.device), t, h, torch.full((B,), L), L)
            v_s = f(y, t[k + L], step=k + L)  # target at the leap's end (step: the grid index of its time)
            x = x_next.add_(v_s, alpha=dt / 2)  # trapezoid correction, second half
            if mine and self.mu_ == 0:  # calls only: nothing to read from the device
                self._credit(ctx, L, 0.0)
            elif mine or calibration is not None:
                e = float(f.fetch(_leap_error(y, x, t[k + L], v_s).float().mean())[0])
                if calibration is not None:
                    calibration.append(e)
                else:
                    self._credit(ctx, L, e)
            v = v_s  # reused at the corrected state: the lossy part
            drafter.observe(rows, y, t[k + L].expand(B), v_s, f.features)
            stats.rounds += 1
            stats.arm_counts[L] = stats.arm_counts.get(L, 0) + 1
            k += L
        if calibration:
            self.mu_ = _calibrated_mu(calibration, self.mu_scale, N)
        return x

    @host_side
    def _credit(self, ctx: Tensor, L: int, e: float) -> None:
        self.bandit.update(ctx, torch.tensor([L]), torch.tensor([float(L)]), cost=torch.tensor([1 + self.mu_ * e]))
