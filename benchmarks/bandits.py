"""Does the speculative window bandit earn its place? Its objective against every fixed window, in hindsight.

    python benchmarks/bandits.py                                  # toy mixtures D = 16, 64
    python benchmarks/bandits.py --models digits fashion -n 128   # trained targets under runs/
    python benchmarks/bandits.py --price                          # the λ this machine's batched call implies

The objective (bandit.py, compute_price = λ): cost per grid step = (the sample's sequential target calls +
λ·its target rows) / N, averaged over samples — lower is better. For each model and λ, batches b = 0, 1, … 8
(different noise, the same for every row) run every fixed window and the bandit, which learns across the
batches; "after k" is the bandit's cost on batch k, having learnt from batches 0 … k−1. "best fixed" is the
best window chosen in hindsight on that same batch; ratio = bandit / best fixed (≤ 1.05 is the goal);
regret = Σ over batches 0…8 of (bandit − best fixed) cost, in grid steps' worth of calls per sample. The last
column is the learnt schedule after batch 8: the window the bandit prefers in each time bucket, t = 0 → 1.

--price times the target call at B and (W + 1)·B rows (a speculative round's verify call) on this machine,
for the configs' networks (random weights: the time does not depend on them), and prints
λ = (T((W+1)·B) / T(B) − 1) / (W + 1): the price at which the bandit's cost model, 1 + λ·rows, says a round costs
what it really takes, in units of one plain call. λ ≈ 1: time grows with the rows (a saturated device, a CPU);
λ ≈ 0: the batched call is as fast as one (a GPU at small batch).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from verifiers import CountingSpeculative, _model  # benchmarks/verifiers.py  # noqa: E402

from specflow.sampling.drafters import DRAFTERS  # noqa: E402

BATCHES, WARMUPS = 9, (1, 2, 4, 8)


def cost(rounds: float, rows: float, N: int, lam: float) -> float:
    """The objective per grid step: (a sample's sequential calls + λ·its target rows) / N, mean over samples."""
    return (rounds + lam * rows) / N


def _counts(s: CountingSpeculative, st, n: int) -> tuple[float, float]:
    return s.sample_rounds / n, st.total_nfe


def hindsight(name, args):
    """Every fixed window once per batch (their costs at every λ follow from the same counts) and one bandit per
    λ learning across the batches; → (D, {λ: (fixed costs per window, [(bandit cost, schedule) per batch])})."""
    arms, N = tuple(args.arms), args.steps
    fixed = {w: [] for w in arms}  # per batch: (rounds, rows)
    bandits = {lam: CountingSpeculative(steps=N, drafter=args.drafter, window="bandit", arms=arms,
                                        compute_price=lam, policy=args.policy) for lam in args.prices}
    curves = {lam: [] for lam in args.prices}
    for b in range(BATCHES):
        args.seed = b
        run, D, drafts, _ = _model(name, args)
        if run is None:
            return None
        kind = DRAFTERS[args.drafter].network
        draft = drafts.get(kind) if kind else None
        if kind and draft is None:
            raise SystemExit(f"drafter {args.drafter!r} needs a {kind!r} draft of {name}, found none")
        for w in arms:
            s = CountingSpeculative(steps=N, drafter=args.drafter, window=w)
            fixed[w].append(_counts(s, run(s, draft)[1], args.n))
        for lam, bandit in bandits.items():
            bandit.sample_rounds = 0.0
            _, st = run(bandit, draft)
            learnt = bandit.bandit.schedule()
            arms_t = "|".join(str(int(learnt[f"bucket{i}/arm"])) if f"bucket{i}/arm" in learnt else "-"
                              for i in range(bandit.buckets))
            curves[lam].append((cost(*_counts(bandit, st, args.n), N, lam), arms_t, learnt))
    return D, {lam: ({w: [cost(*c, N, lam) for c in fixed[w]] for w in arms}, curves[lam]) for lam in args.prices}


def table(args):
    print(f"speculative window bandit ({args.policy}, drafter {args.drafter}, arms {tuple(args.arms)}, 4 time buckets), "
          f"N = {args.steps}, n = {args.n} per batch, CPU")
    head = (f"{'model':>8} {'D':>4} {'λ':>5} " + " ".join(f"{'W=' + str(w):>6}" for w in args.arms)
            + f" {'best':>6} " + " ".join(f"{'after ' + str(k):>8}" for k in WARMUPS)
            + f" {'ratio@4':>7} {'ratio@8':>7} {'regret':>7}  learnt window per t-bucket (t=0→1)")
    print(head + "\n" + "-" * len(head), flush=True)
    for name in args.models:
        out = hindsight(name, args)
        if out is None:
            continue
        D, by_price = out
        if args.plot:
            plot(name, by_price, Path(args.plot) / f"bandit_{name}.png")
        for lam, (fixed, curve) in by_price.items():
            mean = {w: sum(c) / len(c) for w, c in fixed.items()}
            best_w = min(mean, key=mean.get)
            best_b = [min(fixed[w][b] for w in fixed) for b in range(BATCHES)]  # per batch, in hindsight
            ratio = [curve[b][0] / best_b[b] for b in range(BATCHES)]
            regret = sum(curve[b][0] - best_b[b] for b in range(BATCHES))
            print(f"{name:>8} {D:4d} {lam:5.2f} " + " ".join(f"{mean[w]:6.3f}" for w in args.arms)
                  + f" {'W=' + str(best_w):>6} " + " ".join(f"{curve[k][0]:8.3f}" for k in WARMUPS)
                  + f" {ratio[4]:7.3f} {ratio[8]:7.3f} {regret:7.3f}  {curve[-1][1]}", flush=True)


def plot(name: str, by_price: dict, path: Path) -> None:
    """Regret per batch (bandit − best fixed window on that batch) and the learnt schedule after the last batch
    (per time bucket: the window chosen, annotated with its mean reward), one line per λ."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from e
    fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(10, 3.6))
    for lam, (fixed, curve) in by_price.items():
        best = [min(fixed[w][b] for w in fixed) for b in range(len(curve))]
        ax_r.plot(range(len(curve)), [c[0] - b for c, b in zip(curve, best)], marker="o", label=f"λ = {lam:g}")
        learnt = curve[-1][2]
        buckets = sorted(int(k[6:].split("/")[0]) for k in learnt if k.endswith("/arm"))
        arms = [learnt[f"bucket{i}/arm"] for i in buckets]
        line, = ax_s.step(buckets, arms, where="mid", marker="s", label=f"λ = {lam:g}")
        for i, a in zip(buckets, arms):
            ax_s.annotate(f"{learnt[f'bucket{i}/reward']:.2f}", (i, a), textcoords="offset points", xytext=(0, 5),
                          ha="center", fontsize=7, color=line.get_color())
    ax_r.axhline(0, color="grey", lw=0.8)
    ax_r.set(xlabel="batch", ylabel="cost − best fixed (per step)", title=f"{name}: regret per batch")
    ax_s.set(xlabel="time bucket (t = 0 → 1)", ylabel="window chosen", yscale="log", title="learnt schedule "
             "(mean reward annotated)")
    ax_s.set_yticks(sorted({w for _, (fixed, _) in by_price.items() for w in fixed}))
    ax_s.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_s.minorticks_off()
    ax_s.set_xticks(range(max(len(c[-1][2]) // 2 for _, c in by_price.values())))
    for ax in (ax_r, ax_s):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")  # written whole or not at all
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)
    print(f"plot: {path}")


def price(args):
    """λ implied by the time of a (W+1)·B-row call against a B-row call, for the configs' networks."""
    import yaml

    from specflow.generate import sample_shape
    from specflow.nets import build_net

    print(f"{'config':>14} {'B':>4} {'W':>3} {'T(B) ms':>8} {'T((W+1)B) ms':>12} {'ratio':>6} {'λ':>6}   "
          f"({torch.get_num_threads()} threads)")
    for cfg in args.configs:
        model = yaml.safe_load(Path(cfg).read_text())["model"]
        net = build_net(model.get("arch", "unet"), **model["net"]).eval()
        shape, classes = sample_shape(net), model["net"].get("num_classes")
        for B in args.price_batches:
            for W in (4, 8):
                times = []
                for rows in (B, (W + 1) * B):
                    x = torch.randn(rows, *shape)
                    t = torch.rand(rows)
                    c = None if classes is None else torch.randint(0, classes, (rows,))
                    args_ = (x, t) if c is None else (x, t, c)
                    with torch.no_grad():
                        net(*args_)  # warm-up
                        t0, reps = time.perf_counter(), 0
                        while reps < 3 or time.perf_counter() - t0 < 0.5:
                            net(*args_)
                            reps += 1
                    times.append((time.perf_counter() - t0) / reps)
                r = times[1] / times[0]
                print(f"{Path(cfg).stem:>14} {B:4d} {W:3d} {times[0] * 1e3:8.2f} {times[1] * 1e3:12.2f} {r:6.2f} "
                      f"{(r - 1) / (W + 1):6.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["toy16", "toy64"])
    ap.add_argument("--prices", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    ap.add_argument("--arms", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--drafter", default="extrapolate")
    ap.add_argument("--draft-suffix", default="", help="read runs/<model>_draft<suffix> (e.g. _mse)")
    ap.add_argument("--policy", default="thompson", choices=["ucb1", "thompson"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("-n", type=int, default=256, help="samples per batch")
    ap.add_argument("--price", action="store_true", help="measure the λ this machine implies instead")
    ap.add_argument("--plot", default=None, metavar="DIR", help="also write DIR/bandit_<model>.png: regret per "
                    "batch and the learnt schedule (needs matplotlib)")
    ap.add_argument("--configs", nargs="+", default=["configs/digits.yaml", "configs/fashion.yaml"])
    ap.add_argument("--price-batches", type=int, nargs="+", default=[1, 8, 64])
    args = ap.parse_args()
    price(args) if args.price else table(args)


if __name__ == "__main__":
    main()
