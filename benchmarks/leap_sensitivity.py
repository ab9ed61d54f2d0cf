"""Does the leap bandit's price track what the output pays? sfm (base ab2, no check) with fixed per-bucket leaps.

    python benchmarks/leap_sensitivity.py --ckpt runs/fashion/checkpoints/last.ckpt --steps 100
    python benchmarks/leap_sensitivity.py --models toy64 --steps 100

The priced leap bandit (sfm.py) pays calls + μ·Σe, e each leap's embedded local error estimate; the user pays the
output's error. For one model and grid this prints, per leap schedule (one leap per time bucket, as the bandit
chooses): NFE; the batch's relative error against a fine reference (heun, 4N steps; what deterministic.py reports);
the median of the samples' own relative errors; the share of the batch error's square carried by its worst 3
samples; Σe, the batch's sum of every leap's local error estimate e (and, last, split by the bucket each leap
started in: the bandit charges a leap its own e only, so a choice that raises the e of later leaps is not charged
for it); the price per sample at each μ of --mu, NFE + μ·Σe/batch (what the priced bandit minimises per step, near
enough: it does not credit the leaps cut at the grid's end); the rank correlation over samples between output error and Σe; and how far the output moved from the all-4
schedule's, in units of that schedule's error. Rows: every fixed leap; the all-4 schedule with one bucket changed
to 2 or 8 (then the rank correlation over these schedules between Σe and each error); then the bandit (Thompson,
accept-all) at each μ after --warmup batches, played as it learns (deterministic.py's bandit rows), and its learnt
schedule replayed greedily (``Bandit.best()`` per bucket).
"""
import argparse
import math
from types import SimpleNamespace

import numpy as np
import torch

from deterministic import load_model, relative_error, sample_errors, warmup_generator
from specflow.sampling import build_sampler
from specflow.sampling.bandit import time_bucket

BUCKETS = 4


class FixedSchedule:
    """Stands in for sfm's bandit: one leap per time bucket, nothing learnt."""

    def __init__(self, leaps):
        self.leaps = np.asarray(leaps)

    def select(self, context, limit=None):
        return torch.as_tensor(self.leaps[np.asarray(context)])

    def update(self, *args, **kwargs):
        pass


def leap_errors(sampler, B):
    """Wrap the sampler's per-round plan to sum the e of every decision (the e the priced bandit reads: fetched
    each round for the rows that moved last round) per sample and per time bucket the decision started in."""
    per_sample, per_bucket, last = np.zeros(B), np.zeros(BUCKETS), [None]
    plan = sampler._plan

    def recording(k, retry, err, grid, *rest):
        k_now = k.numpy().copy()
        if last[0] is not None and err is not None:
            moved = k_now != last[0]
            e = err.numpy()[moved].astype(np.float64)
            per_sample[moved] += e
            np.add.at(per_bucket, time_bucket(grid[last[0][moved]], BUCKETS).numpy(), e)
        last[0] = k_now
        return plan(k, retry, err, grid, *rest)

    sampler._plan = recording
    return per_sample, per_bucket


def ranks(a):
    return np.argsort(np.argsort(a)).astype(float)


def sfm(N, mu, **kw):
    return build_sampler("sfm", steps=N, leap="bandit", tol=math.inf, check="local", base="ab2", mu=mu,
                         buckets=BUCKETS, **kw)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[], help="toy64 (none: only --ckpt)")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mu", type=float, nargs="+", default=[1000.0, 3000.0], help="the bandit rows' price of error")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    N, B = args.steps, args.batch
    for name in args.models + ([args.ckpt] if args.ckpt else []):
        model, shape, dtype, make_cond, _ = load_model(name, SimpleNamespace(device=args.device), args.guidance)
        g = torch.Generator().manual_seed(args.seed)
        x0 = torch.randn(B, *shape, generator=g, dtype=dtype).to(args.device)
        cond = make_cond(B, g) if make_cond else None
        fine = build_sampler("heun", steps=4 * N).sample(model, x0, cond=cond).samples
        ref = {}

        def row(label, sampler):
            e, e_bucket = leap_errors(sampler, B)
            res = sampler.sample(model, x0, cond=cond)
            out, nfe = sample_errors(res.samples, fine).cpu().numpy(), res.stats.total_nfe
            err = relative_error(res.samples, fine)
            sq = np.sort(out**2)[::-1]
            moved = (float((res.samples - ref["x"]).norm() / (ref["x"] - fine).norm()) if ref else 0.0)
            prices = "".join(f"  {nfe + mu * e.sum() / B:8.1f}" for mu in args.mu)
            print(f"{label:<28} {nfe:6.1f}  {err:.2e}  {np.median(out):.2e}  {sq[:3].sum() / sq.sum():5.2f}  "
                  f"{e.sum():7.3f}{prices}  {np.corrcoef(ranks(out), ranks(e))[0, 1]:5.2f}  {moved:5.2f}  "
                  + " ".join(f"{v:.3f}" for v in e_bucket))
            return res, e.sum(), err, np.median(out)

        print(f"\n### {name}, guidance {args.guidance}, N = {N}, batch {B} (sfm ab2, no check; buckets {BUCKETS})")
        prices = "".join(f"  {'price' + format(mu, 'g'):>8}" for mu in args.mu)
        print(f"{'leaps per bucket':<28} {'NFE':>6}  {'err':>8}  {'median':>8}  {'top3':>5}  {'Σe':>7}{prices}  "
              f"{'ρ(e)':>5}  {'moved':>5}  Σe by the bucket each leap started in")
        schedules = [[L] * BUCKETS for L in (4, 1, 2, 8)]
        schedules += [[4] * b + [L] + [4] * (BUCKETS - b - 1) for b in range(BUCKETS) for L in (2, 8)]
        fixed = []
        for leaps in schedules:
            s = sfm(N, 1.0)
            s.bandit = FixedSchedule(leaps)
            res, *figures = row(" ".join(map(str, leaps)), s)
            fixed.append(figures)
            if not ref:
                ref["x"] = res.samples
        se, err, med = np.array(fixed).T
        print(f"rank correlation over these schedules of Σe with the error {np.corrcoef(ranks(se), ranks(err))[0, 1]:.2f}, "
              f"with the median {np.corrcoef(ranks(se), ranks(med))[0, 1]:.2f}")
        for mu in args.mu:
            s = sfm(N, mu)
            gw = warmup_generator(args.seed, f"mu{mu:g}")
            for _ in range(args.warmup):
                xw = torch.randn(B, *shape, generator=gw, dtype=dtype).to(args.device)
                s.sample(model, xw, cond=make_cond(B, gw) if make_cond else None)
            best = s.bandit.best().tolist()
            row(f"bandit mu{mu:g} (learning)", s)
            greedy = sfm(N, 1.0)
            greedy.bandit = FixedSchedule(best)
            row(f"  its best: {' '.join(map(str, best))}", greedy)


if __name__ == "__main__":
    main()
