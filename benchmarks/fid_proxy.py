"""Sample quality of a trained image model per sampler: FID-proxy with bootstrap intervals, printed as a table.

    python benchmarks/fid_proxy.py --ckpt runs/digits/checkpoints/last.ckpt --num 1797 --steps 100
    python benchmarks/fid_proxy.py --data fashion --ckpt runs/fashion/checkpoints/last.ckpt \
        --draft runs/fashion_medusa/checkpoints/last.ckpt --num 2000 --rival-calls 30 \
        --only sde speculative "LOSSY accept-all" "RIVAL sde N=30" "RIVAL ab2 N=30" "RIVAL heun N=15"

Every sampler draws the same sample indices 0..num−1 (per-sample noise streams of --seed), so the
difference column is paired: Δ = FID-proxy(sampler) − FID-proxy(sde) with a paired bootstrap interval
(reference and sample indices resampled together). Exact samplers (speculative) should show Δ ≈ 0 (interval
holding 0); the lossy controls must not. Features come from ``specflow.metrics.build_feature_extractor``
("auto": Inception if its weights are on disk, else a small classifier trained on --data — then the numbers
are FID-proxy, comparable only with each other; the reference is the data module's unaugmented training set,
at most --reference of it). With --draft (a Medusa or small-net checkpoint of the target) the speculative
rows draft with it; else with the training-free extrapolation. Columns: seq / total NFE per sample,
acceptance, wall time (CPU here), FID-proxy [95 % interval], Δ vs sde [95 % interval].
"""
from __future__ import annotations

import argparse
import time

import torch

from specflow.checkpoint import DRAFT_KEY, load_draft, load_target, read_checkpoint
from specflow.data import DigitsDataModule, FashionMNISTDataModule
from specflow.generate import sample_indices
from specflow.metrics import (bootstrap_fid, bootstrap_fid_difference, build_feature_extractor, extract_features,
                              reference_images)
from specflow.sampling import build_sampler
from specflow.sampling.drafters import DRAFTERS
from specflow.sampling.speculative import Speculative
from specflow.tally import Tally


class AcceptAll(Speculative):
    """LOSSY control: speculative sampling that skips verification (every draft step is accepted)."""

    def _verify(self, r, ex, L, jj):
        super()._verify(r, ex, L, jj)  # still computes the target's means, which the coupling reads
        return L.clone()


def samplers(steps: int, rival_calls: int, drafter: str = "extrapolate", window: int = 8) -> dict:
    n = rival_calls  # the plain solvers at speculation's sequential calls: what fewer steps alone would give
    return {
        "sde": build_sampler("sde", steps=steps),
        "speculative": build_sampler("speculative", steps=steps, drafter=drafter, window=window),
        "speculative-bandit": build_sampler("speculative", steps=steps, drafter=drafter, window="bandit"),
        "euler": build_sampler("euler", steps=steps),
        "sfm": build_sampler("sfm", steps=steps),
        "fastflow": build_sampler("fastflow", steps=steps),
        "LOSSY accept-all": AcceptAll(steps=steps, drafter=drafter, window=window),
        "LOSSY rca": build_sampler("rca", steps=steps),
        f"LOSSY sde N={max(steps // 10, 2)}": build_sampler("sde", steps=max(steps // 10, 2)),
        f"RIVAL sde N={n}": build_sampler("sde", steps=n),
        f"RIVAL ab2 N={n}": build_sampler("ab2", steps=n),
        f"RIVAL heun N={max(n // 2, 1)}": build_sampler("heun", steps=max(n // 2, 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", choices=["digits", "fashion", "fashion14"], default="digits",
                    help="the target's data set: the classifier's training set and FID's reference")
    ap.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: Debian's)")
    ap.add_argument("--draft", default=None, help="a draft checkpoint of the target (medusa or small net)")
    ap.add_argument("--drafter", default=None, choices=sorted(DRAFTERS),
                    help="the speculative rows' drafter (default: extrapolate, or the kind of --draft; "
                         "'anchored' reads a small-net draft)")
    ap.add_argument("--window", type=int, default=8, help="the speculative rows' window")
    ap.add_argument("--reference", type=int, default=10_000, help="reference images (at most the training set)")
    ap.add_argument("--num", type=int, default=1797, help="samples per sampler")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--cache", default=None, help="FID-proxy classifier file (loaded, or trained and saved)")
    ap.add_argument("--classifier-steps", type=int, default=600, help="FID-proxy classifier training steps")
    ap.add_argument("--classifier-seconds", type=float, default=60.0, help="its time cap (seconds)")
    ap.add_argument("--only", nargs="*", default=None, help="subset of sampler labels")
    ap.add_argument("--rival-calls", type=int, default=None,
                    help="target calls of the RIVAL rows (plain solvers; heun takes half as many steps); set it to "
                         "speculative's sequential NFE per sample (default: 0.3·steps)")
    args = ap.parse_args()

    net = load_target(args.ckpt)
    shape = (net.in_channels, net.image_size, net.image_size)
    draft, drafter = None, args.drafter or "extrapolate"
    if args.draft:
        draft = load_draft(args.draft, net)
        kind = read_checkpoint(args.draft, "draft checkpoint")[DRAFT_KEY]["drafter"]
        drafter = args.drafter or kind
        if DRAFTERS[drafter].network != kind:
            raise SystemExit(f"--drafter {drafter} does not read a {kind!r} draft")
    elif DRAFTERS[drafter].needs_network:
        raise SystemExit(f"--drafter {drafter} needs --draft")
    if args.data == "digits":
        dm = DigitsDataModule(image_size=net.image_size)
    else:
        dm = FashionMNISTDataModule(image_size=28 if args.data == "fashion" else 14,
                                    **({} if args.data_root is None else {"root": args.data_root}))
    if dm.image_size != net.image_size:
        raise SystemExit(f"--data {args.data} is {dm.image_size} px but the target is {net.image_size} px")
    extractor = build_feature_extractor("auto", dm, cache=args.cache, steps=args.classifier_steps,
                                        max_seconds=args.classifier_seconds)
    print(f"features: {extractor.description}; drafter of the speculative rows: {drafter}")
    dm.setup("fit")
    real = reference_images(dm, min(args.reference, len(dm.reference_set())), seed=args.seed)
    ref = extract_features(extractor, real)
    feats, rows = {}, []
    table = samplers(args.steps, args.rival_calls or max(round(0.3 * args.steps), 1), drafter, args.window)
    if args.only and set(args.only) - set(table):
        raise SystemExit(f"unknown --only labels {sorted(set(args.only) - set(table))}; valid: {list(table)}")
    for label, sampler in table.items():
        if args.only and label not in args.only:
            continue
        t0 = time.perf_counter()
        x, stats = sample_indices(net, sampler, range(args.num), shape, args.seed, net.num_classes, args.batch,
                                  draft=draft)
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
