"""SamplingEvaluation: one 2-rank DDP run (``ddp_fork``, CPU) checked against single-process generation, plus
cheap single-process checks of scheduling, state and configuration."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from specflow.cli import main
from specflow.data import DigitsDataModule, ToyMixtureDataModule
from specflow.lit.callbacks import SamplingEvaluation, sample_indices
from specflow.lit.target import TargetFlow
from specflow.precision import Autocast
from specflow.sampling import build_sampler

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                 attention_resolutions=[], num_heads=1, num_classes=10)
# Samplers whose per-sample work ignores the batch: reproducible across batch sizes and ranks.
PER_SAMPLE = [dict(name="euler", steps=6), dict(name="sde", steps=8),
              dict(name="speculative", steps=8, window=3), dict(name="sfm", steps=8)]
N = 63  # odd: rank 0 draws 32 samples, rank 1 draws 31 (exercises the padded gather)
QUIET = dict(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             limit_val_batches=0)


def _tb_tags(folder: Path) -> tuple[set, set]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(folder.rglob("events.out.tfevents.*")).parent)).Reload()
    return set(acc.Tags()["images"]), set(acc.Tags()["scalars"])


def test_two_rank_evaluation_gathers_logs_and_matches_one_process(tmp_path):
    pl.seed_everything(0)
    model = TargetFlow(arch="unet", net=TINY_UNET, lr=1e-3, ema_decay=0.9)
    cb = SamplingEvaluation(samplers=[*PER_SAMPLE, dict(name="fastflow", steps=12)], num_samples=N, seed=5,
                            every_n_steps=2, batch_size=16, feature_extractor="classifier", classifier_steps=30,
                            classifier_cache=str(tmp_path / "cnn.pt"), reference_size=100, kid_subsets=5,
                            save_dir=str(tmp_path / "eval"))
    trainer = pl.Trainer(devices=2, strategy="ddp_fork", max_steps=2, callbacks=[cb],
                         logger=TensorBoardLogger(tmp_path, name="tb"), **QUIET)
    trainer.fit(model, DigitsDataModule(batch_size=32))

    # Gathered: every sampler wrote all N samples, in index order, on rank 0.
    labels = ["euler", "sde", "speculative", "sfm", "fastflow"]
    saved = {k: np.load(tmp_path / "eval" / f"step0000002_{k}.npz") for k in labels}
    for k, z in saved.items():
        assert z["samples"].shape == (N, 1, 8, 8) and np.isfinite(z["samples"]).all(), k
        assert (tmp_path / "eval" / f"step0000002_{k}.png").is_file()
    # Logged: cost and quality per sampler (back from rank 0), and the grids/scalars in TensorBoard.
    got = trainer.callback_metrics
    for k in labels:
        for m in ("sequential_nfe", "total_nfe", "draft_nfe", "wall_time_s", "fid_proxy", "kid_proxy"):
            assert f"eval/{k}/{m}" in got, (k, m, sorted(got))
    assert got["eval/euler/sequential_nfe"] == 6 and got["eval/euler/total_nfe"] == 6
    assert got["eval/sde/total_nfe"] == 8
    assert 0 <= got["eval/speculative/acceptance_rate"] <= 1 and "eval/speculative/rounds" in got
    assert any(k.startswith("eval/fastflow/arm_") for k in got)  # the bandit's arm counts
    images, scalars = _tb_tags(tmp_path / "tb")
    assert {f"eval/{k}" for k in labels} <= images
    assert {"eval/speculative/acceptance_rate", "eval/euler/fid_proxy", "eval/sfm/sequential_nfe"} <= scalars
    learnt = {t for t in scalars if t.startswith("eval/fastflow/bandit/bucket")}  # the learnt schedule
    assert learnt and {t.rsplit("/", 1)[1] for t in learnt} == {"arm", "reward"}, sorted(scalars)
    assert (tmp_path / "cnn.pt").is_file()  # the FID-proxy classifier, trained on rank 0, cached

    # Reproducible: the same (seed, index) gives the same sample split over 2 ranks, in one batch of 64, or
    # alone — up to float32 round-off (the net's kernels differ with the batch size by ~1e-7).
    net = trainer.lightning_module.velocity_model()
    for cfg in PER_SAMPLE:
        cfg = dict(cfg)
        make = lambda: build_sampler(cfg["name"], **{k: v for k, v in cfg.items() if k != "name"})
        batch, _ = sample_indices(net, make(), range(64), (1, 8, 8), 5, 10, batch_size=64)
        ddp = torch.from_numpy(saved[cfg["name"]]["samples"])
        torch.testing.assert_close(batch[:N], ddp, rtol=0, atol=1e-5, msg=f"{cfg}: 2 ranks vs batch of 64")
        for i in (0, 1, 32, 62):
            alone, _ = sample_indices(net, make(), [i], (1, 8, 8), 5, 10)
            torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-5, msg=f"{cfg}: index {i} alone")
    # Controls: another seed or another index is another sample (the comparisons above can fail).
    other, _ = sample_indices(net, build_sampler("sde", steps=8), [0, 1], (1, 8, 8), 6, 10)
    assert (other[0] - batch[0]).abs().max() > 0.1 and (batch[0] - batch[1]).abs().max() > 0.1


def test_schedule_state_and_vector_data(tmp_path):
    """Every epoch on 2-D data (no images, no FID): evaluations run on schedule, the fastflow bandit keeps
    learning across them, and its state round-trips through the callback's state_dict."""
    pl.seed_everything(0)
    model = TargetFlow(arch="mlp", net=dict(dim=2, hidden=16, depth=2), ema_decay=0.9)
    cb = SamplingEvaluation(samplers=[dict(name="fastflow", steps=12)], every_n_steps=None, every_n_epochs=1,
                            num_samples=20, feature_extractor="auto")
    calls = []
    evaluate = cb.evaluate
    cb.evaluate = lambda tr, m: calls.append(tr.global_step) or evaluate(tr, m)
    trainer = pl.Trainer(devices=1, max_epochs=3, limit_train_batches=2, logger=False, callbacks=[cb], **QUIET)
    trainer.fit(model, ToyMixtureDataModule(dim=2, num_samples=200, batch_size=50))
    assert calls == [2, 4, 6]
    assert not any("fid" in k for k in cb.last_metrics) and cb.last_metrics["eval/fastflow/total_nfe"] > 0
    state = cb.state_dict()["samplers"]["fastflow"]
    assert state["mu"] is not None and int(state["bandit"]["n"].sum()) > 0  # calibrated, then learned
    trainer.save_checkpoint(tmp_path / "eval.ckpt")  # the bandit state rides along, loadable weights_only
    saved = torch.load(tmp_path / "eval.ckpt", weights_only=True)["callbacks"][cb.state_key]
    fresh = SamplingEvaluation(samplers=[dict(name="fastflow", steps=12)], every_n_steps=None, every_n_epochs=1)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.samplers["fastflow"].state_dict()["bandit"]["n"], state["bandit"]["n"])


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown option.*'windw'"):
        SamplingEvaluation(samplers=[dict(name="speculative", windw=4)])
    with pytest.raises(ValueError, match="unknown sampler 'eulr'"):
        SamplingEvaluation(samplers=[dict(name="eulr")])
    with pytest.raises(ValueError, match="share the label 'euler'"):
        SamplingEvaluation(samplers=[dict(name="euler"), dict(name="euler", steps=10)])
    with pytest.raises(ValueError, match="every_n_steps or every_n_epochs"):
        SamplingEvaluation(every_n_steps=None)
    with pytest.raises(ValueError, match="feature_extractor"):
        SamplingEvaluation(feature_extractor="vgg")
    with pytest.raises(ValueError, match="unknown precision 'fp8'; valid: 32, bf16, 16"):
        SamplingEvaluation(precision="fp8")
    assert SamplingEvaluation(precision=16).precision == "16"  # as Lightning users write it


def test_precision_samples_the_ema_net_under_autocast():
    model = TargetFlow(arch="mlp", net=dict(dim=2, hidden=16, depth=2), ema_decay=0.9)
    net, restore = SamplingEvaluation(samplers=[dict(name="euler", steps=4)], precision="bf16")._velocity(model)
    assert isinstance(net, Autocast) and net.dtype == torch.bfloat16
    assert net.net is model.velocity_model(True)  # the EMA weights, as at full precision
    restore()
    # The draft runs at the same precision, as in generate() (before, only the target did).
    draft_net = torch.nn.Linear(2, 2)
    module = type("DraftModule", (), {"draft_model": lambda self: draft_net})()
    spec = [dict(name="speculative", drafter="model", window=2, steps=4)]
    draft = SamplingEvaluation(samplers=spec, precision="bf16", feature_extractor="none")._draft(module)
    assert isinstance(draft, Autocast) and draft.net is draft_net and draft.dtype == torch.bfloat16
    assert SamplingEvaluation(samplers=spec, feature_extractor="none")._draft(module) is draft_net


def test_digits_config_block_is_valid(tmp_path, capsys):
    """configs/digits.yaml carries the callback as a commented-out block: uncommented, it must validate."""
    lines = (ROOT / "configs/digits.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "specflow.lit.callbacks.SamplingEvaluation" in line)
    out, i = lines[:start], start
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        out.append(lines[i].replace("# ", "", 1))
        i += 1
    cfg = tmp_path / "digits_eval.yaml"
    cfg.write_text("\n".join(out + lines[i:]) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg), "--print_config"])
    assert e.value.code in (0, None)
    assert "SamplingEvaluation" in capsys.readouterr().out
