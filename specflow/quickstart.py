"""The main job on the embedded default: ``python -m specflow.quickstart``.

1. trains the class-conditional digits target (configs/digits.yaml; scikit-learn's 8×8 digits, no download),
2. trains Medusa heads on the frozen target (configs/digits_medusa.yaml),
3. samples the same per-sample noise with euler / heun / sde / speculative / sfm / rca / fastflow,
4. prints one table — sequential and total NFE, acceptance, wall time vs the sampler's baseline, FID-proxy
   (features of a small digits classifier, see specflow.metrics) — and writes a comparison grid.

Finished checkpoints are reused, so a second run only samples (``--retrain`` starts over); an interrupted
training run resumes from its last checkpoint. Everything lands in runs/ under the current directory.

``--data fashion`` runs the same table on Fashion-MNIST 28×28 (configs/fashion.yaml and fashion_medusa.yaml;
the IDX files from ``apt-get install dataset-fashion-mnist`` or ``--data-root``): D = 784 instead of 64.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Per data set: its configs, where its runs go, and the step counts that end training (the time caps only
# guard against a very slow machine).
DATASETS = {
    "digits": dict(target="digits.yaml", heads="digits_medusa.yaml", runs="digits", target_steps=2250,
                   draft_steps=350, target_minutes=15.0, draft_minutes=5.0),
    "fashion": dict(target="fashion.yaml", heads="fashion_medusa.yaml", runs="fashion", target_steps=6000,
                    draft_steps=200, target_minutes=58.0, draft_minutes=30.0),
}


def _train(entry, config: Path, steps: int, minutes: float, ckpt: Path, retrain: bool, extra: list[str]) -> None:
    if ckpt.is_file() and not retrain:
        print(f"[quickstart] reusing {ckpt} (pass --retrain to train again)")
        _say_if_short(ckpt, steps)
        return
    if retrain:  # else Lightning would write last-v1.ckpt beside them, and done.ckpt would still be the old model
        for old in [ckpt, *ckpt.parent.glob("last*.ckpt")]:
            old.unlink(missing_ok=True)
    resume = ["--ckpt_path", "last"] if (ckpt.parent / "last.ckpt").is_file() else []
    hms = time.strftime("%H:%M:%S", time.gmtime(int(minutes * 60)))
    print(f"[quickstart] training {config.name} for {steps} steps (at most {minutes:g} min)"
          + (" (resuming)" if resume else ""))
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads sys.argv too; give it only `args`
    try:
        cli = entry(args=["fit", "--config", str(config), "--trainer.max_steps", str(steps), "--trainer.max_time",
                          f"00:{hms}", *extra, *resume])
    finally:
        sys.argv = argv
    from specflow.io import atomic_write

    # The checkpoint callback saves every k steps only: the final state, at whatever step training ended, is
    # what done.ckpt must hold.
    atomic_write(ckpt.parent / "last.ckpt", ".ckpt", lambda tmp: cli.trainer.save_checkpoint(tmp))


def _say_if_short(ckpt: Path, steps: int) -> None:
    reached = torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", steps)
    if reached < steps:
        print(f"[quickstart] note: the time cap stopped training at step {reached} of {steps}; the table is of that "
              f"model (its numbers will differ from the README's); --retrain with more minutes trains it fully")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Step counts, not time, end training, so the models (and the table's NFE, acceptance and quality columns)
    # do not depend on the machine's speed, up to floating-point differences between CPUs; the time caps only
    # guard against a very slow machine (a capped run keeps its last checkpoint and says so in the log).
    p.add_argument("--data", choices=sorted(DATASETS), default="digits",
                   help="digits (embedded, D = 64) or fashion (Fashion-MNIST 28×28 from local IDX files, D = 784)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: Debian's)")
    p.add_argument("--target-steps", type=int, default=None,
                   help="training steps of the target (digits 2250: ~6 min on 2 cores; fashion 6000: ~45 min)")
    p.add_argument("--draft-steps", type=int, default=None, help="training steps of the Medusa heads (350 / 200)")
    p.add_argument("--target-minutes", type=float, default=None, help="safety cap on the target's training time")
    p.add_argument("--draft-minutes", type=float, default=None, help="safety cap on the heads' training time")
    p.add_argument("--steps", type=int, default=100, help="grid steps N of every sampler")
    p.add_argument("--num", type=int, default=400, help="samples per sampler (for the FID-proxy)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/quickstart", help="where the table and the grid are written")
    p.add_argument("--retrain", action="store_true", help="train again even if checkpoints exist")
    a = p.parse_args(argv)
    spec = DATASETS[a.data]
    for key in ("target_steps", "draft_steps", "target_minutes", "draft_minutes"):
        if getattr(a, key) is None:
            setattr(a, key, spec[key])
    if a.data_root is not None and a.data != "fashion":
        p.error("--data-root is for --data fashion (the digits are embedded)")
    dm = _datamodule(a.data, a.data_root)  # before any training: a missing data set fails here, named
    if not CONFIGS.is_dir():
        raise SystemExit(f"configs/ not found next to the package ({CONFIGS}); run from a clone of the repo "
                         f"installed with pip install -e .")
    # Small nets on a few cores: one intra-op thread is fastest and immune to a busy neighbour core.
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    data_args = [] if a.data_root is None else ["--data.init_args.root", a.data_root]

    from specflow.cli import draft_main, main as target_main

    target_ckpt = Path(f"runs/{spec['runs']}/checkpoints/done.ckpt")
    draft_ckpt = Path(f"runs/{spec['runs']}_medusa/checkpoints/done.ckpt")
    _train(target_main, CONFIGS / spec["target"], a.target_steps, a.target_minutes, target_ckpt, a.retrain,
           data_args)
    _finish(target_ckpt, a.target_steps)
    _train(draft_main, CONFIGS / spec["heads"], a.draft_steps, a.draft_minutes, draft_ckpt, a.retrain,
           ["--model.target_ckpt", str(target_ckpt), *data_args])
    _finish(draft_ckpt, a.draft_steps)
    t_train = time.perf_counter() - t_start

    from specflow import load_draft, load_target
    from specflow.generate import generate
    from specflow.io import save_grid_atomic, atomic_write
    from specflow.metrics import (bootstrap_fid, bootstrap_fid_difference, build_feature_extractor, extract_features,
                                  reference_images)
    from specflow.sampling import build_sampler

    target = load_target(target_ckpt)
    heads = load_draft(draft_ckpt, target)
    N = a.steps
    runs = [  # (label, sampler, draft, baseline label for the wall-time ratio)
        ("euler", build_sampler("euler", steps=N), None, "euler"),
        ("heun (N/2 steps)", build_sampler("heun", steps=N // 2), None, "euler"),
        ("ab2 (N/4 steps)", build_sampler("ab2", steps=max(2, N // 4)), None, "euler"),  # equal-NFE rival of sfm
        ("sfm extrapolate", build_sampler("sfm", steps=N, drafter="extrapolate", leap=4, tol=0.05), None, "euler"),
        ("rca L4", build_sampler("rca", steps=N, leap=4), None, "euler"),  # lossy: no check, trapezoid-corrected
        ("rca bandit", build_sampler("rca", steps=N, leap="bandit"), None, "euler"),
        ("fastflow", build_sampler("fastflow", steps=N), None, "euler"),
        ("sde", build_sampler("sde", steps=N), None, "sde"),
        ("speculative extrapolate", build_sampler("speculative", steps=N, drafter="extrapolate", window=8), None, "sde"),
        ("speculative medusa", build_sampler("speculative", steps=N, drafter="medusa", window=8), heads, "sde"),
    ]
    dm.setup("fit")
    # the whole training set as FID's reference where it is small (digits: 1797), else a fixed 10 000 of it
    real = dm.train_set.tensors[0] if len(dm.train_set) <= 10_000 else reference_images(dm, 10_000, seed=a.seed)
    extractor = build_feature_extractor("auto", datamodule=dm, cache=Path(a.out) / "fid_classifier.pt", max_seconds=40)
    real_f = extract_features(extractor, real)

    generate(target, runs[0][1], n=min(a.num, a.batch_size), batch_size=a.batch_size, labels="cycle")  # warm-up
    rows, grids, wall, feats = [], [], {}, {}
    for label, sampler, draft, base in runs:
        if label in LEARNS:  # it calibrates μ on its first batch and learns online: warm it on other noise first
            for i in range(LEARNS[label]):
                generate(target, sampler, n=a.batch_size, batch_size=a.batch_size, seed=a.seed + 1 + i,
                         labels="cycle", draft=draft)
        t0 = time.perf_counter()
        g = generate(target, sampler, n=a.num, batch_size=a.batch_size, seed=a.seed, labels="cycle", draft=draft)
        wall[label] = time.perf_counter() - t0
        st = g.stats
        feats[label] = extract_features(extractor, g.samples)
        fid = bootstrap_fid(real_f, feats[label], n_boot=100)
        # Paired: same sample indices (noise, labels) as the baseline, so the difference's interval is tight.
        delta = bootstrap_fid_difference(real_f, feats[label], feats[base], n_boot=100) if label != base else None
        rows.append((label, st.sequential_nfe / math.ceil(a.num / a.batch_size), st.total_nfe, st.acceptance_rate,
                     wall[label] / wall[base], fid, delta))
        grids.append(g.samples[:20])
        print(f"[quickstart] {label}: done in {wall[label]:.1f}s")

    head = (f"{'sampler':26s} {'seq NFE':>8s} {'total NFE':>9s} {'accept':>7s} {'wall/base':>9s}  "
            f"{extractor.fid_name + ' [95% CI]':29s} Δ vs base [95% CI, paired]")
    lines = [f"{a.data} target, N = {N}, {a.num} samples per sampler, same per-sample noise; base = euler for the "
             f"deterministic rows, sde for the stochastic ones (wall time from the same run); "
             f"{' and '.join(LEARNS)} first learn on {max(LEARNS.values())} batches of other noise",
             head, "-" * len(head)]
    for label, seq, tot, acc, ratio, fid, delta in rows:
        acc_s = "-" if math.isnan(acc) else f"{acc:.2f}"
        lines.append(f"{label:26s} {seq:8.1f} {tot:9.1f} {acc_s:>7s} {ratio:9.2f}  {str(fid):29s} {delta or 'baseline'}")
    lines.append(f"training {t_train / 60:.1f} min, total {(time.perf_counter() - t_start) / 60:.1f} min; "
                 f"features: {extractor.description}")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(a.out)
    atomic_write(out / "table.txt", ".txt", lambda tmp: Path(tmp).write_text(table + "\n"))
    grid = save_grid_atomic(torch.cat(grids), out / "samplers.png", nrow=20, scale=4)
    print(f"\n[quickstart] one row per sampler (top to bottom as in the table): {grid}")


LEARNS = {"rca bandit": 2, "fastflow": 2}  # samplers that learn online: warm-up batches before the timed run


def _datamodule(data: str, root: str | None):
    """The data module of the table's FID-proxy (and its reference images), built from what the configs train on."""
    if data == "digits":
        from specflow.data import DigitsDataModule

        return DigitsDataModule(image_size=8)
    from specflow.data import FashionMNISTDataModule

    return FashionMNISTDataModule(image_size=28, **({} if root is None else {"root": root}))


def _finish(ckpt: Path, steps: int) -> None:
    """Mark a finished training run: copy last.ckpt to done.ckpt (atomically) so a rerun reuses it; say so if
    the time cap stopped it before ``steps``."""
    if ckpt.is_file():
        return
    last = ckpt.parent / "last.ckpt"
    if not last.is_file():
        raise SystemExit(f"training ended without writing {last}; see the log above")
    from specflow.io import atomic_write
    import shutil

    _say_if_short(last, steps)
    atomic_write(ckpt, ".ckpt", lambda tmp: shutil.copyfile(last, tmp))


if __name__ == "__main__":
    main()
