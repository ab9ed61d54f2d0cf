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


# ------------------------------------------------------------------------------------------ guidance
def test_guidance_guides_the_draft_like_the_target(ckpts, monkeypatch):
    """With guidance the draft proposes the guided velocity: a draft net identical to the target then proposes
    the target's own steps (all accepted), and a control that leaves the draft unguided — what generate()
    did before — is caught by its lower acceptance."""
    import copy

    from specflow.generate import generate
    from specflow.lit import guidance as guidance_module
    from specflow.sampling import build_sampler

    target = load_target(ckpts["target"])
    twin = copy.deepcopy(target)
    acceptance = {}
    for name in ("guided", "control"):
        if name == "control":
            monkeypatch.setattr(guidance_module, "guide_draft", lambda draft, scale: draft)
        g = generate(target, build_sampler("speculative", steps=12, drafter="model", window=4), n=16, batch_size=16,
                     seed=0, labels="cycle", guidance=3.0, draft=twin)
        acceptance[name] = g.stats.acceptance_rate
    assert acceptance["guided"] > 0.99 and acceptance["control"] < 0.95, acceptance


def test_guided_trunk_and_heads_combine_both_branches(ckpts):
    """The guided trunk's output(features) is the guided call bit for bit (one and two branches); guided Medusa
    heads are the heads on each branch's features, combined like the target; end to end they run in
    speculative sampling (where the trunk was refused before)."""
    from specflow.generate import generate
    from specflow.lit.guidance import GuidedHeads, guidance, guide_draft
    from specflow.sampling import build_sampler

    target = load_target(ckpts["target"])
    heads = load_draft(ckpts["medusa"], target)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 1, 8, 8, generator=gen), torch.randn(5, 1, 8, 8, generator=gen)
    t, c = torch.rand(5, generator=gen) * 0.5, torch.arange(5)
    s, x1 = t + 0.1, torch.randn(5, 1, 8, 8, generator=gen)
    with torch.no_grad():
        for w in (0.0, 1.0, 2.5):
            g = guidance(target, w)
            h = g.features(x, t, c)
            assert torch.equal(g.output(h), g(x, t, c)), w
        assert h.shape == (5, 2, target.feature_channels, 8, 8)  # each sample's row: its conditional and unconditional features
        d = guide_draft(heads, 2.5)
        assert isinstance(d, GuidedHeads) and d.specflow.drafter == "medusa"
        v = d(y, s, c, features=h, x_src=x, t_src=t, x1_src=x1)
        v_c, v_u = (heads(y, s, None, features=h[:, i], x_src=x, t_src=t, x1_src=x1) for i in (0, 1))
        torch.testing.assert_close(v, v_u + 2.5 * (v_c - v_u))
    res = generate(target, build_sampler("speculative", steps=8, drafter="medusa", window=3), n=6, batch_size=6,
                   labels="cycle", guidance=2.0, draft=heads)
    assert res.stats.draft_nfe > 0 and torch.isfinite(res.samples).all()


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


def test_sample_py_runs_the_anchored_drafter_on_a_model_draft(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert _sample_module().main([str(ckpts["target"]), "--draft", str(ckpts["draft"]), "--sampler", "speculative",
                                  "--opt", "drafter=anchored", "--opt", "window=3", "--steps", "8", "-n", "4",
                                  "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as z:
        meta = json.loads(str(z["meta"]))
    assert meta["options"]["drafter"] == "anchored" and meta["stats"]["draft_nfe"] > 0, meta


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


def _samples(out):
    with np.load(out / "samples.npz") as z:
        return z["samples"], z["labels"] if "labels" in z.files else None, json.loads(str(z["meta"]))


def test_sample_py_resumes_a_stopped_run_where_it_stopped(ckpts, tmp_path, capsys, monkeypatch):
    """A run stopped after its first batch resumes at the second and gives the uninterrupted run's samples
    bit for bit — with a bandit too, whose learned state travels with each part; a control that starts the
    resumed bandit afresh gives other samples (the comparison can fail)."""
    from specflow.parts import Parts

    sample = _sample_module()
    argv = [str(ckpts["target"]), "--sampler", "speculative", "--opt", "drafter=frozen", "--opt", "window=bandit",
            "--opt", "policy=thompson", "--steps", "12", "-n", "7", "--batch-size", "3", "--labels", "random"]
    assert sample.main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole, labels, meta = _samples(tmp_path / "whole")
    assert not (tmp_path / "whole" / "parts").exists()  # merged: one process's parts are removed

    write = Parts.write

    def stop_after_the_first(self, b, *a):
        if b == 1:
            raise KeyboardInterrupt  # the job is killed while sampling batch 1
        return write(self, b, *a)

    for name, fresh_bandit in (("resumed", False), ("control", True)):
        out = tmp_path / name
        monkeypatch.setattr(Parts, "write", stop_after_the_first)
        with pytest.raises(KeyboardInterrupt):
            sample.main([*argv, "--out", str(out)])
        assert [p.name for p in (out / "parts").iterdir()] == ["b000000.npz"] and not (out / "samples.npz").exists()
        monkeypatch.setattr(Parts, "write", write)
        if fresh_bandit:
            monkeypatch.setattr(Parts, "state_before", lambda self, b, stride: None)
        capsys.readouterr()
        assert sample.main([*argv, "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "resuming: 1 of this process's 3 parts" in printed and "part 1/3" not in printed and "part 3/3" in printed
        got, got_labels, got_meta = _samples(out)
        assert np.array_equal(got_labels, labels) and got_meta["stats"]["sequential_nfe"] > 0
        if fresh_bandit:
            assert not np.array_equal(got, whole)  # the control: the bandit's state changes the samples
        else:
            assert np.array_equal(got, whole)


def test_sample_py_processes_share_a_run_and_the_last_one_merges(ckpts, tmp_path, capsys, monkeypatch):
    sample = _sample_module()
    argv = [str(ckpts["target"]), "--sampler", "sde", "--steps", "4", "-n", "5", "--batch-size", "2",
            "--labels", "cycle"]
    assert sample.main([*argv, "--out", str(tmp_path / "one")]) == 0
    one, _, _ = _samples(tmp_path / "one")
    capsys.readouterr()
    out = tmp_path / "shared"
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sample.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out  # process 1 of 2 makes batch 1 of 0, 1, 2
    assert "part 2/3" in printed and "2 of 3 parts still to come" in printed and not (out / "samples.npz").exists()
    assert sample.main([*argv, "--out", str(out), "--rank", "0"]) == 0  # the flag wins over $RANK
    shared, _, meta = _samples(out)
    assert np.array_equal(shared, one) and meta["world_size"] == 2
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["b000000.npz", "b000001.npz", "b000002.npz"]

    # Parts of another run in the folder: an error naming what differs, before sampling; nothing touched.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    capsys.readouterr()
    assert sample.main([*argv, "--out", str(out), "--seed", "1", "--rank", "0"]) == 2
    err = capsys.readouterr().err
    assert "another run" in err and "seed" in err and "steps" not in err
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    assert sample.main([*argv, "--out", str(out), "--rank", "2"]) == 2
    assert "--rank must lie in [0, --world-size)" in capsys.readouterr().err


def test_sample_py_remakes_damaged_and_missing_parts_with_the_bandit_state_of_their_place(ckpts, tmp_path, capsys):
    """Parts 1 (damaged) and 3 (deleted) of a finished bandit run are made again, each from the bandit state
    after the part before it — batch 3 from part 2's, not from the re-made part 1's — giving the run bit for bit."""
    sample = _sample_module()
    argv = [str(ckpts["target"]), "--sampler", "speculative", "--opt", "drafter=frozen", "--opt", "window=bandit",
            "--opt", "policy=thompson", "--steps", "12", "-n", "10", "--batch-size", "2", "--keep-parts"]
    out = tmp_path / "run"
    assert sample.main([*argv, "--out", str(out)]) == 0
    whole, _, meta = _samples(out)
    assert _samples(out)[1] is None and meta["key"]["world_size"] == 1
    (out / "parts" / "b000001.npz").write_bytes(b"not a part")
    (out / "parts" / "b000003.npz").unlink()
    (out / "samples.npz").unlink()
    capsys.readouterr()
    assert sample.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "b000001.npz is unreadable" in printed and "part 2/5" in printed and "part 4/5" in printed
    assert "part 3/5" not in printed and np.array_equal(_samples(out)[0], whole)


def test_sample_py_remakes_another_process_damaged_part_and_merge_names_an_unreadable_one(ckpts, tmp_path, capsys):
    from specflow.parts import Parts

    sample = _sample_module()
    argv = [str(ckpts["target"]), "--sampler", "euler", "--steps", "3", "-n", "6", "--batch-size", "2"]
    assert sample.main([*argv, "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "shared"
    assert sample.main([*argv, "--out", str(out), "--rank", "1", "--world-size", "2"]) == 0
    (out / "parts" / "b000001.npz").write_bytes(b"")  # process 1 finished; its part was damaged since
    capsys.readouterr()
    assert sample.main([*argv, "--out", str(out), "--rank", "0", "--world-size", "2"]) == 0
    assert "sampling again the damaged parts [1]" in capsys.readouterr().out
    assert np.array_equal(_samples(out)[0], _samples(tmp_path / "one")[0])

    parts = Parts(out / "parts", _samples(out)[2]["key"], 3)
    (out / "parts" / "b000002.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"part .*b000002\.npz cannot be read .* delete it and run the same"):
        parts.merge()


def test_sample_py_a_learning_sampler_resumes_only_with_the_same_number_of_processes(ckpts, tmp_path, capsys):
    sample = _sample_module()
    argv = [str(ckpts["target"]), "--sampler", "sfm", "--opt", "leap=bandit", "--steps", "8", "-n", "4",
            "--batch-size", "2", "--out", str(tmp_path / "run")]
    assert sample.main([*argv, "--rank", "0", "--world-size", "2"]) == 0
    capsys.readouterr()
    assert sample.main(argv) == 2  # one process would redo batch 1 after batch 0: another bandit, other samples
    err = capsys.readouterr().err
    assert "another run" in err and "world_size" in err and "seed" not in err


def test_sample_py_a_finished_run_is_not_sampled_again_nor_overwritten(ckpts, tmp_path, capsys):
    sample = _sample_module()
    out = tmp_path / "run"
    argv = [str(ckpts["target"]), "--sampler", "euler", "--steps", "3", "-n", "4", "--batch-size", "2",
            "--out", str(out)]
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "notes.txt").write_text("mine")  # a user's file where the parts go: never deleted
    assert sample.main(argv) == 0
    assert [p.name for p in (out / "parts").iterdir()] == ["notes.txt"]
    stamp = (out / "samples.npz").stat().st_mtime_ns
    capsys.readouterr()
    assert sample.main(argv) == 0
    assert "already holds this run; nothing to do" in capsys.readouterr().out
    assert (out / "samples.npz").stat().st_mtime_ns == stamp
    assert sample.main([*argv, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds another run (it differs in seed)" in err and "--force" in err
    assert (out / "samples.npz").stat().st_mtime_ns == stamp
    assert sample.main([*argv, "--seed", "3", "--force", "--keep-parts"]) == 0
    assert _samples(out)[2]["seed"] == 3
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["b000000.npz", "b000001.npz", "notes.txt"]

    # Parts written before parts recorded their process (no 'rank') still merge.
    parts = out / "parts"
    for part in sorted(parts.glob("b*.npz")):
        with np.load(part) as z:
            arrays = {k: z[k] for k in z.files if k != "rank"}
        np.savez(part, **arrays)
    kept = _samples(out)[0]
    (out / "samples.npz").unlink()
    capsys.readouterr()
    assert sample.main([*argv, "--seed", "3", "--keep-parts"]) == 0
    assert np.array_equal(_samples(out)[0], kept) and "part 1/2" not in capsys.readouterr().out  # merged only

    # A samples.npz this sample.py did not write (older, or not ours), or an unreadable one: each said plainly.
    np.savez(out / "samples.npz", samples=np.zeros((2, 1, 8, 8)), meta=json.dumps({"seed": 3}))
    assert sample.main(argv) == 2
    assert "was not written by this sample.py (no run settings" in capsys.readouterr().err
    (out / "samples.npz").write_bytes(b"junk")
    assert sample.main(argv) == 2
    assert "exists but cannot be read" in capsys.readouterr().err and (out / "samples.npz").read_bytes() == b"junk"


def test_sample_py_picks_each_process_its_own_gpu(monkeypatch):
    sample = _sample_module()
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert sample.device_for("cuda", 4) == "cuda"
    monkeypatch.setenv("SLURM_LOCALID", "2")  # srun
    assert sample.device_for("cuda", 4) == "cuda:2"
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun
    assert sample.device_for("cuda", 4) == "cuda:3"
    assert sample.device_for("cuda", 1) == "cuda" and sample.device_for("cuda:1", 4) == "cuda:1"
    assert sample.device_for("cpu", 4) == "cpu"
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)  # srun gave each task of the node 2 GPUs
    assert sample.device_for("cuda", 4) == "cuda:1"


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
              "'model' draft but --opt drafter=medusa does not read one; drop the option or use drafter=anchored "
              "or model")]
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


def test_fid_py_scores_sample_py_outputs_and_pairs_those_of_one_seed(ckpts, tmp_path, capsys):
    """sample.py's samples.npz is what fid.py reads: two samplers at one seed are paired (same noise per row)."""
    sample = _sample_module()
    spec = importlib.util.spec_from_file_location("fid_script", ROOT / "fid.py")
    fid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid)
    argv = [str(ckpts["target"]), "--steps", "4", "-n", "12", "--batch-size", "6", "--labels", "cycle"]
    for sampler in ("euler", "heun"):
        assert sample.main([*argv, "--sampler", sampler, "--out", str(tmp_path / sampler)]) == 0
    out = tmp_path / "fid.json"
    assert fid.main([str(tmp_path / "euler" / "samples.npz"), str(tmp_path / "heun" / "samples.npz"),
                     "--config", str(ROOT / "configs/digits.yaml"), "--reference", "64", "--bootstrap", "10",
                     "--classifier-steps", "20", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["sampler"] for r in rows] == ["euler", "heun"] and rows[1]["paired"]
    assert len(rows[1]["fid_proxy_minus_first_interval"]) == 2 and "heun" in capsys.readouterr().out


def test_sample_py_exports_for_other_fid_tools(ckpts, tmp_path, capsys):
    """--export adm: guided-diffusion's evaluator batch (arr_0 uint8 NHWC RGB, arr_1 labels); --export png: one PNG
    per sample. Both hold the samples of samples.npz, rounded to uint8; an unrelated folder is never replaced."""
    from torchvision.io import read_image

    sample = _sample_module()
    out = tmp_path / "run"
    argv = [str(ckpts["target"]), "--sampler", "euler", "--steps", "3", "-n", "5", "--batch-size", "3",
            "--labels", "cycle", "--out", str(out), "--export", "adm", "png"]
    assert sample.main(argv) == 0
    x, labels, _ = _samples(out)
    want = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (5, 8, 8, 1)
    with np.load(out / "samples_adm.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 8, 8, 3)
        assert (z["arr_0"] == want).all() and np.array_equal(z["arr_1"], labels)
    pngs = sorted((out / "samples_png").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(read_image(str(pngs[4])).numpy(), want[4].transpose(2, 0, 1))
    assert len(set(np.unique(want))) > 10  # the images are not constant: the comparison means something

    # Asked for on a finished run: written from samples.npz, no sampling; --force without --export removes the
    # earlier exports, which would no longer match the new samples.
    (out / "samples_adm.npz").unlink()
    capsys.readouterr()
    assert sample.main([a for a in argv if a != "png"]) == 0
    printed = capsys.readouterr().out
    assert "already holds this run" in printed and "samples_adm.npz" in printed and "part 1/2" not in printed
    with np.load(out / "samples_adm.npz") as z:
        assert (z["arr_0"] == want).all()
    no_export = argv[:argv.index("--export")]
    assert sample.main([*no_export, "--force", "--keep-parts"]) == 0
    assert "removed the earlier adm and png export" in capsys.readouterr().out
    assert not (out / "samples_adm.npz").exists() and not (out / "samples_png").exists()
    assert sample.main(argv) == 0 and len(list((out / "samples_png").iterdir())) == 5  # from the finished run

    # Exports without their samples.npz may be the only copy of earlier samples: a new run is refused.
    (out / "samples.npz").rename(tmp_path / "kept.npz")
    capsys.readouterr()
    assert sample.main([*argv, "--seed", "2"]) == 2
    assert "holds an earlier export (samples_adm.npz, samples_png)" in capsys.readouterr().err
    (tmp_path / "kept.npz").rename(out / "samples.npz")

    (out / "samples_png" / "mine.txt").write_text("keep")
    stamp = (out / "samples.npz").stat().st_mtime_ns
    capsys.readouterr()
    assert sample.main([*argv, "--force", "--seed", "1"]) == 2  # refused before sampling: nothing rewritten
    assert (out / "samples.npz").stat().st_mtime_ns == stamp
    assert "samples_png exists and is not an earlier export (mine.txt)" in capsys.readouterr().err
    assert (out / "samples_png" / "mine.txt").read_text() == "keep" and len(list((out / "samples_png").iterdir())) == 6


def test_a_fashion_draft_given_to_a_digits_target_is_refused(ckpts, tmp_path):
    """A draft trained on a (tiny) Fashion-MNIST target, loaded against the digits target: one error naming
    both fingerprints, not a shape error deep inside the heads."""
    from specflow.data import FashionMNISTDataModule
    from test_fashion_data import write_set

    write_set(tmp_path / "fm")
    data = lambda: FashionMNISTDataModule(root=str(tmp_path / "fm"), image_size=14, batch_size=8)  # noqa: E731
    fnet = dict(NET, image_size=14)
    pl.seed_everything(0)
    tr = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    tr.fit(TargetFlow(arch="unet", net=fnet, lr=1e-3, ema_decay=0.5), data())
    tr.save_checkpoint(tmp_path / "fashion.ckpt")
    tr = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    tr.fit(MedusaFlow(target_ckpt=str(tmp_path / "fashion.ckpt"), hidden=8, depth=1, offsets=2, steps=[8]), data())
    tr.save_checkpoint(tmp_path / "fashion_medusa.ckpt")
    digits, fashion = load_target(ckpts["target"]), load_target(tmp_path / "fashion.ckpt")
    with pytest.raises(ValueError) as e:
        load_draft(tmp_path / "fashion_medusa.ckpt", digits)
    msg = str(e.value)
    assert fashion.specflow.fingerprint in msg and digits.specflow.fingerprint in msg
    load_draft(tmp_path / "fashion_medusa.ckpt", fashion)  # its own target takes it
