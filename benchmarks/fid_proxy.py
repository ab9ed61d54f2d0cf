"""Sample quality of a trained image model per sampler: FID-proxy with bootstrap intervals, printed as a table.

    python benchmarks/fid_proxy.py --ckpt runs/digits/checkpoints/last.ckpt --num 1797 --steps 100

Every sampler draws the same sample indices 0..num−1 (per-sample noise streams of --seed), so the
difference column is paired: Δ = FID-proxy(sampler) − FID-proxy(sde) with a paired bootstrap interval
(reference and sample indices resampled together). Exact samplers (speculative) should show Δ ≈ 0 (interval
holding 0); the lossy controls must not. Features come from ``specflow.metrics.build_feature_extractor``
("auto": Inception if its weights are on disk, else the digits classifier — then the numbers are FID-proxy,
comparable only with each other). Columns: seq / total NFE per sample, acceptance, wall time (CPU here),
FID-proxy [95 % interval], Δ vs sde [95 % interval].
"""
from __future__ import annotations

import argparse
import time

import torch

from specflow.data import DigitsDataModule
from specflow.generate import sample_indices
from specflow.lit.target import TargetFlow
from specflow.metrics import bootstrap_fid, bootstrap_fid_difference, build_feature_extractor, extract_features
from specflow.sampling import build_sampler
from specflow.sampling.speculative import Speculative
from specflow.tally import Tally


class AcceptAll(Speculative):
    """LOSSY control: speculative sampling that skips verification (every draft step is accepted)."""

    def _verify(self, r, ex, L, jj):
        super()._verify(r, ex, L, jj)  # still computes the target's means, which the coupling reads
        return L.clone()


def samplers(steps: int, rival_calls: int) -> dict:
    n = rival_calls  # the plain solvers at speculation's sequential calls: what fewer steps alone would give
    return {
        "sde": build_sampler("sde", steps=steps),
        "speculative": build_sampler("speculative", steps=steps, window=8),
        "speculative-bandit": build_sampler("speculative", steps=steps, window="bandit"),
        "euler": build_sampler("euler", steps=steps),
        "sfm": build_sampler("sfm", steps=steps),
        "fastflow": build_sampler("fastflow", steps=steps),
        "LOSSY accept-all": AcceptAll(steps=steps, window=8),
        "LOSSY rca": build_sampler("rca", steps=steps),
        f"LOSSY sde N={max(steps // 10, 2)}": build_sampler("sde", steps=max(steps // 10, 2)),
        f"RIVAL sde N={n}": build_sampler("sde", steps=n),
        f"RIVAL ab2 N={n}": build_sampler("ab2", steps=n),
        f"RIVAL heun N={max(n // 2, 1)}": build_sampler("heun", steps=max(n // 2, 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--num", type=int, default=1797, help="samples per sampler")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--cache", default=None, help="FID-proxy classifier file (loaded, or trained and saved)")
    ap.add_argument("--only", nargs="*", default=None, help="subset of sampler labels")
    ap.add_argument("--rival-calls", type=int, default=None,
                    help="target calls of the RIVAL rows (plain solvers; heun takes half as many steps); set it to "
                         "speculative's sequential NFE per sample (default: 0.3·steps)")
    args = ap.parse_args()

    target = TargetFlow.load_from_checkpoint(args.ckpt, map_location="cpu")
    net = target.velocity_model()
    shape = (net.in_channels, net.image_size, net.image_size)
    dm = DigitsDataModule(image_size=net.image_size)
    extractor = build_feature_extractor("auto", dm, cache=args.cache)
    print(f"features: {extractor.description}")
    real, _ = dm.images()
    ref = extract_features(extractor, real)  # all 1797 digits
    feats, rows = {}, []
    for label, sampler in samplers(args.steps, args.rival_calls or max(round(0.3 * args.steps), 1)).items():
        if args.only and label not in args.only:
            continue
        t0 = time.perf_counter()
        x, stats = sample_indices(net, sampler, range(args.num), shape, args.seed, net.num_classes, args.batch)
        wall = time.perf_counter() - t0
        tally = Tally()
        for st, n in zip(stats, torch.arange(args.num).split(args.batch)):
            tally.add(st, len(n))
        s = tally.summary()
        feats[label] = extract_features(extractor, x)
        rows.append((label, s, wall))
        print(f"  sampled {label}: {wall:.1f}s", flush=True)
    name = extractor.fid_name
    print(f"\n{'sampler':22s} {'seq NFE':>8s} {'tot NFE':>8s} {'accept':>7s} {'wall s':>7s}  "
          f"{name + ' [95%]':>24s}  {'Δ vs sde [95%]':>26s}")
    for label, s, wall in rows:
        fid = bootstrap_fid(ref, feats[label], n_boot=args.n_boot, seed=args.seed)
        diff = ("" if label == "sde" or "sde" not in feats else
                str(bootstrap_fid_difference(ref, feats[label], feats["sde"], n_boot=args.n_boot, seed=args.seed)))
        acc = f"{s['acceptance_rate']:.3f}" if "acceptance_rate" in s else "-"
        print(f"{label:22s} {s['sequential_nfe']:8.1f} {s['total_nfe']:8.1f} {acc:>7s} {wall:7.1f}  "
              f"{str(fid):>24s}  {diff:>26s}")


if __name__ == "__main__":
    main()
