"""The dimension ladder: what exact speculative sampling does as images grow (digits D = 64, Fashion-MNIST 14×14
D = 196, 28×28 D = 784), printed as one table.

    python benchmarks/ladder.py                                  # every rung whose target is under runs/
    python benchmarks/ladder.py --rungs fashion --steps 100 -n 128 --windows 8

A drafted step from the same state is accepted with probability 1 − TV(N(m̂, c²I), N(m, c²I)) = 2Φ(−z/2),
z = ‖m̂ − m‖/c: the draft's error summed over all D coordinates, in units of the step's noise. At a fixed
per-coordinate error z/√D, acceptance falls as √D grows. This script records z for every proposed step of
the real run (a ``Speculative`` whose verify also measures it) and prints, beside the measured acceptance,
the one the formula predicts from those z (the mean of 2Φ(−z/2) over the proposed steps: equal in
expectation for any Gaussian-step drafter, so a gap is Monte Carlo noise or a bug).

Columns:
  accept / pred   measured acceptance (accepted / proposed) and the formula's, from the measured z
  z / z√D         mean z of the proposed steps, and z/√D: the draft error per coordinate in noise units
  seq/N total/N   sequential target calls / N (one batch: its slowest sample), target rows per sample / N
  own/N           a sample's own rounds / N, averaged over the samples (its latency alone, batch 1)
  draft/N         draft rows per sample / N;   dFLOPs: one draft row's FLOPs / one target row's
Each (drafter, window) runs on a fresh sampler with the same per-sample noise; "bandit" learns within the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch

from drafts import flops  # benchmarks/drafts.py
from specflow.checkpoint import load_draft, load_target
from specflow.generate import generate, sample_shape
from specflow.sampling.drafters import DRAFTERS
from specflow.sampling.speculative import Speculative, _sqnorm

RUNGS = {"digits": "runs/digits", "fashion14": "runs/fashion14", "fashion": "runs/fashion"}


@dataclasses.dataclass
class MeasuringSpeculative(Speculative):
    """``speculative`` unchanged, plus, for every proposed step, z = ‖m̂_j − m_j‖/c_j (equal covariances)."""

    def __post_init__(self):
        super().__post_init__()
        self.z_sum = self.pred_sum = self.count = self.noisy = 0.0  # noisy: proposed steps with c > 0
        self.sample_rounds = 0.0  # Σ over samples of the rounds (target calls) each took: its own latency

    def _observe(self, drafter, r, a, ex):
        self.sample_rounds += float((r.last >= 0).sum())  # finished samples (L = 0) have last = −1
        super()._observe(drafter, r, a, ex)

    def _verify(self, r, ex, L, jj):
        a = super()._verify(r, ex, L, jj)
        c = r.P[..., 2]  # (L, B)
        d_hat = r.Y[1:] - r.m - c[(...,) + (None,) * (r.Y.ndim - 2)] * r.eps  # m̂ − m
        dist = _sqnorm(d_hat).sqrt()
        z = torch.where(c > 0, dist / c.clamp_min(1e-30), torch.where(dist > 0, torch.inf, 0.0))
        pred = 2 * torch.special.ndtr(-0.5 * z)  # 0 at z = ∞: a noiseless step accepts only an exact match
        j = jj[1:r.Y.shape[0]] - 1  # step index j = 0..Lmax−1, (Lmax, 1)
        proposed = (j >= ex.long()) & (j <= torch.minimum(a, L - 1))  # as SampleStats counts them
        self.count += float(proposed.sum())
        self.pred_sum += float((pred * proposed).sum())
        self.z_sum += float(torch.where(proposed & (c > 0), z, 0.0).sum())
        self.noisy += float((proposed & (c > 0)).sum())
        return a

    @property
    def z_mean(self) -> float:
        return self.z_sum / max(1.0, self.noisy)


def window_options(w: str) -> dict:
    """"8" → a fixed window; "bandit" or "bandit:λ" → the window bandit with compute_price λ."""
    if w.startswith("bandit"):
        return {"window": "bandit", "compute_price": float(w.partition(":")[2] or 0)}
    return {"window": int(w)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rungs", nargs="+", default=list(RUNGS), help=f"of {list(RUNGS)}; each reads runs/<rung>*")
    ap.add_argument("--runs", default=".", help="folder holding runs/")
    ap.add_argument("--ckpt", default="last.ckpt", help="checkpoint name inside each checkpoints/ folder")
    ap.add_argument("--draft-suffix", default="", help="read drafts from runs/<rung>_draft<suffix>, "
                    "runs/<rung>_medusa<suffix> (e.g. _mse: the MSE-trained drafts of the loss comparison)")
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 50])
    ap.add_argument("--windows", nargs="+", default=["4", "8", "bandit"],
                    help='ints, "bandit" or "bandit:λ" (the window bandit with compute_price λ)')
    ap.add_argument("--drafters", nargs="+", default=["frozen", "extrapolate", "model", "anchored", "medusa"])
    ap.add_argument("-n", type=int, default=64, help="samples, one batch")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    head = (f"{'rung':>9} {'D':>4} {'N':>4} {'drafter':>11} {'window':>10} {'accept':>6} {'pred':>6} {'z':>6} "
            f"{'z/√D':>6} {'seq/N':>6} {'own/N':>6} {'total/N':>7} {'draft/N':>7} {'dFLOPs':>6} {'wall s':>6}")
    print(f"n = {args.n} samples per row (one batch), labels cycle, guidance {args.guidance}, device {args.device}")
    print(head + "\n" + "-" * len(head), flush=True)
    for rung in args.rungs:
        base = Path(args.runs) / RUNGS[rung]
        tpath = base / "checkpoints" / args.ckpt
        if not tpath.is_file():
            print(f"{rung:>9} skipped: no target at {tpath}")
            continue
        target = load_target(tpath, args.device)
        D = math.prod(sample_shape(target))
        drafts, rel = {}, {}
        x = torch.randn(1, *sample_shape(target), device=args.device)
        t, y = torch.full((1,), 0.5, device=args.device), torch.zeros(1, dtype=torch.long, device=args.device)
        with torch.no_grad():
            f_t = flops(target, x, t, y)
            for kind in ("model", "medusa"):
                folder = f"{base}_{'draft' if kind == 'model' else 'medusa'}{args.draft_suffix}"
                p = Path(folder) / "checkpoints" / args.ckpt
                if not p.is_file():
                    print(f"{rung:>9} no {kind} draft at {p}: its rows are skipped")
                    continue
                drafts[kind] = load_draft(p, target)
                rel[kind] = (flops(drafts[kind], x, t, y) if kind == "model" else
                             flops(drafts[kind], x, t + 0.01, None, features=target.features(x, t, y), x_src=x,
                                   t_src=t, x1_src=x)) / f_t
        for N in args.steps:
            for d in args.drafters:
                net = DRAFTERS[d].network  # the trained draft a drafter reads, if any
                if net is not None and net not in drafts:
                    continue
                for w in args.windows:
                    s = MeasuringSpeculative(steps=N, drafter=d, **window_options(w))
                    t0 = time.perf_counter()
                    st = generate(target, s, args.n, args.n, args.seed, "cycle", args.guidance, drafts.get(net),
                                  args.device).stats
                    wall = time.perf_counter() - t0
                    assert int(s.count) == st.proposed, (s.count, st.proposed)  # the same steps as the stats'
                    print(f"{rung:>9} {D:4d} {N:4d} {d:>11} {w:>10} {st.acceptance_rate:6.3f} "
                          f"{s.pred_sum / s.count:6.3f} {s.z_mean:6.2f} {s.z_mean / math.sqrt(D):6.3f} "
                          f"{st.sequential_nfe / N:6.3f} {s.sample_rounds / args.n / N:6.3f} {st.total_nfe / N:7.3f} {st.draft_nfe / N:7.3f} "
                          f"{rel.get(net, 0.0):6.3f} {wall:6.1f}", flush=True)


if __name__ == "__main__":
    main()
