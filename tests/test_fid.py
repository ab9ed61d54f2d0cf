"""fid.py: FID of saved samples against a config's training data, with paired differences; and its errors.

Stand-ins for sample.py outputs are held-out digits (what an exact sampler should look like: no detectable
difference between two halves) and the same digits with noise added (a lossy one: the test must see it).
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from specflow.data.images import DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/digits.yaml")


def _fid_module():
    spec = importlib.util.spec_from_file_location("fid_script", ROOT / "fid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _save(path, x, seed=0):
    np.savez(path, samples=x.numpy(), meta=json.dumps({"seed": seed, "labels": None, "n": len(x), "sampler": "t"}))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fid")
    dm = DigitsDataModule(image_size=8)
    dm.setup("fit")
    held_out = torch.cat([b[0] for b in dm.val_dataloader()])[:180]  # never in the reference (training) set
    a, b = held_out[:90], held_out[90:]
    noisy = (b + 0.5 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    return {"a": _save(tmp / "a.npz", a), "b": _save(tmp / "b.npz", b), "noisy": _save(tmp / "noisy.npz", noisy),
            "b_seed1": _save(tmp / "b1.npz", b, seed=1), "tmp": tmp}


def _args(files, *extra):
    return ["--config", CONFIG, "--classifier-steps", "150", "--classifier-cache", str(files["tmp"] / "cls.pt"),
            "--reference", "600", *extra]


def test_fid_sees_a_lossy_set_and_no_difference_between_two_draws_of_the_data(files, capsys):
    fid = _fid_module()
    out = files["tmp"] / "res.json"
    assert fid.main([files["a"], files["b"], files["noisy"], files["b_seed1"],
                     *_args(files, "--bootstrap", "60", "--json", str(out))]) == 0
    printed = capsys.readouterr().out
    rows = {Path(r["file"]).name: r for r in json.loads(out.read_text())["results"]}
    assert rows["a.npz"]["n"] == 90 and "fid_proxy_minus_first" not in rows["a.npz"]
    lo, hi = rows["b.npz"]["fid_proxy_minus_first_interval"]
    assert lo < 0 < hi  # two halves of the held-out digits: equal within noise
    lo, hi = rows["noisy.npz"]["fid_proxy_minus_first_interval"]
    assert lo > 0 and rows["noisy.npz"]["fid_proxy"] > 2 * rows["b.npz"]["fid_proxy"]  # the control is caught
    assert rows["b1.npz"]["paired"] is False and "fid_proxy_minus_first_interval" not in rows["b1.npz"]
    assert rows["b1.npz"]["fid_proxy"] == rows["b.npz"]["fid_proxy"]  # same images, another seed in its meta
    for name, r in rows.items():
        lo, hi = r["fid_proxy_interval"]
        assert lo <= r["fid_proxy"] <= hi and f"{r['fid_proxy']:.3f}" in printed
    assert "(unpaired)" in printed and "FID-proxy" in printed


@pytest.mark.parametrize("make,message", [
    (lambda t: str(t / "missing.npz"), "not found"),
    (lambda t: (np.savez(t / "nos.npz", x=np.zeros(3)), str(t / "nos.npz"))[1], "has no 'samples' array"),
    (lambda t: (t / "junk.npz").write_bytes(b"junk") and str(t / "junk.npz"), r"not a readable \.npz"),
    (lambda t: _save(t / "nan.npz", torch.full((4, 1, 8, 8), float("nan"))), "256 non-finite values"),
    (lambda t: _save(t / "rgb.npz", torch.zeros(4, 3, 8, 8)), r"shaped \(3, 8, 8\) but the data .* is \(1, 8, 8\)"),
])
def test_bad_samples_are_a_clear_error(files, tmp_path, capsys, make, message):
    fid = _fid_module()
    assert fid.main([make(tmp_path), *_args(files, "--bootstrap", "0")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_configs_are_a_clear_error(files, tmp_path, capsys):
    fid = _fid_module()
    (tmp_path / "nodata.yaml").write_text("trainer:\n  max_steps: 1\n")
    (tmp_path / "badkey.yaml").write_text("data:\n  class_path: specflow.data.images.DigitsDataModule\n"
                                          "  init_args:\n    image_sise: 8\n")
    (tmp_path / "badclass.yaml").write_text("data:\n  class_path: specflow.data.images.Nope\n")
    (tmp_path / "cifar.yaml").write_text("data:\n  class_path: specflow.data.images.CIFAR10DataModule\n"
                                         "  init_args:\n    root: /path/to/cifar10\n")
    for config, message in ((tmp_path / "none.yaml", "not found"), (tmp_path / "nodata.yaml", "has no data: block"),
                            (tmp_path / "badkey.yaml", "does not build DigitsDataModule.*'image_sise'"),
                            (tmp_path / "badclass.yaml", "is not an importable class"),
                            (tmp_path / "cifar.yaml", "CIFAR-10 not found under root='/path/to/cifar10'.*--data-root")):
        assert fid.main([files["a"], "--config", str(config)]) == 2
        assert re.search(message, capsys.readouterr().err, flags=re.S)
    assert fid.main([files["a"], *_args(files, "--bootstrap", "-1")]) == 2
    assert "--bootstrap >= 0" in capsys.readouterr().err
    assert fid.main([files["a"], *_args(files, "--features", "inception", "--inception", str(tmp_path / "no.pth"))]) == 2
    assert "no download is attempted" in capsys.readouterr().err  # never fetched at run time
    # Nothing of the user's is written over: --json must name a .json file; a file named twice is an error.
    assert fid.main([files["a"], *_args(files, "--json", files["b"])]) == 2
    assert "must name a .json file" in capsys.readouterr().err and np.load(files["b"])["samples"].shape[0] == 90
    assert fid.main([files["a"], files["a"], *_args(files)]) == 2
    assert "named twice" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert fid.main([files["a"], "--config", CONFIG, "--classifier-cache", str(tmp_path / "junk.pt")]) == 2
    assert "is not a FID-proxy classifier file" in capsys.readouterr().err


def test_files_without_a_seed_are_not_paired_and_one_class_is_flagged(files, tmp_path, capsys):
    fid = _fid_module()
    x = np.load(files["a"])["samples"]
    np.savez(tmp_path / "bare1.npz", samples=x)  # no meta: nothing says row i of both came from the same noise
    np.savez(tmp_path / "bare2.npz", samples=x[::-1].copy())
    np.savez(tmp_path / "threes.npz", samples=x, labels=np.full(len(x), 3),
             meta=json.dumps({"seed": 0, "labels": "3", "n": len(x)}))
    out = tmp_path / "r.json"
    assert fid.main([str(tmp_path / "bare1.npz"), str(tmp_path / "bare2.npz"), str(tmp_path / "threes.npz"),
                     *_args(files, "--bootstrap", "10", "--json", str(out))]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert rows[1]["paired"] is False and rows[2]["paired"] is False and "(unpaired)" in printed
    assert "threes.npz holds 1 of the data's 10 classes" in printed and "bare1.npz holds" not in printed


def test_reference_features_are_cached_and_keyed(files, tmp_path, capsys):
    """--reference-cache: the second call reads the features instead of the data (same results); another seed
    (another subset) or extractor recomputes and replaces them; a file that is not a cache is named."""
    fid = _fid_module()
    cache = tmp_path / "ref.pt"
    runs = []
    for seed in ("0", "0", "1"):
        out = tmp_path / f"r{len(runs)}.json"
        assert fid.main([files["a"], *_args(files, "--bootstrap", "0", "--seed", seed, "--reference-cache",
                                            str(cache), "--json", str(out))]) == 0
        runs.append((capsys.readouterr().out, json.loads(out.read_text())["results"][0]["fid_proxy"]))
    assert "reference features from" not in runs[0][0] and cache.is_file()
    assert "reference features from" in runs[1][0] and runs[1][1] == runs[0][1]
    assert "other settings; computing them again" in runs[2][0]
    cache.write_bytes(b"junk")
    assert fid.main([files["a"], *_args(files, "--reference-cache", str(cache))]) == 2
    assert "is not a reference-features file" in capsys.readouterr().err


def test_the_reference_cache_is_not_reused_once_the_images_change(tmp_path, capsys):
    """Same config, same root, other pictures: the cache key holds the images' hash, so it is recomputed."""
    from PIL import Image

    def pictures(seed):
        rng = np.random.default_rng(seed)
        for c in ("a", "b"):
            (tmp_path / "data" / c).mkdir(parents=True, exist_ok=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")

    pictures(0)
    config = tmp_path / "folder.yaml"
    config.write_text(f"data:\n  class_path: specflow.data.images.ImageFolderDataModule\n  init_args:\n"
                      f"    root: {tmp_path / 'data'}\n    image_size: 16\n    num_workers: 0\n")
    x = _save(tmp_path / "s.npz", torch.rand(12, 3, 16, 16) * 2 - 1)
    fid = _fid_module()
    argv = [x, "--config", str(config), "--classifier-steps", "10", "--classifier-cache", str(tmp_path / "cls.pt"),
            "--reference-cache", str(tmp_path / "ref.pt"), "--bootstrap", "0"]
    printed = []
    for seed in (0, 0, 1):
        pictures(seed)
        assert fid.main(argv) == 0
        printed.append(capsys.readouterr().out)
    assert "reference features from" in printed[1] and "computing them again" in printed[2]
