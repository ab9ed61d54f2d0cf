"""Sample from a trained target checkpoint with any sampler, optionally with a draft; write a PNG grid + .npz.

    python sample.py runs/digits/checkpoints/last.ckpt --sampler sde --steps 100 -n 64 --out outputs/sde
    python sample.py runs/digits/checkpoints/last.ckpt --draft runs/digits_medusa/checkpoints/last.ckpt \
        --sampler speculative --opt window=8 --labels cycle --out outputs/medusa
    python sample.py runs/digits/checkpoints/last.ckpt --sampler sfm --opt leap=bandit --opt tol=0.05

Outputs (written atomically, only after sampling succeeded): OUT/samples.png and OUT/samples.npz (samples,
labels, and a JSON ``meta`` string with the command's settings and the stats).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
from pathlib import Path


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Sample from a specflow target checkpoint (its EMA net) with any sampler; optionally a draft "
                    "for speculative samplers. Writes OUT/samples.png (grid) and OUT/samples.npz, prints the stats.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("target", help="target checkpoint (.ckpt written by train.py)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from specflow.checkpoint import load_draft, load_target, parse_device
    from specflow.generate import generate
    from specflow.io import save_grid_atomic, save_npz_atomic
    from specflow.sampling import build_sampler

    # Everything that can be checked before sampling is checked first, so a bad call costs nothing.
    if args.num_samples <= 0:
        raise ValueError(f"-n/--num-samples must be a positive integer, got {args.num_samples}")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    device = parse_device(args.device)
    options = dict(parse_option(o) for o in args.opt)
    labels = parse_labels(args.labels)
    out = Path(args.out)
    check_writable(out)
    target = load_target(args.target, device)
    draft = load_draft(args.draft, target) if args.draft else None
    if draft is not None:
        kind = draft.specflow.drafter
        if "drafter" not in options:
            options["drafter"] = kind
        elif options["drafter"] != kind:
            raise ValueError(f"--draft is a {kind!r} draft but --opt drafter={options['drafter']}; drop the option "
                             f"or use drafter={kind}")
    sampler = build_sampler(args.sampler, steps=args.steps, **options)
    if draft is not None and not sampler.needs_draft:
        print(f"note: sampler {args.sampler!r} does not use a draft; --draft is ignored", file=sys.stderr)
        draft = None
    if sampler.needs_draft and draft is None:
        raise ValueError(f"sampler {args.sampler!r} with drafter {options.get('drafter')!r} needs --draft "
                         f"(a checkpoint from train_draft.py)")

    g = generate(target, sampler, args.num_samples, args.batch_size, args.seed, labels, args.guidance, draft, device,
                 args.precision)
    st = g.stats.as_dict()
    meta = {"target": str(args.target), "draft": args.draft, "sampler": args.sampler, "options": options,
            "steps": args.steps, "n": args.num_samples, "batch_size": args.batch_size, "seed": args.seed,
            "labels": args.labels, "guidance": args.guidance, "device": str(device), "precision": args.precision,
            "stats": st}
    arrays = {"samples": g.samples, "meta": json.dumps(meta, default=str)}
    if g.labels is not None:
        arrays["labels"] = g.labels
    npz = save_npz_atomic(out / "samples.npz", **arrays)
    png = None
    if g.samples.ndim == 4 and g.samples.shape[1] in (1, 3):
        scale = max(1, 64 // g.samples.shape[-1])  # small images are upsampled so the grid is viewable
        png = save_grid_atomic(g.samples, out / "samples.png", scale=scale)
    print(f"{args.sampler} {options or ''}  N={args.steps}  n={args.num_samples}  device={device}")
    width = max(len(k) for k in st)
    for k, v in st.items():
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    print(f"  {'seq_nfe/N per batch':<{width}}  "
          f"{st['sequential_nfe'] / args.steps / -(-args.num_samples // args.batch_size):.3f}")
    print(f"wrote {npz}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
