"""Bad input across the three front doors — train.py (LightningCLI), sample.py and the Python API — each one
clear error that names the problem and the fix, leaving existing outputs untouched.

This file is the index; deeper variants live beside the code they guard (test_train.py, test_checkpoint.py,
test_sampler_api.py, test_deterministic.py, test_bandit.py).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import specflow
from specflow.cli import main as train_main
from specflow.data.images import DigitsDataModule
from specflow.data.toy import GaussianMixture
from specflow.generate import generate
from specflow.lit.target import TargetFlow
from specflow.sampling import build_sampler
from specflow.sampling.bandit import Bandit

ROOT = Path(__file__).resolve().parents[1]
NET = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
           attention_resolutions=[], num_heads=1, num_classes=10)
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.logger", "false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained target checkpoint, and an output folder holding results that must survive every error."""
    tmp = tmp_path_factory.mktemp("bad")
    tr = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp, limit_val_batches=0)
    tr.fit(TargetFlow(arch="unet", net=NET), DigitsDataModule(batch_size=8, val_fraction=0.0))
    tr.save_checkpoint(tmp / "target.ckpt")
    (tmp / "junk.ckpt").write_bytes(b"\x00not a checkpoint")
    out = tmp / "out"
    out.mkdir()
    (out / "samples.png").write_bytes(b"previous png")
    (out / "samples.npz").write_bytes(b"previous npz")
    return tmp


def _sample_main():
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _train(tmp, *args):
    return train_main(["fit", "--config", str(ROOT / "configs/digits.yaml"), *QUIET,
                       "--trainer.default_root_dir", str(tmp), "--trainer.max_steps", "1", *args])


gm = GaussianMixture.default()
nan_model = lambda x, t, c=None: torch.where(t[:, None] > 0.3, float("nan"), 0.0) * x
wrong_shape = lambda x, t, c=None: x[:, :1]

# (id, kind, call(tmp) or argv, expected exception, message regex naming the problem/fix)
CASES = [
    # --- Python API: samplers
    ("unknown sampler", "api", lambda tmp: build_sampler("eular"), ValueError, r"unknown sampler 'eular'; valid: .*euler"),
    ("unknown option", "api", lambda tmp: build_sampler("speculative", windw=4), ValueError, r"unknown option.*windw.*valid:.*window"),
    ("steps < 1", "api", lambda tmp: build_sampler("euler", steps=0), ValueError, r"steps must be an integer >= 1, got 0"),
    ("window < 1", "api", lambda tmp: build_sampler("speculative", window=0), ValueError, r"window"),
    ("unknown drafter", "api", lambda tmp: build_sampler("speculative", drafter="oracle"), ValueError, r"drafter.*valid.*frozen"),
    ("tol <= 0", "api", lambda tmp: build_sampler("sfm", tol=0.0), ValueError, r"tol"),
    ("unsorted arms", "api", lambda tmp: build_sampler("fastflow", arms=(4, 1)), ValueError, r"arms"),
    ("skip arm longer than grid", "api", lambda tmp: build_sampler("fastflow", steps=8, arms=(0, 6)), ValueError, r"longer than a grid of 8"),
    ("bandit state for other arms", "api",
     lambda tmp: Bandit((1, 2, 4)).load_state_dict(Bandit((1, 2)).state_dict()), ValueError, r"arms"),
    ("noise/cond batch mismatch", "api",
     lambda tmp: build_sampler("euler", steps=2).sample(gm, torch.randn(4, 2), cond=torch.zeros(3, dtype=torch.long)),
     ValueError, r"cond must have one row per sample: noise has batch 4"),
    ("model returns NaN", "api", lambda tmp: build_sampler("sde", steps=4).sample(nan_model, torch.randn(4, 2)),
     FloatingPointError, r"NaN/Inf at step 2, t=0\.5"),
    ("model returns wrong shape", "api", lambda tmp: build_sampler("heun", steps=4).sample(wrong_shape, torch.randn(4, 2)),
     ValueError, r"returned \(4, 1\) for input \(4, 2\) at step 0"),
    ("wrong number of generators", "api",
     lambda tmp: build_sampler("sde", steps=2).sample(gm, torch.randn(4, 2), generator=[torch.Generator()] * 3),
     ValueError, r"3 per-sample generators for a batch of 4"),
    # --- Python API: checkpoints and generation
    ("missing target checkpoint", "api", lambda tmp: specflow.load_target(tmp / "nope.ckpt"), FileNotFoundError, r"nope\.ckpt"),
    ("corrupt checkpoint", "api", lambda tmp: specflow.load_target(tmp / "junk.ckpt"), ValueError, r"junk\.ckpt"),
    ("target passed as draft", "api",
     lambda tmp: specflow.load_draft(tmp / "target.ckpt", specflow.load_target(tmp / "target.ckpt")), ValueError,
     r"TARGET checkpoint.*not a draft"),
    ("bad device string", "api", lambda tmp: specflow.load_target(tmp / "target.ckpt", device="gpu0"), ValueError, r"gpu0"),
    ("n <= 0", "api",
     lambda tmp: generate(specflow.load_target(tmp / "target.ckpt"), build_sampler("euler", steps=2), n=0, batch_size=4),
     ValueError, r"positive integer, got 0"),
    # --- train.py
    ("train: unknown config key", "train", lambda tmp: _train(tmp, "--model.learning_rate", "0.1"), SystemExit, None),
    ("train: image size the net cannot take", "train",
     lambda tmp: _train(tmp, "--data.image_size", "16", "--model.net",
                        '{"image_size": 10, "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2, 2], '
                        '"num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1, "num_classes": 10}'),
     ValueError, r"cannot take image_size=10"),
    ("train: missing CIFAR root", "train",
     lambda tmp: train_main(["fit", "--data", "specflow.data.images.CIFAR10DataModule", "--data.root", str(tmp / "nocifar"),
                             "--trainer.accelerator", "cpu", *QUIET]),
     Exception, r"cifar-10-batches-py/.*download: true"),  # jsonargparse wraps it in a ValueError
    # --- sample.py (returns exit code 2 and prints the message on stderr)
    ("sample.py: n <= 0", "sample", ["-n", "0"], None, r"positive"),
    ("sample.py: unknown sampler", "sample", ["--sampler", "nope"], None, r"unknown sampler 'nope'"),
    ("sample.py: bad device", "sample", ["--device", "banana"], None, r"banana"),
    ("sample.py: missing checkpoint", "sample-ckpt", ["missing.ckpt"], None, r"does not exist"),
    ("sample.py: corrupt checkpoint", "sample-ckpt", ["junk.ckpt"], None, r"junk\.ckpt"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_outputs_survive(case, run, capsys):
    name, kind, call, exc, message = case
    if kind in ("sample", "sample-ckpt"):
        argv = [str(run / call[0])] if kind == "sample-ckpt" else [str(run / "target.ckpt")]
        defaults = ["--out", str(run / "out"), "--steps", "4", "-n", "2"]
        rc = _sample_main()([*argv, *defaults, *(call if kind == "sample" else [])])  # the case's args win
        assert rc == 2, name
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert "Traceback" not in err
    else:
        with pytest.raises(exc) as e:
            call(run)
        if message is not None:
            assert re.search(message, str(e.value)), str(e.value)
        else:  # jsonargparse prints the offending key and exits non-zero
            assert e.value.code != 0 and "learning_rate" in capsys.readouterr().err
    assert (run / "out" / "samples.png").read_bytes() == b"previous png"
    assert (run / "out" / "samples.npz").read_bytes() == b"previous npz"


def test_the_index_covers_every_front_door():
    kinds = {c[1].split("-")[0] for c in CASES}
    assert kinds == {"api", "train", "sample"} and len(CASES) >= 15
