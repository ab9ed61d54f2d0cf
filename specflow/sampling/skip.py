"""FastFlow (seed 002): skip target calls by extrapolating the velocity, with a bandit choosing how many.

At each real target call at grid index k (the previous real one at p < k):

    v_k = v(x_k, t_k);   x_{k+1} = x_k + h_k·v_k                                        (Euler step)
    choose S ∈ arms (bandit, context = time bucket of t_k);  for the skipped steps i = k+1 … k+S:
        v̂_i = v_k + (t_i − t_k)·(v_k − v_p)/(t_k − t_p),   x_{i+1} = x_i + h_i·v̂_i        (zero cost)
    the next real call at k' = k + S + 1 measures e = MSE(v̂_{k'}, v_{k'}) — the extrapolation error one step
    past the last skipped step, mean over all elements of the batch — and the decision (bucket, S) is
    credited with the reward  r = μ·S − e  (r = 0 for S = 0: nothing was approximated).

Decisions are per batch: a skip only saves time when no sample needs the call, so all samples skip
together (per-sample skipping would cut total_nfe but not the batched calls, i.e. not the latency).
The first two steps and the last step are always real (an extrapolation needs two real velocities, and
every decision must be followed by the real call that measures it), so an arm S is eligible at k only if
k + S + 1 ≤ N − 1; arms that never fit (S ≥ N) are a ValueError.

``base="ab2"`` makes every step, real or skipped, a variable-step Adams–Bashforth 2 step with the velocity of
this step and the one of the step before (x_{i+1} = x_i + h_i·((1 + r/2)·v_i − (r/2)·v_{i−1}), r = h_i/h_{i−1};
the first step is Euler): with no skips it is ``ab2`` exactly, and over skipped steps, whose velocity is
linear in t, it integrates the extrapolation exactly, so an accepted trajectory carries second-order error.
``base="euler"`` is the seed's definition above.

μ (the value of one saved call, in MSE units) is calibrated on the first batch the sampler sees: that batch
runs plain Euler (S = 0 throughout, crediting arm 0 where present), records the free one-step-ahead error
e_k = MSE(v̂_k, v_k) at every call with two predecessors, and sets μ = mu_scale·median_k(e_k). With
mu_scale = 1, skipping one step where the extrapolation is typical pays exactly what it costs; cheaper
regions (smooth velocity) earn positive rewards, hard ones negative. The bandit then learns online across
batches; μ and the bandit are the sampler's ``state_dict()``. Pass ``mu`` to skip calibration.
"""
from __future__ import annotations

import dataclasses
import torch

from specflow.sampling.bandit import POLICIES, Bandit, check_arms, check_scale, finite_nonneg, time_bucket
from specflow.sampling.base import Sampler, register
from specflow.sampling.solvers import base_step, check_base
from specflow.sampling.opcount import host_side


@register
@dataclasses.dataclass
class FastFlow(Sampler):
    """Finite-difference velocity skipping with a UCB1 bandit per time bucket (see module docstring)."""

    name = "fastflow"
    defers_checks = True  # each call's NaN check rides on the next error fetch
    arms: tuple = (0, 1, 2, 4, 6)
    buckets: int = 4
    policy: str = "ucb1"
    mu: float | None = None
    mu_scale: float = 1.0
    seed: int = 0
    base: str = "euler"

    def __post_init__(self):
        super().__post_init__()
        check_base(self.base)
        self.arms = check_arms(self.arms)
        if self.arms[-1] > max(self.steps - 3, 0):
            raise ValueError(f"skip arm {self.arms[-1]} is longer than a grid of {self.steps} steps allows "
                             f"(two real calls start the run and one ends it): use arms <= "
                             f"{max(self.steps - 3, 0)}, e.g. arms={tuple(a for a in self.arms if a <= max(self.steps - 3, 0)) or (0,)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown bandit policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        if self.mu is not None and not finite_nonneg(self.mu):
            raise ValueError(f"mu must be a finite number >= 0 (or None to calibrate on the first batch), "
                             f"got {self.mu!r}")
        check_scale(self.mu_scale)
        self.bandit = Bandit(self.arms, self.buckets, self.policy, self.seed, allow_zero=True)
        self.mu_ = None if self.mu is None else float(self.mu)

    def _run(self, f, x, grid, draft, generator, stats):
        N, calibrating, errors = self.steps, self.mu_ is None, []
        g, t = grid.tolist(), grid.to(x.device, x.dtype)  # host times for the coefficients, device ones for the model
        v_last = p = slope = pending = None  # p: the previous real call; pending: (context, S) the next measures
        step = base_step(self.base, g)
        k = 0
        while k < N:
            v_k = f(x, t[k], step=k)  # a real call
            if slope is not None:  # how far off the extrapolation from the last two real calls is here
                err = (v_last + (g[k] - g[p]) * slope - v_k).square().mean()
                e = f.fetch(err)[0].tolist()  # the one host sync of a real call (with the deferred NaN checks)
                errors.append(e)
                if pending is not None:
                    self._credit(*pending, e)
            if v_last is not None:
                slope = (v_k - v_last) / (g[k] - g[p])  # (v_k − v_p)/(t_k − t_p)
            v_last, p = v_k.clone(), k  # a copy: the model may write its next output into v_k's buffer
            x = step(x, v_k, k)  # with the real velocity
            S, pending = 0, None
            if slope is not None and k <= N - 2:  # a decision needs a real call after it to be measured
                S, pending = self._decide(g[k], N - 2 - k, calibrating)  # room: the last step stays real
            for i in range(k + 1, k + 1 + S):  # skipped steps: extrapolated velocity, zero cost
                x = step(x, v_k + (g[i] - g[k]) * slope, i)
            stats.rounds += 1
            stats.arm_counts[S] = stats.arm_counts.get(S, 0) + 1
            k += S + 1
        if calibrating:  # μ: the median one-step-ahead extrapolation error of this plain-Euler batch
            self.mu_ = self.mu_scale * (float(torch.tensor(errors).median()) if errors else 0.0)
        return x

    @host_side
    def _decide(self, t: float, room: int, calibrating: bool):
        """Skip length S at time t (at most ``room``) and the decision to credit, or None (calibration, or an
        arm clamped by the room)."""
        ctx = time_bucket(torch.tensor([t]), self.buckets)
        chosen = 0 if calibrating else int(self.bandit.select(ctx, limit=torch.tensor([room])))
        S = min(chosen, room)
        return S, ((ctx, S) if S == chosen and S in self.arms else None)

    @host_side
    def _credit(self, ctx, S: int, e: float) -> None:
        self.bandit.update(ctx, torch.tensor([S]), torch.tensor([self.mu_ * S - e if S else 0.0]))

    def state_dict(self) -> dict:
        return {"mu": self.mu_, "bandit": self.bandit.state_dict(), "base": self.base}

    def load_state_dict(self, state: dict) -> None:
        if "bandit" not in state or "mu" not in state:
            raise ValueError(f"expected a fastflow state with 'mu' and 'bandit', got keys {sorted(state)}")
        if state.get("base", "euler") != self.base:  # μ and the rewards are errors of another integrator
            raise ValueError(f"fastflow state was learnt with base={state.get('base', 'euler')!r} but this sampler "
                             f"has base={self.base!r}; build it with the same base, or start without the state")
        self.bandit.load_state_dict(state["bandit"])
        self.mu_ = None if state["mu"] is None else float(state["mu"])
