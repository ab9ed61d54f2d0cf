"""Exact speculative sampling vs the ``sde`` baseline: a table, printed.

    python benchmarks/speculative.py                           # toy mixture, dims 2 and 16, N = 100
    python benchmarks/speculative.py --device cuda --dims 2 64
    python benchmarks/speculative.py --overhead --model unet --device cuda   # time outside the model
    python benchmarks/speculative.py --dispatch               # ops and host syncs per round (any device)

Toy table columns (one run each, same N and η as sde):
  accept   accepted / proposed draft steps      seq/N    sequential target calls / N (latency)
  total/N  target rows per sample / N (compute) wall×    wall time / sde's wall time (same process)
  p_energy, p_ks   two-sample tests of speculative vs sde (independent seeds): large = no detectable bias
Overhead mode (plain solvers, sfm, fastflow and speculative on one model, N = --steps; heun gets N/2 steps,
i.e. the same N target calls): ``outside`` = wall time minus the time inside model calls, as a share of wall.
On CUDA the time inside is read from CUDA events around each call (``--timer events``, the default: nothing
added to the run) or from the host clock between synchronisations around each call (``--timer sync``: an
upper bound on what the sampler adds; the H100 tables in RESULTS.md up to now used it). ``--per-sample``
seeds with one CPU generator per sample, as generate() and sample.py do.
Dispatch mode (same samplers, 256-d toy mixture, batch 64): per round, the aten ops the sampler dispatches
outside the model (≈ kernel launches when eager; CUDA graphs replay them as one launch each piece) and the
host syncs (device values read on the host: fetches + syncing ops). Counted by dispatch
(specflow/sampling/opcount.py), so a CPU run gives the same counts a GPU run would.
"""
from __future__ import annotations

import argparse
import time

import torch

from specflow.data.toy import GaussianMixture
from specflow.precision import autocast
from specflow.sampling import build_sampler
from specflow.sampling.noise import per_sample_generators


def make_model(name: str, dim: int, device: str):
    """(velocity model, shape of one sample). Plug other models in here."""
    if name == "toy":
        gm = GaussianMixture.default(dim=dim)
        gm.means, gm.stds, gm.weights = gm.means.to(device), gm.stds.to(device), gm.weights.to(device)
        return gm, (dim,)
    if name in ("unet", "unet+toy"):  # ~7M parameters, 16×16×1 (the digits model's shape), untrained
        from specflow.nets import build_net
        net = build_net("unet", image_size=16, in_channels=1, model_channels=64, channel_mult=(1, 2, 2),
                        num_classes=None)
        torch.nn.init.normal_(net.conv_out.weight, std=0.02)  # its zero-init head would make v ≡ 0
        net = net.to(device).eval()
        if name == "unet":
            return net, (1, 16, 16)
        # The UNet's full cost with the dynamics of a 256-d toy mixture, so that acceptance (hence the number
        # of rounds and the window fill) is that of a smooth, well-trained model rather than of random weights.
        gm, _ = make_model("toy", 256, device)
        return _Sum(net, gm), (1, 16, 16)
    if name.startswith("ckpt:"):  # a trained specflow target (e.g. ckpt:runs/fashion/checkpoints/last.ckpt), unguided
        from specflow.checkpoint import load_target
        from specflow.generate import sample_shape
        net = load_target(name[5:], device)
        return net, tuple(sample_shape(net))
    raise ValueError(f"unknown model {name!r}; valid: toy, unet, unet+toy, ckpt:<target checkpoint>")


class _Sum(torch.nn.Module):
    def __init__(self, net, gm):
        super().__init__()
        self.net, self.gm = net, gm

    def forward(self, x, t, cond=None):
        return self.net(x, t).mul_(0).add_(self.gm(x, t))


class Timed:
    """Wraps a model; ``seconds``: the time spent inside it. ``events`` (CUDA): CUDA events recorded around each
    call, read after the run — the GPU time from the model's start to its end, with no synchronisation
    added, so the sampler's own pipelining is left as it is. Otherwise the host clock between device
    synchronisations around each call: an upper bound on the time outside the model (a sync before each call
    waits out the sampler's queued kernels, which a real run overlaps with launching the model)."""

    def __init__(self, f, device, events: bool = False):
        cuda = str(device).startswith("cuda")
        self.f, self.total, self.events, self.pairs = f, 0.0, events and cuda, []
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    def __call__(self, x, t, cond=None):
        if self.events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            v = self.f(x, t) if cond is None else self.f(x, t, cond)
            end.record()
            self.pairs.append((start, end))
            return v
        self.sync()
        t0 = time.perf_counter()
        v = self.f(x, t) if cond is None else self.f(x, t, cond)
        self.sync()
        self.total += time.perf_counter() - t0
        return v

    @property
    def seconds(self) -> float:
        if self.pairs:
            torch.cuda.synchronize()
            self.total += sum(a.elapsed_time(b) for a, b in self.pairs) / 1000
            self.pairs.clear()
        return self.total


def energy_pvalue(a, b, perms=200, seed=0):
    """Permutation p-value of the energy distance (see tests/test_speculative.py)."""
    a, b = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    n, z = a.shape[0], torch.cat([a, b])
    g = torch.Generator().manual_seed(seed)
    w0 = torch.cat([torch.full((n,), 1.0 / n), torch.full((b.shape[0],), -1.0 / b.shape[0])]).double()
    W = w0[torch.stack([torch.arange(len(z))] + [torch.randperm(len(z), generator=g) for _ in range(perms)], 1)]
    quad = sum((W[i:i + 1000] * (torch.cdist(z[i:i + 1000], z) @ W)).sum(0) for i in range(0, len(z), 1000))
    return (1 + (-quad[1:] >= -quad[0]).sum().item()) / (perms + 1)


def ks_pvalue(a, b):
    from scipy import stats as sps  # only the toy table needs scipy
    a, b = a.flatten(1).cpu().numpy(), b.flatten(1).cpu().numpy()
    return min(1.0, min(sps.ks_2samp(a[:, i], b[:, i]).pvalue for i in range(a.shape[1])) * a.shape[1])


def run(name, model, noise, seed, **options):
    s = build_sampler(name, **options)
    if options.get("window") == "bandit":  # the bandit learns across batches: one warm-up batch
        s.sample(model, noise, generator=torch.Generator(noise.device).manual_seed(seed + 1000))
    res = s.sample(model, noise, generator=torch.Generator(noise.device).manual_seed(seed))
    return res


def energy_distance(a, b):
    """2·E|X − Y| − E|X − X'| − E|Y − Y'| (0 iff the laws agree): how far a sample set lies from another."""
    a, b = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def mode_spread(x, means):
    """RMS distance of each sample to its nearest mixture mean: blur (a coarse sampler) shows here first."""
    return torch.cdist(x.flatten(1).double().cpu(), means.cpu()).min(1).values.square().mean().sqrt().item()


def toy_table(args):
    print(f"toy mixture, N = {args.steps}, eta = {args.eta}, {args.samples} samples, device {args.device}")
    print("p_energy, p_ks: tests against sde-N (same law?); E_data: energy distance to exact data samples "
          "(lower is better); spread×: RMS distance to the nearest mode / the data's (1 = as sharp as the data)")
    head = (f"{'dim':>4} {'sampler':>12} {'window':>7} {'accept':>7} {'seq/N':>6} {'total/N':>8} "
            f"{'wall×':>6} {'p_energy':>9} {'p_ks':>6} {'E_data':>8} {'spread×':>8}")
    print(head)
    for dim in args.dims:
        model, shape = make_model("toy", dim, args.device)
        data = GaussianMixture.default(dim=dim).sample(args.samples, torch.Generator().manual_seed(99))  # CPU
        noise = lambda seed: torch.randn(args.samples, *shape, device=args.device, dtype=torch.float64,
                                         generator=torch.Generator(args.device).manual_seed(seed))
        run("sde", model, noise(0), 0, steps=args.steps, eta=args.eta)  # warm-up
        ref = run("sde", model, noise(1), 1, steps=args.steps, eta=args.eta)
        N = args.steps

        data_spread = mode_spread(data, model.means)

        def row(name, window, samples, st=None):
            """One line; ``st``: the run's stats (None for exact samples: no cost columns)."""
            if st is None:
                cost = f"{'-':>7} {'-':>6} {'-':>8} {'-':>6}"
            else:
                acc = "-" if st.proposed == 0 else f"{st.acceptance_rate:.3f}"
                cost = (f"{acc:>7} {st.sequential_nfe / N:6.2f} {st.total_nfe / N:8.2f} "
                        f"{st.wall_time_s / ref.stats.wall_time_s:6.2f}")
            tests = (("-", "-") if samples is ref.samples else
                     (f"{energy_pvalue(samples, ref.samples):.3f}", f"{ks_pvalue(samples, ref.samples):.3f}"))
            print(f"{dim:>4} {name:>12} {window:>7} {cost} {tests[0]:>9} {tests[1]:>6} "
                  f"{energy_distance(samples, data):8.4f} {mode_spread(samples, model.means) / data_spread:8.3f}")

        exact = GaussianMixture.default(dim=dim).sample(args.samples, torch.Generator().manual_seed(7))
        row("exact data", "-", exact)  # another draw of the data: what the columns read when nothing is wrong
        row(f"sde-{N}", "-", ref.samples, ref.stats)
        best = N
        for drafter in args.drafters:
            for window in args.windows:
                res = run("speculative", model, noise(2), 2, steps=N, eta=args.eta, drafter=drafter, window=window)
                best = min(best, res.stats.sequential_nfe)
                row(drafter, str(window), res.samples, res.stats)
        # The plain solvers at the best speculative row's sequential calls: what fewer steps alone would give
        # (sde: the same SDE, coarser; euler/ab2/heun: the ODE, deterministic — another law than sde's).
        for name, steps in [("sde", best), ("euler", best), ("ab2", best), ("heun", max(best // 2, 1))]:
            opts = dict(eta=args.eta) if name == "sde" else {}
            res = run(name, model, noise(2), 2, steps=steps, **opts)
            row(f"{name}-{steps}", "-", res.samples, res.stats)


def overhead(args):
    """Per sampler: NFE, wall time, time inside the model and the share outside it, plus wall time / sde's."""
    model, shape = make_model(args.model, args.dims[-1], args.device)
    params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0
    model = autocast(model, args.precision)  # the network in bf16/16 under autocast, the sampler in float32
    if args.compile_model:  # one CUDA graph per input shape (reduce-overhead): only fixed-shape samplers below
        model = torch.compile(model, mode="reduce-overhead", dynamic=False)
    for batch in args.batch:
        print(f"\nsampler overhead: {args.model} ({params / 1e6:.1f}M params), "
              f"batch {batch}, N = {args.steps}, device {_device_name(args.device)}"
              f"{', per-sample CPU generators' if args.per_sample else ''}"
              f"{f', model under {args.precision} autocast' if args.precision != '32' else ''}"
              f", time inside the model by "
              f"{'CUDA events' if args.timer == 'events' and str(args.device).startswith('cuda') else 'host clock'}")
        print(f"{'sampler':>12} {'options':>32} {'seq/N':>6} {'total/N':>8} {'rounds':>6} {'wall s':>7} "
              f"{'model s':>8} {'outside':>8} {'wall×sde':>8}")
        noise = torch.randn(batch, *shape, device=args.device, generator=torch.Generator(args.device).manual_seed(0))
        configs = [("sde", {}), ("euler", {}), ("ab2", {}), ("heun", dict(steps=args.steps // 2)),
                   ("sfm", dict(leap=4, tol=0.05)), ("fastflow", {})]
        if str(args.device).startswith("cuda"):
            configs += [("sfm", dict(leap=4, tol=0.05, cuda_graphs=False))]
        configs += [("speculative", dict(drafter=d, window=w)) for d in args.drafters for w in args.windows]
        if str(args.device).startswith("cuda"):  # the same round without CUDA graphs, and fused by torch.compile
            configs += [("speculative", dict(drafter=d, window=8, cuda_graphs=False)) for d in args.drafters]
            if args.compile:  # compiles a graph per window length 1…8 in the warm-up run (seconds each)
                configs += [("speculative", dict(drafter=d, window=8, compile=True)) for d in args.drafters]
        if args.fixed_shape:  # every target call padded to (W + 1)·B rows: one shape for the conv libraries
            configs += [("speculative", dict(drafter=d, window=w, row_bucket=(w + 1) * batch))
                        for d in args.drafters for w in args.windows if w != "bandit"]
        if args.row_bucket:
            configs += [("speculative", dict(drafter=d, window=w, row_bucket=args.row_bucket))
                        for d in args.drafters for w in args.windows]
        if args.compile_model:  # ragged calls (sfm, speculative without a row bucket) would recompile and re-record
            #                     for every new row count; fixed-shape samplers replay one graph per shape
            fixed = ("sde", "euler", "ab2", "heun", "fastflow")
            configs = [(n, o) for n, o in configs if n in fixed or "row_bucket" in o]
        if args.only:  # sde stays: the wall-time ratios are against it
            configs = [(n, o) for n, o in configs if n in set(args.only) | {"sde"}]
        sde_wall = None
        with torch.no_grad():
            for name, opts in configs:
                opts = dict(dict(steps=args.steps), **opts)
                if name in ("sde", "speculative"):
                    opts["eta"] = args.eta
                s = build_sampler(name, **opts)
                if args.per_sample:  # what generate() / sample.py pass: one CPU stream per sample
                    gen = lambda seed: per_sample_generators(seed, range(batch))  # noqa: E731
                else:
                    gen = lambda seed: torch.Generator(args.device).manual_seed(seed)  # noqa: E731
                s.sample(model, noise, generator=gen(1))  # warm-up (the bandits learn here too)
                runs = []
                for rep in range(args.repeats):
                    timed = Timed(model, args.device, events=args.timer == "events")
                    st = s.sample(timed, noise, generator=gen(0)).stats
                    runs.append((st.wall_time_s - timed.seconds, st, timed.seconds))
                # the median run by time outside the model (of two, the worse one: never the luckiest run)
                _, st, inside = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
                sde_wall = st.wall_time_s if name == "sde" else sde_wall
                shown = ", ".join(f"{k}={v}" for k, v in opts.items() if k not in ("steps", "eta")) or "-"
                if name == "heun":
                    shown = f"{opts['steps']} steps"
                print(f"{name:>12} {shown:>32} {st.sequential_nfe / args.steps:6.2f} "
                      f"{st.total_nfe / args.steps:8.2f} {st.rounds:6d} {st.wall_time_s:7.3f} {inside:8.3f} "
                      f"{100 * (1 - inside / st.wall_time_s):7.1f}% {st.wall_time_s / sde_wall:8.2f}")


def dispatch(args):
    """Per sampler: rounds, target calls, and per round the ops and host syncs outside the model."""
    from specflow.sampling.opcount import OpCounter
    model, _ = make_model("toy", 256, args.device)
    noise = torch.randn(64, 256, device=args.device, generator=torch.Generator(args.device).manual_seed(0))
    print(f"\nops and host syncs per round outside the model: toy mixture 256-d, batch 64, N = {args.steps}, "
          f"torch {torch.__version__}")
    print(f"{'sampler':>12} {'options':>32} {'rounds':>6} {'calls':>6} {'ops/round':>10} {'syncs/round':>12}")
    configs = [("sde", {}), ("euler", {}), ("ab2", {}), ("heun", dict(steps=args.steps // 2)),
               ("rca", dict(leap=4)), ("sfm", dict(leap=4, tol=0.05)), ("sfm", dict(leap="bandit", tol=0.05)),
               ("fastflow", {})]
    configs += [("speculative", dict(drafter=d, window=w)) for d in args.drafters for w in args.windows]
    with torch.no_grad():
        for name, opts in configs:
            opts = dict(dict(steps=args.steps), **opts)
            s = build_sampler(name, **opts)
            s.sample(model, noise, generator=torch.Generator(args.device).manual_seed(1))  # the bandits learn
            counter = OpCounter()
            with counter:
                st = s.sample(counter.exclude(model), noise, generator=torch.Generator(args.device).manual_seed(0)).stats
            rounds = st.rounds or st.sequential_nfe  # plain solvers: a step is a round
            syncs = len(counter.syncs) - 1 + counter.calls["Evaluator.fetch"]  # − the shell's noise check
            shown = ", ".join(f"{k}={v}" for k, v in opts.items() if k != "steps") or "-"
            print(f"{name:>12} {shown:>32} {rounds:6d} {st.sequential_nfe:6d} {counter.ops / rounds:10.1f} "
                  f"{syncs / rounds:12.2f}")


def _device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__})"
    return f"{device} ({torch.get_num_threads()} threads, torch {torch.__version__})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--drafters", nargs="+", default=["frozen", "extrapolate"])
    ap.add_argument("--windows", nargs="+", default=["2", "4", "8", "16", "bandit"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overhead", action="store_true", help="time outside the model instead of the toy table")
    ap.add_argument("--dispatch", action="store_true", help="ops and host syncs per round instead of the toy table")
    ap.add_argument("--model", default="unet+toy", help="model for --overhead: unet | unet+toy | ckpt:PATH (see make_model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--row-bucket", type=int, default=0, help="--overhead: also run speculative with this row_bucket")
    ap.add_argument("--compile-model", action="store_true",
                    help="--overhead: torch.compile the model (reduce-overhead); fixed-shape samplers and rows only")
    ap.add_argument("--fixed-shape", action="store_true",
                    help="--overhead: also run speculative with every call padded to (window + 1)·batch rows")
    ap.add_argument("--timer", choices=("events", "sync"), default="events",
                    help="--overhead on CUDA: time inside the model by CUDA events (no added syncs) or by the host "
                         "clock between synchronisations around each call (an upper bound on the outside share)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="--overhead: timed runs per sampler (the median by time outside the model is shown)")
    ap.add_argument("--compile", action="store_true", help="--overhead on CUDA: also speculative compile=True rows")
    ap.add_argument("--precision", default="32", choices=("32", "bf16", "16"),
                    help="--overhead: the model under autocast at this precision (sample.py --precision)")
    ap.add_argument("--per-sample", action="store_true",
                    help="--overhead: per-sample CPU generators, as generate() and sample.py use them")
    ap.add_argument("--only", nargs="+", default=None, help="--overhead: only these samplers (names)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    args.windows = [w if w == "bandit" else int(w) for w in args.windows]
    if args.threads:
        torch.set_num_threads(args.threads)
    dispatch(args) if args.dispatch else overhead(args) if args.overhead else toy_table(args)


if __name__ == "__main__":
    main()
