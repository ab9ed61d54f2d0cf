"""FID of saved samples (sample.py's OUT/samples.npz) against the training data of a training config; given
several files, each one's difference from the first, paired when they share their sample indices.

    python fid.py outputs/sde50/samples.npz outputs/spec50/samples.npz --config configs/digits.yaml
    python fid.py outputs/fid50k/samples.npz --config configs/cifar10_unet.yaml --data-root /data/cifar10 \
        --features inception --reference 50000 --device cuda --json outputs/fid50k/fid.json

The reference is ``--reference`` images of the config's data module (its ``data:`` block, the data the target
learned, without augmentation), chosen by ``--seed``. Features: Inception-v3 when its weights are on disk
("fid"; comparable with published numbers only under their protocol, e.g. 50 000 CIFAR-10 samples against
the training set — ImageNet papers use ADM's reference batches instead: ``sample.py --export adm``), else a
small CNN trained on the same data ("fid_proxy": comparable only between runs scored against the same reference and
classifier — keep ``--classifier-cache``). Columns: n, FID [bootstrap interval], KID ± std over subsets, and
FID(file) − FID(first) with a paired bootstrap interval: an interval holding 0 means "equal within noise",
the claim an exact sampler must pass against ``sde`` at the same steps.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + "; see the module docstring",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("samples", nargs="+", help="samples.npz files written by sample.py (images in [-1, 1])")
    p.add_argument("--config", required=True,
                   help="the training config (configs/*.yaml, or the config.yaml LightningCLI saved in the run): "
                        "its data: block gives the reference images")
    p.add_argument("--data-root", default=None, help="override the data module's root (the configs hold a placeholder)")
    p.add_argument("--reference", type=int, default=50000,
                   help="reference images from the training set (all of it if it is smaller)")
    p.add_argument("--features", default="auto", choices=("auto", "inception", "classifier"),
                   help="auto: Inception if its weights are on disk, else the FID-proxy classifier")
    p.add_argument("--inception", default=None,
                   help="torch-fidelity's Inception weights file (default: the torch hub cache)")
    p.add_argument("--classifier-cache", default=None,
                   help="FID-proxy classifier file: loaded if it exists, else trained and saved there")
    p.add_argument("--classifier-steps", type=int, default=600, help="training steps of the FID-proxy classifier")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="bootstrap resamples for the intervals (0: none; each costs one FID per file and one more per "
                        "paired difference). Default: 100 for the 64-d FID-proxy, 0 for 2048-d Inception, where one "
                        "FID of 50 000 samples takes ~10 s on a CPU")
    p.add_argument("--seed", type=int, default=0, help="reference subset, classifier and bootstrap seed")
    p.add_argument("--device", default="cpu", help="where the feature extractor runs: cpu, cuda, cuda:1")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers for the reference images")
    p.add_argument("--reference-cache", default=None,
                   help="reference features file: used if it was made from the same reference images (hashed), "
                        "--seed and extractor (weights fingerprint), else computed and written there — saves the "
                        "feature pass over the reference")
    p.add_argument("--json", default=None, help="also write the results here (atomically)")
    return p


def load_datamodule(config: str | Path, root: str | None = None):
    """The data module of a LightningCLI config's ``data:`` block (class_path + init_args), set up for fitting,
    and that block as used (``--data-root`` applied)."""
    import importlib

    import yaml
    from lightning.pytorch import LightningDataModule

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} not found; pass the training config (e.g. configs/digits.yaml)")
    cfg = yaml.safe_load(path.read_text()) or {}
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("class_path"), str):
        raise ValueError(f"{path} has no data: block with a class_path; pass the config the target was trained with")
    module, _, name = data["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"{path}: data.class_path {data['class_path']!r} is not an importable class (give the full "
                         f"path, e.g. specflow.data.images.DigitsDataModule)") from None
    if not (isinstance(cls, type) and issubclass(cls, LightningDataModule)):
        raise ValueError(f"{path}: data.class_path {data['class_path']!r} is not a LightningDataModule")
    kwargs = dict(data.get("init_args") or {}) | ({"root": root} if root is not None else {})
    try:
        dm = cls(**kwargs)
    except TypeError as e:  # e.g. a misspelt key
        raise ValueError(f"the data: block of {path} does not build {name}: {e}") from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (fid.py: pass --data-root)") from None
    dm.prepare_data()
    dm.setup("fit")
    return dm, {"class_path": data["class_path"], "init_args": kwargs}


def load_samples(path: str | Path):
    """(samples, meta) of a sample.py output; a clear error for a missing file, no samples, or non-finite values."""
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {str(path)!r} not found (sample.py writes OUT/samples.npz)")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k in ("samples", "meta", "labels")} | {"files": z.files}
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from None
    if "samples" not in arrays:
        raise ValueError(f"{path} has no 'samples' array (it holds {arrays['files']}); pass a sample.py output")
    x = torch.from_numpy(arrays["samples"]).float()
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    meta["classes"] = sorted(set(arrays["labels"].tolist())) if "labels" in arrays else None
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{path} holds {bad} non-finite values (NaN/inf): the sampler diverged; nothing to score")
    return x, meta


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"fid.py: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    import hashlib

    import torch

    from specflow.checkpoint import fingerprint, parse_device
    from specflow.io import atomic_write, to_uint8
    from specflow.metrics import (bootstrap_fid, bootstrap_fid_difference, build_feature_extractor,
                                  extract_features, fid_from_features, kid_from_features, reference_dataset,
                                  reference_images)

    if args.reference < 2 or (args.bootstrap or 0) < 0 or args.classifier_steps < 1:
        raise ValueError(f"need --reference >= 2, --bootstrap >= 0 and --classifier-steps >= 1; got "
                         f"{args.reference}, {args.bootstrap}, {args.classifier_steps}")
    if len(set(map(str, args.samples))) < len(args.samples):
        raise ValueError(f"a samples file is named twice: {args.samples}")
    if args.json and (Path(args.json).suffix != ".json" or Path(args.json).is_dir()):
        raise ValueError(f"--json {args.json!r} must name a .json file (it is written over): pick another path")
    device = parse_device(args.device)
    runs = {p: load_samples(p) for p in args.samples}  # every file checked before the expensive part
    dm, data = load_datamodule(args.config, args.data_root)
    ds = reference_dataset(dm)
    item = ds[0]
    n_ref, shape = min(args.reference, len(ds)), tuple((item[0] if isinstance(item, (tuple, list)) else item).shape)
    for p, (x, _) in runs.items():
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"{p} holds samples shaped {tuple(x.shape[1:])} but the data of {args.config} is "
                             f"{shape}: scored against another data set?")
    extractor = build_feature_extractor(args.features, dm, args.inception, args.classifier_cache,
                                        steps=args.classifier_steps, seed=args.seed, device=device)
    print(f"features: {extractor.description}; reference: {n_ref} training images of {args.config}")
    real = reference_images(dm, n_ref, args.seed, num_workers=args.num_workers, dataset=ds)
    # The images themselves are in the key (their uint8 values, hashed): a cache of other data — replaced files,
    # another root — is never reused. What it saves is the feature pass, the expensive part.
    key = json.dumps({"data": data, "n": n_ref, "seed": args.seed,
                      "images": hashlib.sha256(to_uint8(real).numpy().tobytes()).hexdigest()[:16],
                      "extractor": fingerprint(type(extractor).__name__, {}, extractor.state_dict())}, sort_keys=True,
                     default=str)
    ref = cached_reference(args.reference_cache, key)
    if ref is None:
        ref = extract_features(extractor, real)
        if args.reference_cache:
            atomic_write(args.reference_cache, ".pt", lambda tmp: torch.save({"key": key, "features": ref}, tmp))
    classes = getattr(dm, "num_classes", None)
    for p, (_, meta) in runs.items():
        if classes and meta["classes"] is not None and len(meta["classes"]) < classes:
            print(f"note: {p} holds {len(meta['classes'])} of the data's {classes} classes while the reference holds "
                  f"all: its FID also measures that")
    if args.bootstrap is None:
        args.bootstrap = 100 if extractor.num_features <= 256 else 0
        if not args.bootstrap:
            print(f"no intervals by default with {extractor.num_features}-d features (slow): pass --bootstrap 100")
    feats = {p: extract_features(extractor, x) for p, (x, _) in runs.items()}

    first, name, kid_name = args.samples[0], extractor.fid_name, extractor.kid_name
    rows = []
    for p, f in feats.items():
        meta = runs[p][1]
        kid, kid_std = kid_from_features(ref, f, seed=args.seed)
        iv = bootstrap_fid(ref, f, n_boot=args.bootstrap, seed=args.seed) if args.bootstrap else None
        row = {"file": str(p), "n": len(f), "sampler": meta.get("sampler"), "steps": meta.get("steps"),
               name: fid_from_features(ref, f) if iv is None else iv.value,  # the bootstrap computed it already
               kid_name: kid, f"{kid_name}_std": kid_std}
        if iv is not None:
            row[f"{name}_interval"] = [iv.low, iv.high]
        if p != first:
            row["paired"] = paired(runs[first][1], meta, len(feats[first]), len(f))
            row[f"{name}_minus_first"] = row[name] - rows[0][name]
            if args.bootstrap and row["paired"]:
                iv = bootstrap_fid_difference(ref, f, feats[first], n_boot=args.bootstrap, seed=args.seed)
                row[f"{name}_minus_first_interval"] = [iv.low, iv.high]
        rows.append(row)

    ci = " [95%]" if args.bootstrap else ""
    width = max(len(str(p)) for p in args.samples)
    print(f"{'samples':<{width}}  {'n':>6}  {name + ci:>26}  {kid_name + ' ± std':>18}  {'Δ vs first' + ci:>28}")
    for r in rows:
        fid = f"{r[name]:.3f}" + (" [{:.3f}, {:.3f}]".format(*r[f"{name}_interval"]) if args.bootstrap else "")
        diff = "" if r is rows[0] else f"{r[f'{name}_minus_first']:+.3f}" + (
            " [{:+.3f}, {:+.3f}]".format(*r[f"{name}_minus_first_interval"]) if f"{name}_minus_first_interval" in r
            else " (unpaired)" if not r["paired"] else "")
        kid = f"{r[kid_name]:.4g} ± {r[f'{kid_name}_std']:.2g}"
        print(f"{r['file']:<{width}}  {r['n']:>6}  {fid:>26}  {kid:>18}  {diff:>28}")
    if any(r is not rows[0] and not r["paired"] for r in rows):
        print("(unpaired): another seed, labels or number of samples than the first file, so no paired interval: "
              "compare the FID intervals instead")
    if args.json:
        result = {"config": args.config, "reference": n_ref, "features": extractor.description, "seed": args.seed,
                  "bootstrap": args.bootstrap, "results": rows}
        atomic_write(args.json, ".json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
        print(f"wrote {args.json}")
    return 0


def cached_reference(path: str | None, key: str):
    """The reference features saved at ``path`` if they were made with ``key``, else None (saying why)."""
    import torch

    if path is None or not Path(path).is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            print(f"reference features from {path}")
            return saved["features"]
    except Exception as e:
        raise ValueError(f"--reference-cache {path} is not a reference-features file ({type(e).__name__}); delete "
                         f"it or name another file") from None
    print(f"note: {path} holds reference features of other settings; computing them again and replacing it")
    return None


def paired(a: dict, b: dict, n_a: int, n_b: int) -> bool:
    """Row i of both files came from the same noise: same number of samples, seed and labels (sample.py's meta)."""
    return n_a == n_b and a.get("seed") is not None and all(a.get(k) == b.get(k) for k in ("seed", "labels", "n"))


if __name__ == "__main__":
    sys.exit(main())
