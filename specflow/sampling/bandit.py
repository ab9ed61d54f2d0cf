"""A small contextual multi-armed bandit: arms are step counts (leap/window/skip lengths), the context is a
time bucket. Shared by the exact speculative sampler's adaptive window, sfm's and rca's leap and fastflow's skip.

    b = Bandit(arms=(1, 2, 4, 8), contexts=4, policy="ucb1", seed=0)
    L = b.select(time_bucket(t, 4))          # (B,) arm VALUES, one per context in the batch
    b.update(ctx, L, reward)                 # credit each reward to the (context, arm) that earned it
    b.update(ctx, L, steps, cost=cost)       # or a rate: the arm's value is Σ steps / Σ cost

A rate (``cost`` given) is the right estimate of an objective "steps advanced per unit of cost" that runs over many
decisions: what a run pays is its total cost for its total steps, Σy/Σc (renewal–reward), not the mean of the
per-decision ratios y/c, which overvalues a risky arm (sfm, L = 8 accepted half the time at 1 call, else a
rejection's 1 step for 2 calls: mean ratio 0.5·8 + 0.5·0.5 = 4.25 steps per call, rate 4.5/1.5 = 3).

Policies (rewards are "larger is better"; their scale is learnt, not assumed):
- ``ucb1``: every arm of a context is tried once first (lowest arm first), then
      argmax_a  mean_a + c·R·sqrt(2·ln n / n_a),
  n = pulls in the context, n_a = pulls of arm a there, R = max − min of all rewards (for rates: of all
  ratios y/c) seen so far (1 until two distinct ones exist). UCB1's bound assumes rewards in [0, 1]; scaling
  the exploration term by the running range R makes it invariant to the reward's units (steps per call, NFE
  saved minus an error, …).
  Ties break to the lowest arm (torch.argmax returns the first maximum), so UCB1 is deterministic.
- ``thompson``: Gaussian Thompson sampling. After the same try-each-arm-once start, each row draws
      θ_a ~ N(mean_a, n_a·s_a² / w_a²)
  with w_a the arm's total cost (n_a for plain rewards, whose variance is then the familiar s_a²/n_a), s_a² the
  sample variance of the residuals y − mean_a·c (for n_a = 1, the context's pooled one, else R²; floored at
  1e-6·R² so a lucky constant arm keeps some doubt), and picks argmax θ_a. Draws come from the bandit's
  own seeded ``torch.Generator``, whose state is part of ``state_dict()``: same seed → same choices.

Objectives, one per sampler, each paying for what the user pays for. The first three are rates, steps advanced
per unit of cost (the bandit maximises Σ steps / Σ cost per arm and context):
- ``speculative``: a round costs 1 sequential target call + λ·(the sample's target rows) (``window_cost``),
  λ = ``compute_price`` ≥ 0. λ = 0 is latency alone, λ = 1 prices a row like a call (compute alone, when calls
  are not batched); benchmarks/bandits.py measures what λ a device's batched call implies.
- ``sfm``: cost = the target calls of the leap (the wasted leap and the fallback counted) + μ·(the leap's
  embedded local error estimate), μ from tol or calibrated from the run (sfm.py; ``mu=0``: calls only — at a
  fixed tol that drifts to long leaps and their error on real images).
- ``rca``: the same, per round for the whole batch, with no rejections: L steps for 1 + μ·mean e, e the size of
  the trapezoid correction rca applies (sfm.py, ``RCA``).
- ``fastflow``: a mean reward, μ·(steps skipped) − error at the next real call, μ calibrated from the run
  (skip.py).

The statistics live on the CPU in float64 (they are tiny); ``select`` returns arms on the context's device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

POLICIES = ("ucb1", "thompson")


def time_bucket(t: Tensor, buckets: int) -> Tensor:
    """Context index of times t ∈ [0, 1]: floor(t·buckets), with t = 1 in the last bucket. LongTensor like t."""
    if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1:
        raise ValueError(f"buckets must be an integer >= 1, got {buckets!r}")
    t = torch.as_tensor(t)
    return (t.to(torch.float64) * buckets).floor().long().clamp(0, buckets - 1)


def check_arms(arms) -> tuple[int, ...]:
    try:
        arms = tuple(int(a) for a in arms)
    except TypeError:
        raise ValueError(f"arms must be a sequence of integers, got {arms!r}") from None
    if not arms:
        raise ValueError("arms is empty; give at least one step count, e.g. arms=(1, 2, 4, 8)")
    if any(a < 0 for a in arms):
        raise ValueError(f"arms must be step counts >= 0, got {arms}")
    if list(arms) != sorted(set(arms)):
        raise ValueError(f"arms must be strictly increasing without duplicates, got {arms}; "
                         f"e.g. {tuple(sorted(set(arms)))}")
    return arms


def finite_nonneg(value) -> bool:
    """A price of the objectives below (λ, μ): a real number (not a bool), finite and ≥ 0."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def check_scale(scale) -> float:
    """``mu_scale``, the factor a calibrated price μ is scaled by: a number > 0, else a ValueError saying so."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"mu_scale must be a number > 0, got {scale!r}")
    return scale


def check_price(price) -> float:
    """``compute_price`` λ: a finite number ≥ 0, else a ValueError saying so."""
    if not finite_nonneg(price):
        raise ValueError(f"compute_price must be a finite number >= 0 (0: latency only; 1: a target row costs as "
                         f"much as a sequential call), got {price!r}")
    return float(price)


def window_cost(rows: Tensor, price: float) -> Tensor:
    """The cost of a speculative round for each sample: 1 sequential call + price·(its target rows)."""
    return 1 + price * rows.double()


class Bandit:
    """UCB1 / Gaussian-Thompson bandit over integer ``arms`` with ``contexts`` independent contexts.

    ``arms`` must be sorted, distinct and positive (a caller whose arm 0 is meaningful, such as a skip length
    of zero, uses ``allow_zero=True``). ``c`` is the UCB exploration constant (in units of the reward range).
    """

    def __init__(self, arms: Sequence[int], contexts: int = 1, policy: str = "ucb1", seed: int = 0,
                 c: float = 1.0, allow_zero: bool = False):
        self.arms = check_arms(arms)
        if not allow_zero and self.arms[0] < 1:
            raise ValueError(f"arms must be positive step counts, got {self.arms}")
        if policy not in POLICIES:
            raise ValueError(f"unknown bandit policy {policy!r}; valid: {', '.join(POLICIES)}")
        if not isinstance(contexts, int) or isinstance(contexts, bool) or contexts < 1:
            raise ValueError(f"contexts must be an integer >= 1, got {contexts!r}")
        if not c >= 0:
            raise ValueError(f"exploration constant c must be >= 0, got {c}")
        self.contexts, self.policy, self.seed, self.c = contexts, policy, int(seed), float(c)
        K, A = contexts, len(self.arms)
        self.n = torch.zeros(K, A, dtype=torch.float64)  # pulls
        self.s1 = torch.zeros(K, A, dtype=torch.float64)  # Σ y (rewards)
        self.s2 = torch.zeros(K, A, dtype=torch.float64)  # Σ y²
        self.w = torch.zeros(K, A, dtype=torch.float64)  # Σ c (costs; 1 per plain reward)
        self.scc = torch.zeros(K, A, dtype=torch.float64)  # Σ c²
        self.syc = torch.zeros(K, A, dtype=torch.float64)  # Σ y·c
        self.r_min, self.r_max = math.inf, -math.inf
        self.generator = torch.Generator().manual_seed(self.seed)
        self._values = torch.tensor(self.arms, dtype=torch.long)

    @property
    def counts(self) -> Tensor:
        """Pulls per (context, arm), (contexts, arms), int64."""
        return self.n.long()

    @property
    def means(self) -> Tensor:
        """Per (context, arm): the mean reward, or the rate Σ steps / Σ cost."""
        return self.s1 / torch.where(self.n > 0, self.w, 1.0)

    def best(self) -> Tensor:
        """The arm value with the highest mean reward (or rate) per context (untried arms count as -inf)."""
        m = torch.where(self.n > 0, self.means, torch.full_like(self.means, -math.inf))
        return self._values[m.argmax(1)]

    def schedule(self) -> dict[str, float]:
        """The learnt schedule, for logs and plots: per context (time bucket) with pulls, the arm its mean reward
        (or rate) prefers now and that value — ``{"bucket<i>/arm": value, "bucket<i>/reward": mean}``."""
        best, out = self.best(), {}
        for i in range(self.contexts):
            if self.n[i].sum() > 0:
                a = int(self.index(best[i:i + 1])[0])
                out[f"bucket{i}/arm"], out[f"bucket{i}/reward"] = float(best[i]), float(self.means[i, a])
        return out

    def _range(self) -> float:
        R = self.r_max - self.r_min
        return R if math.isfinite(R) and R > 0 else 1.0

    def _check_context(self, context: Tensor) -> np.ndarray:
        ctx = _host(context, np.int64)
        if ctx.size and (ctx.min() < 0 or ctx.max() >= self.contexts):
            raise ValueError(f"context indices must lie in [0, {self.contexts}), got [{ctx.min()}, {ctx.max()}]")
        return ctx

    def select(self, context: Tensor, limit: Tensor | None = None) -> Tensor:
        """One arm VALUE per entry of ``context`` (a LongTensor of context indices, any shape → flattened).

        ``limit`` (optional, one int per entry: the room left before the grid's end): an arm above it is
        eligible only once tried in its context. The caller then plays it cut to the limit, as a fixed arm is
        cut at the end of a grid, and credits nothing (the cut play measures the grid's end, not the arm), so
        a bandit that prefers 8 plays 8, 8, …, 3 where the fixed arm 8 does (toy64, N = 100: excluding the arm
        there made it play 2, 1 instead — one call more and 1.6× the error). An untried arm above the limit is
        never chosen: its cut plays earn no credit, so it would stay "untried first" forever. An entry with no
        eligible arm gets the smallest arm.
        """
        # numpy on the host: a sampler calls this every round, between a device sync and the next launch
        device = context.device if isinstance(context, Tensor) else "cpu"
        ctx = self._check_context(context)
        n, s1, w, mean = (a.numpy()[ctx] for a in (self.n, self.s1, self.w, self.means))  # (B, A)
        R = self._range()
        if self.policy == "ucb1":
            n_ctx = np.maximum(n.sum(1, keepdims=True), 1)
            score = mean + self.c * R * np.sqrt(2 * np.log(n_ctx) / np.maximum(n, 1))
        else:
            s2, scc, syc = self.s2.numpy()[ctx], self.scc.numpy()[ctx], self.syc.numpy()[ctx]
            var = (s2 - 2 * mean * syc + mean**2 * scc) / np.maximum(n - 1, 1)  # Σ (y − mean·c)² / (n − 1)
            # the context's pooled residual variance, about its own overall mean (rate)
            nc, s1c, wc, s2c, sccc, sycc = (a.sum(1, keepdims=True) for a in (n, s1, w, s2, scc, syc))
            mc = s1c / np.where(nc > 0, wc, 1.0)
            pooled = (s2c - 2 * mc * sycc + mc**2 * sccc) / np.maximum(nc - 1, 1)
            # R is a range of ratios y/c: the fallback and the floor are in y's units, R·(the arm's mean cost)
            # (1 for plain rewards), so that an expensive arm tried once is explored as much as a cheap one
            Ry2 = R**2 * (w / np.maximum(n, 1)) ** 2
            var = np.maximum(np.where(n >= 2, var, np.where(nc >= 2, pooled, Ry2)), 1e-6 * Ry2)
            z = torch.randn(n.shape, generator=self.generator, dtype=torch.float64).numpy()
            score = mean + z * np.sqrt(var * n / np.where(n > 0, w, 1.0) ** 2)
        # Untried arms first (the lowest one), so every arm has a mean before any is preferred.
        score = np.where(n == 0, math.inf, score)
        if limit is not None:
            # a tried arm stays eligible past the limit (the caller cuts it there, as a fixed arm is cut at the
            # grid's end); an untried one would stay "untried first" forever, as its cut plays earn no credit
            ok = (self._values.numpy()[None] <= _host(limit, np.int64)[:, None]) | (n > 0)
            score = np.where(ok, score, -math.inf)
            score[~ok.any(1), 0] = 0.0  # nothing eligible: the smallest arm
        return torch.from_numpy(self._values.numpy()[score.argmax(1)]).to(device)

    def index(self, arm: Tensor) -> Tensor:
        """Positions in ``self.arms`` of arm VALUES (CPU LongTensor); a value that is not an arm is an error."""
        arm, values = _host(arm, np.int64), self._values.numpy()
        a = np.minimum(np.searchsorted(values, arm), len(values) - 1)
        if not (values[a] == arm).all():
            raise ValueError(f"arm values {sorted(set(arm.tolist()) - set(self.arms))} are not arms of this "
                             f"bandit {self.arms}")
        return torch.from_numpy(a)

    def update(self, context: Tensor, arm: Tensor, reward: Tensor, cost: Tensor | None = None) -> None:
        """Credit ``reward[i]`` to (``context[i]``, ``arm[i]``) (arm VALUES); all flatten to length B. With
        ``cost`` (finite, > 0) the reward is the steps a decision advanced and the arm's value is the rate
        Σ reward / Σ cost (module docstring); without, the mean reward (a cost of 1 each)."""
        ctx, arm, r = self._check_context(context), _host(arm, np.int64), _host(reward, np.float64)
        c = np.ones_like(r) if cost is None else _host(cost, np.float64)
        if not (ctx.size == arm.size == r.size == c.size):
            raise ValueError(f"context, arm, reward and cost must have one entry each, got sizes "
                             f"{ctx.size}, {arm.size}, {r.size}, {c.size}")
        if not np.isfinite(r).all():
            raise ValueError("rewards must be finite; got NaN/Inf (check the reward's definition)")
        if not (np.isfinite(c).all() and (c > 0).all()):
            raise ValueError("costs must be finite and > 0 (check the cost's definition)")
        a = self.index(arm).numpy()
        if r.size == 0:
            return
        for acc, x in ((self.n, 1.0), (self.s1, r), (self.s2, r**2), (self.w, c), (self.scc, c**2),
                       (self.syc, r * c)):
            np.add.at(acc.numpy(), (ctx, a), x)  # in place on the tensors' memory
        ratio = r / c
        self.r_min, self.r_max = min(self.r_min, float(ratio.min())), max(self.r_max, float(ratio.max()))

    def state_dict(self) -> dict:
        return {"arms": list(self.arms), "contexts": self.contexts, "policy": self.policy, "c": self.c,
                **{k: getattr(self, k).clone() for k in _SUMS},
                "r_min": self.r_min, "r_max": self.r_max, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore learnt statistics; a state for another arm set, policy or context count is a ValueError."""
        mine = {"arms": list(self.arms), "contexts": self.contexts, "policy": self.policy}
        theirs = {k: (list(state[k]) if k == "arms" else state[k]) for k in mine if k in state}
        if theirs != mine:
            raise ValueError(f"bandit state was saved for {theirs} but this bandit has {mine}; build the "
                             f"sampler with the same arms/buckets/policy, or start without the saved state")
        self.c = float(state.get("c", self.c))
        # a state saved before costs existed holds plain rewards: a cost of 1 each
        state = {"w": state["n"], "scc": state["n"], "syc": state["s1"], **state}
        for k in _SUMS:
            setattr(self, k, state[k].to("cpu", torch.float64).clone())
        self.r_min, self.r_max = float(state["r_min"]), float(state["r_max"])
        self.generator.set_state(state["rng"])

    def __repr__(self) -> str:
        return f"Bandit(arms={self.arms}, contexts={self.contexts}, policy={self.policy!r})"


_SUMS = ("n", "s1", "s2", "w", "scc", "syc")  # the statistics a state carries


def check_rate_state(state: dict, who: str) -> None:
    """A sampler whose bandit learns rates refuses a bandit state saved when it averaged per-decision ratios: its
    sums hold ratios, and rates added on top would mix the two."""
    if "w" not in state:
        raise ValueError(f"this {who} bandit state was saved before its bandit learnt rates (Σ steps / Σ cost; it "
                         "averaged per-decision ratios): its statistics mean something else here; start without "
                         "the state, or relearn it")


def _host(a, dtype) -> np.ndarray:
    """A flat numpy copy of a tensor (any device) or sequence."""
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype).reshape(-1)
