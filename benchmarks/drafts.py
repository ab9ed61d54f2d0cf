"""Training-free vs trained drafters on a trained digits target: a table, printed.

    python benchmarks/drafts.py                                   # runs/digits, runs/digits_draft, runs/digits_medusa
    python benchmarks/drafts.py --target T.ckpt --draft-model D.ckpt --draft-medusa M.ckpt --device cuda

speculative (exact, η = 1) vs sde on the same grid N; sfm (deterministic) vs euler-N from the same noise.
Columns:
  accept     accepted / proposed draft steps          seq/N     sequential target calls / N (one batch)
  total/N    target rows per sample / N               draft/N   draft rows per sample / N
  PSNR       sfm vs euler-N from the same noise (data range [-1, 1]); the 'euler-M' line under each sfm
             line is the honest baseline: plain euler with as many target calls as that sfm run used.
FLOPs per sample (torch.utils.flop_counter) of the target, the small draft net and the Medusa heads head the table.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from specflow.checkpoint import load_draft, load_target
from specflow.generate import generate, sample_shape
from specflow.sampling import build_sampler


def flops(f, *args, **kwargs) -> float:
    with FlopCounterMode(display=False) as fc:
        f(*args, **kwargs)
    return fc.get_total_flops()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="runs/digits/checkpoints/last.ckpt")
    ap.add_argument("--draft-model", default="runs/digits_draft/checkpoints/last.ckpt")
    ap.add_argument("--draft-medusa", default="runs/digits_medusa/checkpoints/last.ckpt")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("-n", type=int, default=256, help="samples, one batch")
    ap.add_argument("--windows", nargs="+", default=["8"], help="speculative windows (ints or 'bandit')")
    ap.add_argument("--leaps", nargs="*", default=["4", "bandit"], help="sfm leaps (ints or 'bandit'; none: no sfm rows)")
    ap.add_argument("--tol", type=float, default=0.05, help="sfm tolerance")
    ap.add_argument("--drafters", nargs="+", default=["frozen", "extrapolate", "model", "medusa"])
    ap.add_argument("--no-baselines", action="store_true", help="skip the sde / euler-M rows (faster reruns)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (sample.py --guidance)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)

    target = load_target(args.target, args.device)
    drafts = {"model": load_draft(args.draft_model, target), "medusa": load_draft(args.draft_medusa, target)}
    n, N, dev = args.n, args.steps, args.device
    win = lambda w: w if w == "bandit" else int(w)  # noqa: E731

    # FLOPs per sample (batch of 1, on the CPU copy of each net).
    x = torch.randn(1, *sample_shape(target), device=dev)
    t, y = torch.full((1,), 0.5, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    with torch.no_grad():
        f_t = flops(target, x, t, y)
        f_d = flops(drafts["model"], x, t, y)
        h = target.features(x, t, y)
        f_h = flops(drafts["medusa"], x, t + 0.01, None, features=h, x_src=x, t_src=t, x1_src=x)
    print(f"target {args.target} (fingerprint {target.specflow.fingerprint}, step {target.specflow.global_step})")
    print(f"FLOPs/sample: target {f_t / 1e6:.1f}M, draft net {f_d / 1e6:.1f}M ({f_t / f_d:.1f}x fewer), "
          f"medusa heads {f_h / 1e6:.1f}M ({f_t / f_h:.1f}x fewer)")
    print(f"n = {n} samples in one batch, N = {N}, labels cycle, guidance {args.guidance}, device {dev}\n")

    def run(name, draft=None, **opts):
        s = build_sampler(name, steps=N, **opts)
        t0 = time.perf_counter()
        g = generate(target, s, n, n, args.seed, "cycle", args.guidance, draft, dev)
        return g, time.perf_counter() - t0

    print(f"{'sampler':>12} {'drafter':>12} {'window':>7} {'accept':>7} {'seq/N':>6} {'total/N':>8} "
          f"{'draft/N':>8} {'wall s':>7}")
    rows = [] if args.no_baselines else [("sde", None, {})]
    rows += [("speculative", d, dict(drafter=d, window=win(w))) for w in args.windows for d in args.drafters]
    for name, d, opts in rows:
        g, wall = run(name, drafts.get(d), **opts)
        st = g.stats
        print(f"{name:>12} {d or '-':>12} {str(opts.get('window', '-')):>7} {st.acceptance_rate:7.3f} "
              f"{st.sequential_nfe / N:6.3f} {st.total_nfe / N:8.3f} {st.draft_nfe / N:8.3f} {wall:7.1f}", flush=True)

    if not args.leaps:
        return
    print(f"\n{'sampler':>12} {'drafter':>12} {'leap':>7} {'accept':>7} {'seq/N':>6} {'total/N':>8} "
          f"{'draft/N':>8} {'PSNR':>6} {'wall s':>7}")
    ref, wall = run("euler")
    print(f"{'euler':>12} {'-':>12} {'-':>7} {'':>7} {1.0:6.3f} {1.0:8.3f} {0.0:8.3f} {'ref':>6} {wall:7.1f}")
    for leap in args.leaps:
        for d in args.drafters:
            g, wall = run("sfm", drafts.get(d), drafter=d, leap=win(leap), tol=args.tol)
            st = g.stats
            print(f"{'sfm':>12} {d:>12} {leap:>7} {st.acceptance_rate:7.3f} {st.sequential_nfe / N:6.3f} "
                  f"{st.total_nfe / N:8.3f} {st.draft_nfe / N:8.3f} {psnr(g.samples, ref.samples):6.1f} {wall:7.1f}",
                  flush=True)
            M = max(1, round(st.total_nfe))  # the honest baseline: plain euler at sfm's cost
            if args.no_baselines:
                continue
            base = generate(target, build_sampler("euler", steps=M), n, n, args.seed, "cycle", args.guidance, None, dev)
            print(f"{'':>12} {'euler-' + str(M):>12} {'':>7} {'':>7} {M / N:6.3f} {M / N:8.3f} {0.0:8.3f} "
                  f"{psnr(base.samples, ref.samples):6.1f}", flush=True)

if __name__ == "__main__":
    main()
