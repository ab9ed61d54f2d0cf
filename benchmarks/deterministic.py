"""Deterministic accelerations (sfm, rca, fastflow) against euler-N and equal-NFE baselines.

    python benchmarks/deterministic.py [--steps 50 100] [--batch 256] [--device cpu] [--models toy2 toy64]
                                       [--ckpt digits.ckpt] [--guidance 1 3] [--warmup 4]

One table per (model, N). Rows: euler-N (the reference the accelerations approximate), each accelerated
run, then the honest baselines — euler and ab2 with round(total_nfe) steps and heun with round(total_nfe/2)
steps (heun pays 2 calls per step) for every accelerated run's cost, ab2 and heun on each grid of
``--schedules`` (uniform, quadratic: denser near t = 1, edm: Karras's ρ = 7, dense at both ends). Columns:
  total_nfe, seq_nfe     target rows per sample / batched target calls (stats, counted by the Evaluator)
  acc                    sfm acceptance rate of checked leaps
  err_eN / psnr_eN       relative L2 error vs euler-N (PSNR in data space [-1, 1] for image models)
  err_fine / psnr_fine   relative L2 error (and PSNR for image models) vs heun with 4N steps (the fine reference;
                         with --front, heun with 4× the largest N of --steps, one reference for every table)
  time                   wall time / wall time of euler-N, same process, same batch
  med_fine               the median over samples of each sample's relative error vs the fine reference (the
                         batch's err_fine is carried by its few worst samples; ``--metric median`` compares on this)
With --front and several --steps the points of every N are also pooled: each bandit point against the fixed
leaps' fronts over all N, and each policy's Pareto front over all its knobs (N, tol, μ) against the fixed leaps'
(N, L, tol, check) — the best fixed leap a user could have chosen in hindsight. The fronts compare err_fine, or
med_fine with ``--metric median``.
Bandit samplers (sfm leap=bandit, fastflow) learn online: they first see ``--warmup`` other batches (fastflow's
first one calibrates μ), then the table batch. rca is lossy by design (no check, no fallback).
Models: toy2 / toy64 are the analytic mixture's exact velocity (dim 2; dim 64 shaped 1x8x8 with means of
norm 2, i.e. pixel scale ~0.25, reported with PSNR); --ckpt loads a trained TargetFlow (EMA net), sampled with
each classifier-free guidance scale of --guidance (1: the plain conditional model).
"""
import argparse
import math
import re
import time
import zlib

import torch

from specflow.data.toy import GaussianMixture
from specflow.sampling import build_sampler

ACCEL = [  # (label, sampler, options, learns online)
    ("sfm L2 tol.05", "sfm", dict(leap=2, tol=0.05), False),
    ("sfm L4 tol.1", "sfm", dict(leap=4, tol=0.1), False),
    ("sfm L4 tol.2", "sfm", dict(leap=4, tol=0.2), False),
    ("sfm bandit tol.05", "sfm", dict(leap="bandit", tol=0.05), True),
    ("sfm ab2 L2 tol.05", "sfm", dict(leap=2, tol=0.05, base="ab2"), False),
    ("sfm ab2 L4 tol.05", "sfm", dict(leap=4, tol=0.05, base="ab2"), False),
    ("sfm ab2 L8 tol.05", "sfm", dict(leap=8, tol=0.05, base="ab2"), False),
    ("sfm ab2 L4 tol.2", "sfm", dict(leap=4, tol=0.2, base="ab2"), False),
    ("sfm ab2 bandit tol.05", "sfm", dict(leap="bandit", tol=0.05, base="ab2"), True),
    ("sfm bandit(1,2,4) tol.1", "sfm", dict(leap="bandit", arms=(1, 2, 4), tol=0.1), True),
    ("sfm ab2 bandit ucb1 tol.05", "sfm", dict(leap="bandit", tol=0.05, base="ab2", policy="ucb1"), True),
    ("rca L2 (lossy)", "rca", dict(leap=2), False),
    ("rca L4 (lossy)", "rca", dict(leap=4), False),
    ("fastflow", "fastflow", dict(), True),
    ("fastflow mu x3", "fastflow", dict(mu_scale=3.0), True),
    ("fastflow ab2", "fastflow", dict(base="ab2"), True),
    ("fastflow ab2 mu x3", "fastflow", dict(base="ab2", mu_scale=3.0), True),
]

MUS = (10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)  # the accept-all bandit's μ, half a decade apart
FRONT_TOLS = {"x1": (0.01, 0.02, 0.05, 0.1, 0.2), "local": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)}


def front_rows(checks=("x1", "local")):
    """``--front``: sfm (base ab2) with each fixed leap and with the leap bandit (calls only, μ = 0; and error-
    priced: μ calibrated with the x1 check, μ = 4/tol with the local check) at every tol of each check, and the
    bandit with no check over μ — the error/NFE front of each policy, which tol (or μ) sweeps."""
    # accept-all (tol = inf): a leap's fewest calls, so every front's cheapest point is a true floor
    rows = [(f"front sfm ab2 L{L} accept-all", "sfm", dict(leap=L, tol=math.inf, base="ab2"), False)
            for L in (2, 4, 8)]
    # the bandit with no check at all: its price of error alone controls the error. μ given (not calibrated on
    # base-N, which ties it to N): a leap is worth taking while its error stays below ~1/(2μ), so μ is the knob
    rows += [(f"front sfm ab2 bandit priced {pol} accept-all mu{m:g}", "sfm",
              dict(leap="bandit", tol=math.inf, check="local", base="ab2", mu=float(m), policy=pol), True)
             for pol in ("thompson", "ucb1") for m in MUS]
    for check in checks:
        for tol in FRONT_TOLS[check]:
            t = ("" if check == "x1" else "local ") + f"tol{tol:g}".replace("0.", ".")
            o = dict(tol=tol, base="ab2", check=check)
            rows += [(f"front sfm ab2 L{L} {t}", "sfm", dict(leap=L, **o), False) for L in (2, 4, 8)]
            rows += [(f"front sfm ab2 bandit mu0 {t}", "sfm", dict(leap="bandit", mu=0.0, **o), True)]
            if check == "x1":  # μ calibrated on a base-N batch
                rows += [(f"front sfm ab2 bandit {t}", "sfm", dict(leap="bandit", **o), True)]
            else:  # μ = 4/tol (sfm.LOCAL_MU_TOL): with the accept-all rows above, one priced policy per bandit policy
                rows += [(f"front sfm ab2 bandit priced {pol} {t}", "sfm", dict(leap="bandit", policy=pol, **o), True)
                         for pol in ("ucb1", "thompson")]
    # rca has no tol: its fixed leaps are its front; its bandit (Thompson, μ calibrated) is held against them
    rows += [(f"front rca L{L}", "rca", dict(leap=L), False) for L in (1, 2, 4, 8)]
    rows += [("front rca bandit", "rca", dict(leap="bandit"), True),
             ("front rca bandit ucb1", "rca", dict(leap="bandit", policy="ucb1"), True)]
    return rows


DRAFT_ROWS = [  # with --draft (a small-net draft of the --ckpt target): the leap drafted by the anchored drafter
    ("sfm ab2 L2 tol.05 anchored", "sfm", dict(leap=2, tol=0.05, base="ab2", drafter="anchored"), False),
    ("sfm ab2 L4 tol.05 anchored", "sfm", dict(leap=4, tol=0.05, base="ab2", drafter="anchored"), False),
    ("sfm ab2 L4 tol.2 anchored", "sfm", dict(leap=4, tol=0.2, base="ab2", drafter="anchored"), False),
    ("sfm ab2 bandit tol.05 anchored", "sfm", dict(leap="bandit", tol=0.05, base="ab2", drafter="anchored"), True),
    ("rca L2 anchored (lossy)", "rca", dict(leap=2, drafter="anchored"), False),
    ("rca L4 anchored (lossy)", "rca", dict(leap=4, drafter="anchored"), False),
]


def load_model(name: str, args, guidance: float | None = None):
    """(velocity model, sample shape, dtype, cond maker, is_image); ``guidance`` wraps a checkpoint's net."""
    if name == "toy2":
        return GaussianMixture.default(dim=2), (2,), torch.float64, None, False
    if name == "toy64":
        gm = GaussianMixture.default(dim=64)
        gm.means = gm.means.to(args.device)
        gm.stds, gm.weights = gm.stds.to(args.device), gm.weights.to(args.device)
        return gm, (1, 8, 8), torch.float64, None, True
    from specflow.lit.target import TargetFlow  # only the checkpoint path needs Lightning

    lit = TargetFlow.load_from_checkpoint(name, map_location=args.device)
    net = lit.velocity_model(ema=True).to(args.device)
    hp = lit.hparams.net or {}
    shape = (hp.get("in_channels", 1), hp.get("image_size", 8), hp.get("image_size", 8))
    ncls = lit.num_classes
    cond = (lambda B, g: torch.randint(0, ncls, (B,), generator=g).to(args.device)) if ncls else None
    if guidance is not None and guidance != 1:
        from specflow.lit.guidance import guidance as guided

        net = guided(net, guidance)
    return net, shape, torch.float32, cond, True


def warmup_generator(seed: int, label: str) -> torch.Generator:
    """The generator of a learning row's warm-up batches, from --seed and the row's label alone: an ``--only``
    subset reproduces the full run's rows (logs written before this drew warm-ups from one generator shared by
    the rows in turn, so their bandit rows depended on the rows run before them)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(label.encode()))


def timed(sampler, model, x0, cond, draft=None):
    res = sampler.sample(model, x0, cond=cond, draft=draft if sampler.needs_draft else None)
    return res, res.stats.wall_time_s


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


def sample_errors(a, b):
    """Each sample's own relative error (a tensor, one per sample)."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def median_error(a, b) -> float:
    """The median over samples of each sample's own relative error: unlike the batch's, not carried by its few
    worst samples (on Fashion-MNIST, batch 32, the worst 3 carry 21–76 % of the batch error's square)."""
    return float(sample_errors(a, b).median())


def error(a, b, image):
    rel = relative_error(a, b)
    if not image:
        return f"{rel:.2e}"
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return f"{rel:.2e} / {10 * math.log10(4 / max(mse, 1e-30)):5.1f}dB"


def table(model_name, N, args, guidance=None):
    """One table (prints it); returns {label: (total NFE, relative error vs the fine reference)}."""
    model, shape, dtype, make_cond, image = load_model(model_name, args, guidance)
    g = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(args.batch, *shape, generator=g, dtype=dtype).to(args.device)
    cond = make_cond(args.batch, g) if make_cond else None
    # --front: one reference for every N (heun with 4× the largest), so the fronts can be pooled over N
    M = 4 * (max(args.steps) if args.front else N)
    key = (model_name, guidance, M)
    if key not in args.fine:
        args.fine[key] = build_sampler("heun", steps=M).sample(model, x0, cond=cond).samples
    fine = args.fine[key]
    rows, measured = [], {}  # measured: label → (total NFE, relative error vs the fine reference)

    def add(label, res, ref_time):
        s = res.stats
        med = median_error(res.samples, fine)
        measured[label] = (s.total_nfe, med if args.metric == "median" else relative_error(res.samples, fine))
        acc = "" if math.isnan(s.acceptance_rate) else f"{s.acceptance_rate:.2f}"
        rows.append((label, f"{s.total_nfe:.1f}", str(s.sequential_nfe), acc, error(res.samples, eN, image),
                     error(res.samples, fine, image), f"{s.wall_time_s / ref_time:.2f}",
                     f"{med:.2e}"))

    build_sampler("euler", steps=N).sample(model, x0, cond=cond)  # warm-up (allocator, threads)
    res_eN, t_eN = min((timed(build_sampler("euler", steps=N), model, x0, cond) for _ in range(3)),
                       key=lambda r: r[1])
    eN = res_eN.samples
    add(f"euler-{N} (reference)", res_eN, t_eN)
    costs = []
    draft = None
    if args.draft:  # checked against the target it was trained for (a mismatch is a clear error)
        from specflow.checkpoint import load_draft, load_target
        draft = load_draft(args.draft, load_target(model_name, args.device))
    runs = front_rows(args.front) if args.front else ACCEL + (DRAFT_ROWS if draft is not None else [])
    for label, name, opts, learns in runs:
        if args.only and label not in args.only:
            continue
        try:
            s = build_sampler(name, steps=N, **opts)
        except ValueError as e:
            rows.append((label, "n/a: " + str(e)[:60], "", "", "", "", "", ""))
            continue
        if learns:  # warm-ups of the row's own (so a row's figures do not depend on the rows run before it)
            gw = warmup_generator(args.seed, label)
            for w in range(args.warmup):
                xw = torch.randn(args.batch, *shape, generator=gw, dtype=dtype).to(args.device)
                s.sample(model, xw, cond=make_cond(args.batch, gw) if make_cond else None, draft=draft)
        res, _ = timed(s, model, x0, cond, draft)
        add(label, res, t_eN)
        costs.append(res.stats.total_nfe)
    done = set()
    for c in sorted(costs):
        rivals = (("ab2", round(c)),) if args.front else (("euler", round(c)), ("ab2", round(c)),
                                                           ("heun", max(1, round(c / 2))))
        for name, M in rivals:
            for sched in args.schedules:
                if (name, M, sched) in done or M < 1 or (name == "euler" and sched != "uniform"):
                    continue
                done.add((name, M, sched))
                res, _ = timed(build_sampler(name, steps=M, schedule=sched), model, x0, cond)
                add(f"  {name}-{M}" + ("" if sched == "uniform" else f" {sched}"), res, t_eN)
    err_col, fine_col = ("err_eN / psnr_eN", "err_fine / psnr_fine") if image else ("err_eN", "err_fine")
    head = ("method", "total_nfe", "seq_nfe", "acc", err_col, fine_col, "time", "med_fine")
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    gs = "" if guidance is None else f", guidance {guidance:g}"
    print(f"\n### {model_name}{gs}, N = {N}, batch {args.batch}, {args.device}, dtype {str(dtype)[6:]}")
    for r in [head] + rows:
        print("  ".join(str(v).ljust(w[i]) for i, v in enumerate(r)))
    if args.front:
        print_front(measured)
    return measured


def pareto_points(points):
    """The points (NFE, error, …) no other point beats on both: by NFE, each more accurate than every cheaper one."""
    pareto, best = [], math.inf
    for p in sorted(points):
        if p[1] < best:
            pareto.append(p)
            best = p[1]
    return pareto


def front_nfe(points, err):
    """The fewest calls with which a policy reaches error ``err``: its Pareto points (no other point both cheaper
    and more accurate; error is not monotone in tol, so not joined in tol order) joined linearly in log error.
    Above its cheapest point's error: that point's NFE — a true floor for a fixed leap, whose cheapest point is
    accept-all (no run of that leap is cheaper). None below its most accurate point's error."""
    pareto = pareto_points(points)
    le = math.log(err)
    for (n0, e0), (n1, e1) in zip(pareto, pareto[1:]):
        if math.log(e1) <= le <= math.log(e0):
            return n0 + (n1 - n0) * (math.log(e0) - le) / (math.log(e0) - math.log(e1))
    if pareto and err >= pareto[0][1]:  # as inaccurate as its cheapest point, or worse: that point's cost
        return pareto[0][0]
    return None


def print_front(measured, title="bandit point vs the fixed leaps' fronts at equal error"):
    """Each bandit point against the best fixed leap's front at its error (``--front``): the goal is a ratio
    NFE / front NFE ≤ 1 — as few calls per step as the best fixed leap at equal error. The plain ab2 rival's
    front (one per grid) is shown beside them."""
    fixed, by_check = {}, {}  # a fixed leap's front pools its points of every check and tol
    for label, (n, e) in measured.items():
        label = re.sub(r" N\d+$", "", label)  # pooled over N: a leap's (or a grid's) points of every N
        if label.startswith("front rca L"):  # one point per leap: their front joins the leaps (stricter than
            fixed.setdefault("rca fixed", []).append((n, e))  # any single one, and the only way to equal error)
        if label.startswith("front sfm ab2 L"):
            fixed.setdefault(label.split()[3], []).append((n, e))
            check = "accept-all" if label.endswith("accept-all") else "local" if " local " in label else "x1"
            by_check.setdefault(check, []).append((label, n, e))
        elif label.strip().startswith("ab2-"):  # the plain rival, one front per grid
            fixed.setdefault(" ".join(["ab2"] + label.split()[1:]), []).append((n, e))
    print(f"\n{title} (each front: a leap's Pareto points over tol and check, NFE interpolated in log error)")
    for label, (n, e) in measured.items():
        if "bandit" not in label:
            continue
        mine = "rca" if label.startswith("front rca") else "L"  # a bandit against its own sampler's fixed leaps
        at = {L: front_nfe(p, e) for L, p in fixed.items() if L.startswith("ab2") or L.startswith(mine)}
        leaps = [(v, L) for L, v in at.items() if v is not None and not L.startswith("ab2")]
        best = min(leaps) if leaps else None
        fronts = "  ".join(f"{L} {v:.1f}" if v is not None else f"{L} –" for L, v in sorted(at.items()))
        verdict = "outside every front" if best is None else f"best {best[1]}: ratio {n / best[0]:.3f}"
        print(f"  {label:32s} NFE {n:5.1f} err {e:.2e} | fronts: {fronts} | {verdict}")
    if len(by_check) < 2:
        return
    ab2 = [p for k, p in fixed.items() if k.startswith("ab2")]
    print("\nthe checks compared: each check's Pareto points (fixed leaps, any L and tol) and the NFE the other "
          "check's front and ab2's need for the same error")
    fronts = {c: [(n, e) for _, n, e in pts] for c, pts in by_check.items()}
    for c, pts in by_check.items():
        for label, n, e in sorted(pts, key=lambda p: p[1]):
            if any(n2 <= n and e2 < e or n2 < n and e2 <= e for _, n2, e2 in pts):
                continue  # dominated within its own check
            others = "  ".join(f"{o} {v:.1f}" if (v := front_nfe(fronts[o], e)) is not None else f"{o} –"
                               for o in fronts if o != c)
            best_ab2 = [v for p in ab2 if (v := front_nfe(p, e)) is not None]
            print(f"  {label:32s} NFE {n:5.1f} err {e:.2e} | {others} | ab2 "
                  + (f"{min(best_ab2):.1f}" if best_ab2 else "–"))


def _family(label: str) -> tuple[str, str]:
    """(a policy's family, the knobs that set this point): a bandit's rows of every N and tol (and μ, for the
    accept-all bandit) are one policy; the fixed leaps of every L, N, tol and check are "sfm fixed leaps"."""
    if label.startswith("front sfm ab2 L"):
        return "sfm fixed leaps", label[len("front sfm ab2 "):]
    if label.startswith("front rca L"):
        return "rca fixed leaps", label[len("front rca "):]
    if label.strip().startswith("ab2-"):
        return "ab2 (any grid)", label.strip()
    toks = label.split()  # the priced bandits' knobs: N, μ and the check (none, or local at tol = 4/μ)
    priced = "priced" in toks

    def knob(w):
        return re.fullmatch(r"N\d+|tol\S*", w) or (priced and re.fullmatch(r"mu\S+|local|accept-all", w))
    return " ".join(w for w in toks if not knob(w)), " ".join(w for w in toks if knob(w))


def print_families(measured):
    """Each bandit policy's Pareto front over all its knobs (N, tol, μ) against the best fixed leap's over all of
    its own (N, L, tol, check) — the user picks every knob, so "as good as the best fixed leap in hindsight" is
    front against front: at each Pareto point of the policy, the NFE the fixed front needs for that error."""
    fam = {}
    for label, (n, e) in measured.items():
        f, knobs = _family(label)
        fam.setdefault(f, []).append((n, e, knobs))
    pts = lambda f: [(n, e) for n, e, _ in fam.get(f, [])]
    print("\neach policy's Pareto front over all its knobs against the fixed leaps' and ab2's (any N, L, tol, check;"
          " any grid)")
    for f, points in fam.items():
        if "bandit" not in f:
            continue
        rival = "rca fixed leaps" if f.startswith("front rca") else "sfm fixed leaps"
        pareto, ratios = pareto_points(points), []
        print(f"  {f}: {len(pareto)} Pareto points of {len(points)}")
        for n, e, knobs in pareto:
            v, a = front_nfe(pts(rival), e), front_nfe(pts("ab2 (any grid)"), e)
            if v is not None:
                ratios.append(n / v)
            print(f"    NFE {n:5.1f} err {e:.2e} ({knobs:>14}) | {rival} "
                  + (f"{v:5.1f} ratio {n / v:.2f}" if v is not None else "  –  (beyond its front)")
                  + " | ab2 " + (f"{a:5.1f}" if a is not None else "–"))
        if ratios:
            print(f"    ratio ≤ 1 at {sum(r <= 1 for r in ratios)} of {len(ratios)} points "
                  f"(median {sorted(ratios)[len(ratios) // 2]:.2f})")


def pooled_from_log(*paths: str, metric: str = "batch") -> dict:
    """{label N<n>: (total NFE, err_fine, or med_fine with metric="median")} from the tables ``--front`` runs printed
    (``--pool``): the tables they finished, e.g. of a run stopped before its largest N. A run's reference (heun, 4×
    the largest N of its --steps) is the same for every table, so the points pool as the run itself would have
    pooled them; several logs pool alike if their runs share model, --steps, --batch and --seed (a later log's row
    replaces an earlier one of the same label: e.g. bandit rows rerun after a change, against the first run's fixed
    leaps)."""
    measured = {}
    for path in paths:
        measured.update(_rows_of_log(path, metric))
    return measured


def _rows_of_log(path: str, metric: str = "batch") -> dict:
    measured, N = {}, None
    # label, total_nfe, err_eN, err_fine, and med_fine where the log has it (last column; logs before it: none)
    row = re.compile(r"^(.+?)\s{2,}(\d+(?:\.\d+)?)\s.*?\s([\d.]+e[+-]\d+)\b.*?\s([\d.]+e[+-]\d+)\b"
                     r".*?(?:\s([\d.]+e[+-]\d+))?\s*$")
    for line in open(path):
        if line.startswith("### "):  # a table's header (a pooled one has no ", batch")
            n = re.search(r", N = (\d+), batch", line)
            N = int(n.group(1)) if n else None
        elif not line.strip():  # a table ends at its first blank line
            N = None
        elif N is not None and not line.startswith(("method", "euler-")) and (m := row.match(line)):
            if metric == "median" and m.group(5) is None:
                raise ValueError(f"{path} has no med_fine column (written before it existed): pool it with "
                                 "--metric batch, or rerun its rows")
            measured[f"{m.group(1).rstrip()} N{N}"] = (float(m.group(2)),
                                                       float(m.group(5 if metric == "median" else 4)))
    return measured


def print_pooled(measured):
    print_front(measured, "bandit point vs the fixed leaps' fronts pooled over N at equal error")
    print_families(measured)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="*", default=["toy2", "toy64"], help="toy2 toy64 (none: only --ckpt)")
    p.add_argument("--ckpt", default=None, help="a TargetFlow checkpoint (e.g. the trained digits UNet)")
    p.add_argument("--draft", default=None, help="a small-net draft of --ckpt: adds the anchored-drafter rows")
    p.add_argument("--guidance", type=float, nargs="+", default=[None],
                   help="classifier-free guidance scales for --ckpt (1 = the conditional model)")
    p.add_argument("--warmup", type=int, default=4, help="batches the online-learning samplers see first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    p.add_argument("--schedules", nargs="+", default=["uniform"], choices=["uniform", "quadratic", "edm"],
                   help="time grids of the ab2/heun rivals (the best in hindsight is the honest rival)")
    p.add_argument("--front", nargs="*", choices=list(FRONT_TOLS), default=None, metavar="CHECK",
                   help="sfm's fixed leaps and leap bandits over tol, for each check named (none: x1 and local; "
                   f"tols {FRONT_TOLS}): each bandit point against the fixed leaps' error/NFE fronts")
    p.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                   help="a subset of the accelerated rows, by label: " + "; ".join(a[0] for a in ACCEL + DRAFT_ROWS))
    p.add_argument("--metric", choices=["batch", "median"], default="batch",
                   help="the error the fronts compare: the batch's relative error (err_fine) or the median of the "
                   "samples' own (med_fine)")
    p.add_argument("--pool", nargs="+", default=None, metavar="LOG",
                   help="print the pooled fronts of the tables --front runs wrote to LOG … (e.g. one stopped early; "
                   "several: runs with the same model, --steps, --batch and --seed, a later log's rows replacing "
                   "an earlier one's)")
    args = p.parse_args()
    if args.pool:
        try:
            measured = pooled_from_log(*args.pool, metric=args.metric)
        except ValueError as e:
            p.error(str(e))
        print_pooled(measured)
        return
    labels = {a[0] for a in ACCEL + DRAFT_ROWS + front_rows()}
    if args.only and set(args.only) - labels:
        p.error(f"unknown --only labels {sorted(set(args.only) - labels)}")
    if args.front == []:
        args.front = list(FRONT_TOLS)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.fine = {}
    runs = [(m, None) for m in args.models] + [(args.ckpt, g) for g in (args.guidance if args.ckpt else [])]
    for m, g in runs:
        joint = {}
        for N in args.steps:
            joint.update({f"{label} N{N}": v for label, v in table(m, N, args, g).items()})
        if args.front and len(args.steps) > 1:  # the user picks N too: every policy's front over N and its knobs
            gs = "" if g is None else f", guidance {g:g}"
            print(f"\n### {m}{gs}, N = {' '.join(map(str, args.steps))} pooled")
            print_pooled(joint)


if __name__ == "__main__":
    main()
