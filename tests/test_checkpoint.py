"""Checkpoint loaders (fingerprints, safe loading, clear errors) and sample.py end to end, on tiny digits models.

One module fixture trains (a few steps each, CPU) two tiny UNet targets and, against the first, a Medusa head
set and a small draft net, all through the real Lightning modules and checkpoints.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import specflow
from specflow.checkpoint import load_draft, load_target, parse_device
from specflow.data.images import DigitsDataModule
from specflow.lit.draft import DraftFlow, MedusaFlow
from specflow.lit.target import TargetFlow

ROOT = Path(__file__).resolve().parents[1]
NET = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
           attention_resolutions=[], num_heads=1, num_classes=10)


def _fit(module, tmp, steps=2):
    tr = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp, limit_val_batches=0)
    tr.fit(module, DigitsDataModule(batch_size=16, val_fraction=0.0))
    return tr


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for name, seed in (("target", 0), ("other", 1)):
        pl.seed_everything(seed)
        _fit(TargetFlow(arch="unet", net=NET, lr=1e-3, ema_decay=0.5), tmp).save_checkpoint(tmp / f"{name}.ckpt")
        paths[name] = tmp / f"{name}.ckpt"
    pl.seed_everything(0)
    _fit(MedusaFlow(target_ckpt=str(paths["target"]), hidden=8, depth=1, offsets=3, steps=[8]), tmp).save_checkpoint(
        tmp / "medusa.ckpt")
    small = dict(NET, model_channels=4, channel_mult=[1])
    _fit(DraftFlow(target_ckpt=str(paths["target"]), arch="unet", net=small), tmp).save_checkpoint(tmp / "draft.ckpt")
    paths.update(medusa=tmp / "medusa.ckpt", draft=tmp / "draft.ckpt")
    return paths


# ------------------------------------------------------------------------------------------ loaders
def test_load_target_is_the_frozen_ema_net_with_a_stable_fingerprint(ckpts):
    net = specflow.load_target(ckpts["target"])
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    lit = TargetFlow.load_from_checkpoint(ckpts["target"])
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4)
    with torch.no_grad():
        assert torch.equal(net(x, t, y), lit.velocity_model()(x, t, y))  # the EMA weights, not the online net
    assert load_target(ckpts["target"]).specflow.fingerprint == net.specflow.fingerprint
    assert load_target(ckpts["other"]).specflow.fingerprint != net.specflow.fingerprint


@pytest.mark.parametrize("kind,cls", [("medusa", MedusaFlow), ("draft", DraftFlow)])
def test_load_draft_rebuilds_the_trained_draft(ckpts, kind, cls):
    target = load_target(ckpts["target"])
    draft = specflow.load_draft(ckpts[kind], target)
    assert draft.specflow.drafter == ("medusa" if kind == "medusa" else "model") and not draft.training
    lit = cls.load_from_checkpoint(ckpts[kind])  # no config, no target needed
    for k, v in lit.draft.state_dict().items():
        assert torch.equal(draft.state_dict()[k], v), k
    assert not any(k.startswith("target.") for k in torch.load(ckpts[kind], weights_only=True)["state_dict"])


def test_a_draft_for_another_target_is_refused_naming_both_fingerprints(ckpts):
    mine, other = load_target(ckpts["target"]), load_target(ckpts["other"])
    with pytest.raises(ValueError) as e:
        load_draft(ckpts["medusa"], other)
    msg = str(e.value)
    assert mine.specflow.fingerprint in msg and other.specflow.fingerprint in msg and "train_draft.py" in msg


def test_bad_checkpoint_files_are_clear_errors(ckpts, tmp_path):
    target = load_target(ckpts["target"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_target(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_draft(tmp_path / "nope.ckpt", target)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_target(junk)
    cut = tmp_path / "truncated.ckpt"
    cut.write_bytes(ckpts["target"].read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_target(cut)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "obj": _Opaque()}, pickled)
    with pytest.raises(ValueError, match="pickled Python objects"):
        load_draft(pickled, target)
    with pytest.raises(ValueError, match="is a DRAFT checkpoint"):
        load_target(ckpts["medusa"])
    with pytest.raises(ValueError, match="is a TARGET checkpoint"):
        load_draft(ckpts["other"], target)
    with pytest.raises(ValueError, match="directory"):
        load_target(tmp_path)


class _Opaque:
    pass


@pytest.mark.parametrize("device", ["banana", "cuda:x", "gpu"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_bad_device_strings_are_clear_errors(ckpts, device):
    with pytest.raises(ValueError, match="device"):
        parse_device(device)
    with pytest.raises(ValueError, match=repr(device)):
        load_target(ckpts["target"], device=device)


# ------------------------------------------------------------------------------------------ sample.py
def _sample_module():
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_py_end_to_end_with_a_medusa_draft(ckpts, tmp_path, capsys):
    sample = _sample_module()
    out = tmp_path / "out"
    rc = sample.main([str(ckpts["target"]), "--draft", str(ckpts["medusa"]), "--sampler", "speculative",
                      "--opt", "window=3", "--steps", "8", "-n", "6", "--batch-size", "4", "--labels", "cycle",
                      "--seed", "3", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "acceptance_rate" in printed and "sequential_nfe" in printed
    assert (out / "samples.png").stat().st_size > 0
    with np.load(out / "samples.npz") as z:
        assert z["samples"].shape == (6, 1, 8, 8) and np.isfinite(z["samples"]).all()
        assert z["labels"].tolist() == [0, 1, 2, 3, 4, 5]
        meta = json.loads(str(z["meta"]))
    assert meta["options"] == {"window": 3, "drafter": "medusa"} and meta["stats"]["draft_nfe"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_sample_py_samples_do_not_depend_on_the_batch_size(ckpts, tmp_path):
    sample = _sample_module()
    got = []
    for bs in (2, 5):
        assert sample.main([str(ckpts["target"]), "--sampler", "sde", "--steps", "6", "-n", "5", "--batch-size",
                            str(bs), "--labels", "random", "--guidance", "2", "--out", str(tmp_path / str(bs))]) == 0
        with np.load(tmp_path / str(bs) / "samples.npz") as z:
            got.append(z["samples"])
    np.testing.assert_allclose(got[0], got[1], atol=1e-5)
    assert np.abs(got[0][0] - got[0][1]).max() > 1e-3  # control: different samples really differ


def test_sample_py_bf16_runs_the_networks_under_autocast(ckpts, tmp_path):
    """--precision bf16 end to end: with a medusa draft (the trunk's features pass through the wrapper) the
    samples stay near float32's and are recorded as bf16; guidance runs too. (That the nets really run under
    autocast is tests/test_precision.py's job.)"""
    sample = _sample_module()
    runs = {}
    for prec in ("32", "bf16"):
        out = tmp_path / prec
        assert sample.main([str(ckpts["target"]), "--draft", str(ckpts["medusa"]), "--sampler", "speculative",
                            "--opt", "window=3", "--steps", "8", "-n", "4", "--labels", "cycle", "--precision", prec,
                            "--out", str(out)]) == 0
        with np.load(out / "samples.npz") as z:
            runs[prec] = (z["samples"], json.loads(str(z["meta"])))
    diff = np.abs(runs["bf16"][0] - runs["32"][0])
    assert runs["bf16"][1]["precision"] == "bf16" and runs["bf16"][0].dtype == np.float32
    assert 0 < diff.mean() < 0.05, diff.mean()  # bf16 rounding changes the samples a little, not more
    assert sample.main([str(ckpts["target"]), "--sampler", "sde", "--steps", "4", "-n", "2", "--labels", "random",
                        "--guidance", "2", "--precision", "bf16", "--out", str(tmp_path / "g")]) == 0


@pytest.mark.parametrize("args,message", [
    (["-n", "0"], "positive"),
    (["--batch-size", "-1"], "positive"),
    (["--sampler", "nope"], "unknown sampler 'nope'; valid: .*speculative"),
    (["--opt", "window=3"], "unknown option"),
    (["--opt", "noequals"], "key=value"),
    (["--device", "banana"], "device 'banana'"),
    (["--sampler", "speculative", "--opt", "drafter=medusa"], "needs --draft"),
    (["--labels", "1,x"], "--labels"),
])
def test_sample_py_bad_input_is_a_clear_error_and_leaves_outputs_alone(ckpts, tmp_path, capsys, args, message):
    sample = _sample_module()
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.png").write_bytes(b"old")
    rc = sample.main([str(ckpts["target"]), "--out", str(out), "--steps", "4", "-n", "2", *args])
    assert rc == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert (out / "samples.png").read_bytes() == b"old" and not (out / "samples.npz").exists()


def test_sample_py_checkpoint_and_output_errors(ckpts, tmp_path, capsys):
    sample = _sample_module()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [([str(ckpts["target"]), "--out", str(blocker / "sub")], "not writable"),
             ([str(ckpts["target"]), "--out", str(blocker)], "not a directory"),
             ([str(tmp_path / "missing.ckpt")], "does not exist"),
             ([str(ckpts["medusa"])], "DRAFT checkpoint"),
             ([str(ckpts["other"]), "--draft", str(ckpts["medusa"]), "--sampler", "speculative"], "fingerprint"),
             ([str(ckpts["target"]), "--draft", str(ckpts["draft"]), "--sampler", "sfm", "--opt", "drafter=medusa"],
              "'model' draft")]
    for argv, message in cases:
        assert sample.main([*argv, "--steps", "4", "-n", "2"]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_sample_py_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        _sample_module().main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--draft", "--sampler", "--opt", "--steps", "--num-samples", "--batch-size", "--seed", "--labels",
                "--guidance", "--device", "--precision", "--out"):
        assert opt in text, opt


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["digits_draft", "digits_medusa", "cifar10_medusa"])
def test_draft_configs_validate(name, capsys):
    from specflow.cli import draft_main

    with pytest.raises(SystemExit) as e:
        draft_main(["fit", "--config", str(ROOT / f"configs/{name}.yaml"), "--print_config"])
    assert e.value.code in (0, None)
    assert "specflow.lit.draft" in capsys.readouterr().out


def test_draft_cli_trains_against_a_target_checkpoint(ckpts, tmp_path):
    from specflow.cli import draft_main

    cli = draft_main(["fit", "--config", str(ROOT / "configs/digits_medusa.yaml"), "--model.target_ckpt",
                      str(ckpts["target"]), "--model.hidden", "8", "--model.offsets", "2", "--trainer.max_steps", "2",
                      "--trainer.max_time", "null", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                      "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"), "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false"])
    assert cli.trainer.global_step == 2
    draft = load_draft(tmp_path / "ckpt" / "last.ckpt", load_target(ckpts["target"]))
    assert draft.offsets == 2
