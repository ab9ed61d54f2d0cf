"""Sample from a trained target checkpoint with any sampler, optionally with a draft; write a PNG grid + .npz.

    python sample.py runs/digits/checkpoints/last.ckpt --sampler sde --steps 100 -n 64 --out outputs/sde
    python sample.py runs/digits/checkpoints/last.ckpt --draft runs/digits_medusa/checkpoints/last.ckpt \
        --sampler speculative --opt window=8 --labels cycle --out outputs/medusa
    python sample.py runs/digits/checkpoints/last.ckpt --sampler sfm --opt leap=bandit --opt tol=0.05
    python sample.py --diffusers path/to/saved_pipeline --sampler speculative --steps 50   # a diffusers model
    torchrun --nproc-per-node 8 sample.py target.ckpt --sampler speculative -n 50000 --batch-size 250 \
        --labels random --device cuda --out outputs/fid50k      # 8 GPUs share one run

Outputs (written atomically, only after sampling succeeded): OUT/samples.png (the first 256) and OUT/samples.npz
(samples, labels, and a JSON ``meta`` string with the command's settings and the stats); ``--export adm png``
adds OUT/samples_adm.npz and OUT/samples_png/ for other FID tools. On the way each batch
is written whole to OUT/parts/ (specflow/parts.py): the same command run again after a crash resumes at the
first missing batch, and processes given ``--rank``/``--world-size`` (or torchrun's $RANK/$WORLD_SIZE) share
the batches; the last to finish merges. Sample i has its own random stream, so the result is the same however
the run was split, stopped or resumed — except with a sampler that learns (window=bandit, leap=bandit,
fastflow): each process's bandit learns from its own batches, so the samples depend on the number of processes,
and such a run resumes only with the same number (a resumed process goes on from its last part's bandit).
Run again once complete, the command says so and stops (``--force`` samples it again).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def parse_option(text: str) -> tuple[str, object]:
    """"key=value" → (key, value), the value read as int, float, bool, None, a tuple "2,4,8" or a string."""
    if "=" not in text or text.startswith("="):
        raise ValueError(f"--opt takes key=value (e.g. --opt window=8), got {text!r}")
    key, raw = text.split("=", 1)
    low = raw.strip().lower()
    if low in ("none", "null"):
        return key, None
    if low in ("true", "false"):
        return key, low == "true"
    if "," in raw:
        return key, tuple(parse_option(f"x={p}")[1] for p in raw.split(",") if p.strip())
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    try:  # e.g. a quoted string
        v = ast.literal_eval(raw)
        return key, v
    except (ValueError, SyntaxError):
        return key, raw


def parse_labels(text: str | None):
    if text is None or text in ("random", "cycle"):
        return text
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--labels takes 'random', 'cycle' or comma-separated class indices (e.g. 3 or 0,1,2); "
                         f"got {text!r}") from None


def check_writable(out: Path) -> None:
    """Fail before sampling if OUT cannot hold our files (creating it if needed)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory; pick a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} is not writable ({e.strerror or e}); pick another directory") from None


def _fingerprint(draft) -> str:
    """The draft's weights and kind, hashed: a resumed run must use the same draft."""
    from specflow.checkpoint import fingerprint

    return fingerprint(draft.specflow.drafter, {}, draft.state_dict())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Sample from a specflow target checkpoint (its EMA net) with any sampler; optionally a draft "
                    "for speculative samplers. Writes OUT/samples.png (grid) and OUT/samples.npz, prints the stats.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("target", nargs="?", default=None, help="target checkpoint (.ckpt written by train.py)")
    p.add_argument("--diffusers", default=None, metavar="DIR",
                   help="instead of a target checkpoint: a diffusers pipeline saved with save_pretrained in DIR (its "
                        "unet/ or transformer/ and scheduler/), sampled on the scheduler's own grid "
                        "(specflow.adapters; needs the peers extra)")
    p.add_argument("--draft", default=None,
                   help="draft checkpoint (train_draft.py): a Medusa head set or a small draft net trained for this "
                        "target; sets the sampler's drafter to match unless --opt drafter=... says otherwise")
    p.add_argument("--sampler", default="euler",
                   help="sampler name: euler, heun, ab2, sde, speculative, sfm, rca, fastflow")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="sampler option, repeatable, e.g. --opt window=8 --opt drafter=extrapolate "
                        "--opt arms=2,4,8 (values read as int/float/bool/None/tuple/str)")
    p.add_argument("--steps", type=int, default=100, help="time-grid intervals N")
    p.add_argument("-n", "--num-samples", type=int, default=64, help="number of samples")
    p.add_argument("--batch-size", type=int, default=64, help="samples per sampler call")
    p.add_argument("--seed", type=int, default=0,
                   help="seed; sample i uses its own generator (seed, i), so results do not depend on --batch-size")
    p.add_argument("--labels", default=None,
                   help="class labels: 'random', 'cycle', or comma-separated indices cycled over the samples "
                        "(default: none, i.e. the null class of a conditional model)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w (1 = plain conditional, 0 = unconditional); needs --labels")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="32", choices=("32", "bf16", "16"),
                   help="the networks' precision: 32, or bf16 / 16 under autocast (the sampler stays in float32)")
    p.add_argument("--out", default="outputs/samples", help="output directory")
    p.add_argument("--rank", type=int, default=None,
                   help="this process's share of a run that several share: batches rank, rank + world, …; None: "
                        "$RANK as torchrun sets it, else 0")
    p.add_argument("--world-size", type=int, default=None,
                   help="how many processes share the run; None: $WORLD_SIZE as torchrun sets it, else 1")
    p.add_argument("--keep-parts", action="store_true",
                   help="keep this run's parts (OUT/parts/bNNNNNN.npz, one per batch) after merging; a run shared "
                        "by several processes always keeps them (another process may be merging too)")
    p.add_argument("--export", nargs="+", default=[], choices=("adm", "png"),
                   help="also write the samples for other FID tools: adm = OUT/samples_adm.npz (arr_0 uint8 NHWC "
                        "RGB, arr_1 labels: guided-diffusion's evaluator), png = OUT/samples_png/000000.png … "
                        "(torch-fidelity, clean-fid); uint8 = round((x + 1)·127.5)")
    p.add_argument("--force", action="store_true",
                   help="write OUT/samples.npz again (from this run's kept parts, else sampling anew) even if it "
                        "already holds this run, or overwrite it if it holds another one")
    return p


def process_share(rank: int | None, world: int | None) -> tuple[int, int]:
    """(rank, world size) from the flags, else torchrun's environment, else (0, 1)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1)) if world is None else world
    rank = int(env.get("RANK", 0)) if rank is None else rank
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"--rank must lie in [0, --world-size) and --world-size be >= 1; got rank {rank}, "
                         f"world size {world}")
    return rank, world


def device_for(device: str, world: int) -> str:
    """Plain 'cuda' in a run shared by several processes means this process's GPU on its node: $LOCAL_RANK
    (torchrun) or $SLURM_LOCALID (srun), modulo the GPUs this process sees (srun may give each task one)."""
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    if device == "cuda" and world > 1 and local is not None:
        import torch

        gpus = torch.cuda.device_count()
        return f"cuda:{int(local) % gpus if gpus else int(local)}"
    return device


EXPORTS = {"adm": "samples_adm.npz", "png": "samples_png"}


def clear_exports(out: Path, formats: list[str], force: bool) -> None:
    """Before sampling a new run into ``out``: earlier exports would not match its samples. Without --force they
    are refused (they may be the only copy of earlier samples); with it, those not asked for again are removed
    now (the ones asked for are replaced when the new samples are written)."""
    import shutil

    from specflow.io import check_png_folder

    found = [f for f, name in EXPORTS.items() if (out / name).exists()]
    if found and not force:
        raise ValueError(f"{out} holds an earlier export ({', '.join(EXPORTS[f] for f in found)}) of samples that "
                         f"this run would not match; move it away, or pass --force to replace it")
    if "png" in found:
        check_png_folder(out / "samples_png")  # only ever an earlier export, never someone's other files
    stale = [f for f in found if f not in formats]
    for f in stale:
        (shutil.rmtree if f == "png" else Path.unlink)(out / EXPORTS[f])
    if stale:
        print(f"removed the earlier {' and '.join(stale)} export: it held other samples than this run")


def export(out: Path, formats: list[str], samples, labels) -> list[Path]:
    """Write ``samples`` in the ``--export`` formats (atomically, each replacing its earlier version)."""
    from specflow.io import save_adm_npz_atomic, save_pngs_atomic

    written = [save_adm_npz_atomic(samples, labels, out / EXPORTS["adm"])] if "adm" in formats else []
    return written + ([save_pngs_atomic(samples, out / EXPORTS["png"])] if "png" in formats else [])


def finished(npz: Path, key: dict) -> bool:
    """True if ``npz`` already holds the run with settings ``key`` (say so); a ValueError if it holds something
    else, which sampling would overwrite; False if there is none yet."""
    if not npz.exists():
        return False
    try:
        with np.load(npz) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except Exception as e:
        raise ValueError(f"{npz} exists but cannot be read ({type(e).__name__}); sampling would overwrite it: "
                         f"move it away, or pass --force") from None
    theirs = meta.get("key")
    if theirs == key:
        print(f"{npz} already holds this run; nothing to do (--force writes it again: from OUT/parts if they were "
              f"kept, else sampling anew)")
        return True
    if not isinstance(theirs, dict):
        raise ValueError(f"{npz} was not written by this sample.py (no run settings in its meta), so it may or may "
                         f"not be this run; sampling would overwrite it: pass --force to redo it, or pick another "
                         f"--out")
    from specflow.parts import differing

    diff = ", ".join(differing(key, theirs))
    raise ValueError(f"{npz} holds another run (it differs in {diff}); sampling would overwrite it: pick another "
                     f"--out, or pass --force to overwrite")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    import torch

    from specflow.checkpoint import load_draft, load_target, parse_device
    from specflow.generate import generate_batches, sample_shape
    from specflow.io import save_grid_atomic, save_npz_atomic
    from specflow.parts import Parts
    from specflow.sampling import build_sampler
    from specflow.sampling.drafters import DRAFTERS

    # Everything that can be checked before sampling is checked first, so a bad call costs nothing.
    if args.num_samples <= 0:
        raise ValueError(f"-n/--num-samples must be a positive integer, got {args.num_samples}")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    rank, world = process_share(args.rank, args.world_size)
    device = parse_device(device_for(args.device, world))
    options = dict(parse_option(o) for o in args.opt)
    labels = parse_labels(args.labels)
    out = Path(args.out)
    check_writable(out)
    if (args.target is None) == (args.diffusers is None):
        raise ValueError("give either a target checkpoint or --diffusers DIR (exactly one)")
    if args.diffusers is not None:
        from specflow.adapters import load_diffusers
        from specflow.checkpoint import fingerprint

        for flag, bad in (("--draft", args.draft), ("--guidance", args.guidance)):
            if bad is not None:
                raise ValueError(f"{flag} works with specflow targets only: drop it with --diffusers (use a "
                                 f"training-free drafter: --opt drafter=frozen or extrapolate)")
        target = load_diffusers(args.diffusers)
        target.specflow = argparse.Namespace(fingerprint=fingerprint(
            "diffusers", dict(target.scheduler.config), target.state_dict()))  # weights and schedule
        options_grid = {"grid": target.grid(args.steps)}
    else:
        target = load_target(args.target, device)
        options_grid = {}
    if args.export and ((shape := sample_shape(target))[0] not in (1, 3) or len(shape) != 3):
        raise ValueError(f"--export writes images, but this target makes samples shaped {shape}; drop --export")
    draft = load_draft(args.draft, target) if args.draft else None
    if draft is not None:
        kind = draft.specflow.drafter
        if "drafter" not in options:
            options["drafter"] = kind
        elif getattr(DRAFTERS.get(options["drafter"]), "network", None) != kind:
            readers = sorted(n for n, d in DRAFTERS.items() if d.network == kind)
            raise ValueError(f"--draft is a {kind!r} draft but --opt drafter={options['drafter']} does not read "
                             f"one; drop the option or use drafter={' or '.join(readers)}")
    sampler = build_sampler(args.sampler, steps=args.steps, **options, **options_grid)
    if draft is not None and not sampler.needs_draft:
        print(f"note: sampler {args.sampler!r} does not use a draft; --draft is ignored", file=sys.stderr)
        draft = None
    if sampler.needs_draft and draft is None:
        raise ValueError(f"sampler {args.sampler!r} with drafter {options.get('drafter')!r} needs --draft "
                         f"(a checkpoint from train_draft.py)")

    key = {"target": target.specflow.fingerprint, "draft": None if draft is None else _fingerprint(draft),
           "sampler": args.sampler, "options": options, "steps": args.steps, "n": args.num_samples,
           "batch_size": args.batch_size, "seed": args.seed, "labels": args.labels, "guidance": args.guidance,
           "precision": args.precision, "device": device.type}  # what a part must match to belong to this run
    if sampler.state_dict():  # it learns from the batches its process made: the split is part of the run
        key["world_size"] = world
    count = -(-args.num_samples // args.batch_size)
    parts = Parts(out / "parts", key, count)
    if not args.force and finished(out / "samples.npz", parts.key):
        if args.export:  # asked for now, or an earlier export was interrupted
            with np.load(out / "samples.npz") as z:
                done = export(out, args.export, torch.from_numpy(z["samples"]),
                              torch.from_numpy(z["labels"]) if "labels" in z.files else None)
            print(f"wrote {', '.join(map(str, done))}")
        return 0
    clear_exports(out, args.export, args.force)
    present, _ = parts.present()  # parts of another run: an error here, before sampling
    share = range(rank, count, world)
    mine = [b for b in share if b not in present]
    if mine and len(mine) < len(share):
        print(f"resuming: {len(share) - len(mine)} of this process's {len(share)} parts already in {parts.folder}")

    fresh = sampler.state_dict()

    def sample(batches):
        """Make and write these batches, each after the sampler state its process had before it (a bandit's)."""
        for i, (b, g) in enumerate(generate_batches(target, sampler, args.num_samples, args.batch_size, args.seed,
                                                    labels, args.guidance, draft, device, args.precision,
                                                    batches=batches)):
            parts.write(b, g.samples, g.labels, g.stats, sampler.state_dict(), rank)
            if count > 1:
                print(f"part {b + 1}/{count}: {g.samples.shape[0]} samples, {g.stats.wall_time_s:.1f} s", flush=True)
            if i + 1 < len(batches) and batches[i + 1] - world != b:  # generate_batches makes it once we go on
                sampler.load_state_dict(parts.state_before(batches[i + 1], world) or fresh)

    if mine:
        sampler.load_state_dict(parts.state_before(mine[0], world) or fresh)
    sample(mine)
    _, damaged = parts.present()  # a part damaged after its process finished: nobody else would redo it
    if damaged:
        print(f"sampling again the damaged parts {damaged}")
        sampler.load_state_dict(parts.state_before(damaged[0], world) or fresh)
        sample(damaged)
    missing = [b for b in range(count) if not parts.path(b).exists()]
    if missing:
        print(f"process {rank} of {world} done; {len(missing)} of {count} parts still to come from the others: the "
              f"last process to finish writes {out / 'samples.npz'} (or run the same command again to merge)")
        return 0

    samples, labels_out, tally = parts.merge()
    st = tally.stats().as_dict()
    meta = {"target": str(args.target or args.diffusers), "draft": args.draft, "sampler": args.sampler, "options": options,
            "steps": args.steps, "n": args.num_samples, "batch_size": args.batch_size, "seed": args.seed,
            "labels": args.labels, "guidance": args.guidance, "device": str(device), "precision": args.precision,
            "world_size": world, "key": parts.key, "stats": st}
    arrays = {"samples": samples, "meta": json.dumps(meta, default=str)}
    if labels_out is not None:
        arrays["labels"] = labels_out
    npz = save_npz_atomic(out / "samples.npz", **arrays)
    png = None
    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        scale = max(1, 64 // samples.shape[-1])  # small images are upsampled so the grid is viewable
        png = save_grid_atomic(samples[:256], out / "samples.png", scale=scale)
    exported = export(out, args.export, samples, labels_out)
    if world == 1 and not args.keep_parts:
        parts.remove()  # samples.npz holds them all now
    print(f"{args.sampler} {options or ''}  N={args.steps}  n={args.num_samples}  device={device}")
    width = max(len(k) for k in st)
    for k, v in st.items():
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    print(f"  {'seq_nfe/N per batch':<{width}}  {st['sequential_nfe'] / args.steps / count:.3f}")
    print(f"wrote {', '.join(map(str, [npz, *([png] if png else []), *exported]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
