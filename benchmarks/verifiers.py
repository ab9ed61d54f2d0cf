"""Verifiers of the exact speculative sampler side by side: greedy (the paper's), block, tree.

    python benchmarks/verifiers.py                                  # toy mixtures D = 16, 64, 256
    python benchmarks/verifiers.py --models digits fashion14 fashion -n 64   # trained targets under runs/

Each (model, drafter, window) runs the three verifiers on the same noise. Columns:
  steps/call   grid steps a sample advances per sequential target call on its own path (N / its rounds,
               averaged over samples): the latency gain at batch 1. seq/N below is the batch's (its slowest
               sample's), which hides per-sample gains behind the batch maximum.
  vs greedy    steps/call relative to greedy's in the same row group
  accept       accepted / proposed draft steps (the tree's: along the chosen branch)
  seq/N        sequential target calls of the batch / N;   total/N: target rows per sample / N (the tree pays
               every branch)
  p_energy     toy only: energy two-sample test against sde-N on other noise (same law: large p)
Network drafters (model, medusa) run greedy and block only: the tree needs a drafter whose prediction does
not read the drafted states.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speculative import energy_pvalue  # benchmarks/speculative.py  # noqa: E402

from specflow.data.toy import GaussianMixture  # noqa: E402
from specflow.sampling import build_sampler  # noqa: E402
from specflow.sampling.speculative import Speculative  # noqa: E402
from specflow.sampling.drafters import DRAFTERS  # noqa: E402

RUNS = {"digits": "runs/digits", "fashion14": "runs/fashion14", "fashion": "runs/fashion"}


@dataclasses.dataclass
class CountingSpeculative(Speculative):
    """``speculative`` unchanged, plus the rounds each sample took (every verifier observes once a round)."""

    def __post_init__(self):
        super().__post_init__()
        self.sample_rounds = 0.0

    def _observe(self, drafter, r, a, ex):
        self.sample_rounds += float((r.last >= 0).sum())  # finished samples (L = 0) have last = −1
        super()._observe(drafter, r, a, ex)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["toy16", "toy64", "toy256"],
                    help="toy<D> (analytic mixture) or a trained rung: " + ", ".join(RUNS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--drafters", nargs="+", default=["frozen", "extrapolate", "model", "medusa"])
    ap.add_argument("--branches", type=int, default=2)
    ap.add_argument("--draft-suffix", default="", help="read runs/<model>_draft<suffix>, _medusa<suffix>")
    ap.add_argument("--verifiers", nargs="+", default=["greedy", "block", "tree"],
                    help="greedy first: the 'vs greedy' column divides by the first verifier's figure")
    ap.add_argument("-n", type=int, default=1000, help="samples, one batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    N = args.steps
    print(f"N = {N}, n = {args.n} samples per row (one batch), tree branches = {args.branches}, CPU")
    head = (f"{'model':>9} {'D':>4} {'drafter':>11} {'W':>3} {'verifier':>8} {'steps/call':>10} {'vs greedy':>9} "
            f"{'accept':>6} {'seq/N':>6} {'total/N':>7} {'p_energy':>8}")
    print(head + "\n" + "-" * len(head), flush=True)
    for name in args.models:
        run, D, drafts, ref = _model(name, args)
        if run is None:
            continue
        for d in args.drafters:
            kind = DRAFTERS[d].network  # the trained draft it reads, if any
            if kind is not None and kind not in drafts:
                continue
            for w in args.windows:
                base = None
                for v in args.verifiers:
                    if v == "tree" and not DRAFTERS[d].predicts_x1:  # the tree needs an x̂1 drafter
                        continue
                    opts = dict(branches=args.branches) if v == "tree" else {}
                    s = CountingSpeculative(steps=N, drafter=d, window=w, verifier=v, **opts)
                    x, st = run(s, drafts.get(kind))
                    per = N * args.n / s.sample_rounds
                    base = base or per
                    p = f"{energy_pvalue(x, ref):8.3f}" if ref is not None else f"{'-':>8}"
                    print(f"{name:>9} {D:4d} {d:>11} {w:3d} {v:>8} {per:10.3f} {per / base:9.3f} "
                          f"{st.acceptance_rate:6.3f} {st.sequential_nfe / N:6.3f} {st.total_nfe / N:7.3f} {p}",
                          flush=True)


def _model(name, args):
    """(run(sampler, draft) → (samples, stats), D, drafts, sde reference or None)."""
    if name.startswith("toy"):
        D = int(name[3:])
        gm = GaussianMixture.default(dim=D)
        noise = lambda seed: torch.randn(args.n, D, dtype=torch.float64,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))
        ref = build_sampler("sde", steps=args.steps).sample(gm, noise(1), generator=torch.Generator().manual_seed(1))

        def run(s, draft):
            res = s.sample(gm, noise(args.seed), generator=torch.Generator().manual_seed(args.seed))
            return res.samples, res.stats
        return run, D, {}, ref.samples
    from specflow.checkpoint import load_draft, load_target
    from specflow.generate import generate, sample_shape
    base = Path(RUNS[name])
    tpath = base / "checkpoints" / "last.ckpt"
    if not tpath.is_file():
        print(f"{name:>9} skipped: no target at {tpath}")
        return None, 0, {}, None
    target = load_target(tpath, "cpu")
    drafts = {}
    suffix = getattr(args, "draft_suffix", "")
    for kind, folder in (("model", f"{base}_draft{suffix}"), ("medusa", f"{base}_medusa{suffix}")):
        p = Path(folder) / "checkpoints" / "last.ckpt"
        if p.is_file():
            drafts[kind] = load_draft(p, target)

    def run(s, draft):
        g = generate(target, s, args.n, args.n, args.seed, "cycle", None, draft, "cpu")
        return g.samples, g.stats
    return run, math.prod(sample_shape(target)), drafts, None


if __name__ == "__main__":
    main()
