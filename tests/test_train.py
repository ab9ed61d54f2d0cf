"""TargetFlow, the guidance wrapper and the training CLI, end to end on tiny models (CPU, seconds)."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from specflow.cli import main
from specflow.data.toy import GaussianMixture, ToyMixtureDataModule
from specflow.lit.guidance import guidance
from specflow.lit.target import TargetFlow, flow_matching_loss
from specflow.nets import build_net

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = ["--model.arch", "unet", "--model.net",
             '{"image_size": 8, "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2], '
             '"num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1, "num_classes": 10}']
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def tiny_mlp(**kw) -> TargetFlow:
    return TargetFlow(arch="mlp", net=dict(dim=2, hidden=64, depth=3), lr=2e-3, ema_decay=0.9, **kw)


def trainer(tmp_path, steps: int, **kw) -> pl.Trainer:
    opts = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**opts, **kw})


def toy_cli(tmp_path, *extra) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/toy.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger", "false", *QUIET, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MLP trained 100 steps on the toy mixture, its checkpoint, and a fixed evaluation batch."""
    tmp = tmp_path_factory.mktemp("trained")
    pl.seed_everything(0)
    model = tiny_mlp()
    g = torch.Generator().manual_seed(1)
    x1 = GaussianMixture.default(dim=2).sample(4096, g).float()
    x0, t = torch.randn(x1.shape, generator=g), torch.rand(x1.shape[0], generator=g)
    with torch.no_grad():
        before = flow_matching_loss(model.net, x1, x0, t, None).item()
    tr = trainer(tmp, 100)
    tr.fit(model, ToyMixtureDataModule(dim=2, batch_size=256))
    path = tmp / "model.ckpt"
    tr.save_checkpoint(path)
    with torch.no_grad():
        after = flow_matching_loss(model.net, x1, x0, t, None).item()
    return model, path, before, after


def test_loss_decreases_on_toy_mixture(trained):
    _, _, before, after = trained
    assert after < 0.8 * before, (before, after)


def test_ema_is_distinct_and_checkpoint_restores_it_without_config(trained):
    model, path, _, _ = trained
    online, ema = model.net.state_dict(), model.ema.state_dict()
    assert any(not torch.equal(online[k], ema[k]) for k in online), "EMA never diverged from the online net"
    ckpt = torch.load(path, weights_only=True)  # plain hyper-parameters: no pickled objects needed
    assert ckpt["hyper_parameters"]["arch"] == "mlp"
    loaded = TargetFlow.load_from_checkpoint(path)  # no config: hyper-parameters rebuild the net
    for k, v in loaded.ema.state_dict().items():
        assert torch.equal(v, ema[k]), k
    for k, v in loaded.net.state_dict().items():
        assert torch.equal(v, online[k]), k
    x, t = torch.randn(16, 2), torch.rand(16)
    with torch.no_grad():
        assert torch.equal(loaded.velocity_model()(x, t), model.velocity_model()(x, t))
        assert not torch.equal(loaded.velocity_model(ema=False)(x, t), loaded.velocity_model()(x, t))


def _random_conditional_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_net("mlp", dim=3, hidden=32, depth=2, num_classes=4)
    torch.nn.init.normal_(net.out.weight)  # the output layer starts at zero: give it a signal
    torch.nn.init.normal_(net.cond.label_emb.weight)
    return net


def test_guidance_algebra():
    net = _random_conditional_mlp()
    x, t, y = torch.randn(8, 3), torch.rand(8), torch.randint(0, 4, (8,))
    null = torch.full_like(y, 4)
    with torch.no_grad():
        v_c, v_u = net(x, t, y), net(x, t, null)
        assert not torch.allclose(v_c, v_u)  # control: otherwise every identity below is vacuous
        assert torch.equal(guidance(net, 1.0)(x, t, y), v_c)
        assert torch.equal(guidance(net, 0.0)(x, t, y), v_u)
        assert torch.allclose(guidance(net, 3.0)(x, t, y), v_u + 3.0 * (v_c - v_u), atol=1e-5)
        # Linear in the scale: w = 0.5 lies halfway between the unconditional and conditional models.
        assert torch.allclose(guidance(net, 0.5)(x, t, y), 0.5 * (v_c + v_u), atol=1e-5)
        assert torch.equal(guidance(net, 3.0)(x, t, None), net(x, t, None))  # unconditional pass-through


def test_guidance_is_one_batched_call():
    net = _random_conditional_mlp()
    rows = []
    net.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    with torch.no_grad():
        guidance(net, 2.0)(torch.randn(5, 3), torch.rand(5), torch.randint(0, 4, (5,)))
    assert rows == [10]


def test_guidance_needs_a_conditional_net():
    with pytest.raises(ValueError, match="class-conditional"):
        guidance(build_net("mlp", dim=2), 2.0)


def test_label_dropout_uses_the_null_class():
    model = TargetFlow(arch="mlp", net=dict(dim=2, hidden=8, depth=1, num_classes=10), label_dropout=0.3)
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    c = model._cond(y, 0.3, torch.Generator().manual_seed(1))
    dropped = c != y
    assert bool((c[dropped] == 10).all())  # a dropped label is the null class, never another class
    assert abs(dropped.float().mean().item() - 0.3) < 0.015
    assert torch.equal(model._cond(y, 0.0), y)
    assert model._cond(y, 0.3) is not None and tiny_mlp()._cond(y, 0.3) is None  # unconditional net: no labels


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
    pl.seed_everything(0)
    model = TargetFlow(arch="mlp", net=dict(dim=2, hidden=64, depth=3), lr=1e30)  # weights blow up at once
    with pytest.raises(FloatingPointError, match=r"global step \d+.*lower model.lr.*gradient_clip_val"):
        trainer(tmp_path, 20).fit(model, ToyMixtureDataModule(dim=2, batch_size=64))


def test_bad_hyper_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="class-conditional"):
        TargetFlow(arch="mlp", net=dict(dim=2), label_dropout=0.1)
    with pytest.raises(ValueError, match="ema_decay"):
        TargetFlow(arch="mlp", net=dict(dim=2), ema_decay=1.0)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_digits_config_end_to_end(tmp_path):
    """The shipped digits config parses and trains (with a tiny net) two steps, writing a checkpoint."""
    cli = main(["fit", "--config", str(ROOT / "configs/digits.yaml"), *TINY_UNET, *QUIET,
                "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger", "false", "--trainer.limit_val_batches", "1",
                "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"), "--trainer.callbacks.every_n_train_steps", "1"])
    assert cli.trainer.global_step == 2
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    assert TargetFlow.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt").num_classes == 10


@pytest.mark.parametrize("name", ["digits", "toy", "cifar10_unet", "imagenet64_dit"])
def test_every_config_validates(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / f"configs/{name}.yaml"), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_resume_continues_at_the_saved_step(tmp_path, monkeypatch):
    starts = []
    monkeypatch.setattr(TargetFlow, "on_train_start", lambda self: starts.append(self.global_step), raising=False)
    ckpt = ["--trainer.callbacks.dirpath", str(tmp_path / "ckpt"), "--trainer.callbacks.every_n_train_steps", "1"]
    main(toy_cli(tmp_path, "--trainer.max_steps", "4", *ckpt))
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
    cli = main(toy_cli(tmp_path, "--trainer.max_steps", "8", *ckpt, "--ckpt_path", "last"))
    assert starts == [0, 4]  # the second run started where the first stopped, not from scratch
    assert cli.trainer.global_step == 8
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  arch: mlp\n  learning_rate: 0.1\n")
    with pytest.raises(SystemExit) as e:
        main(toy_cli(tmp_path, "--config", str(cfg)))
    assert e.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


def test_missing_data_root_surfaces_through_the_cli(tmp_path):
    missing = tmp_path / "no_cifar_here"
    with pytest.raises(Exception, match="download") as e:
        main(["fit", "--data", "specflow.data.images.CIFAR10DataModule", "--data.root", str(missing),
              "--model.net", '{"image_size": 32, "in_channels": 3, "model_channels": 8, "channel_mult": [1], '
                             '"num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1}',
              "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), *QUIET])
    assert str(missing) in str(e.value)


def test_data_and_net_shape_mismatch_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"model.net.image_size: 8"):
        main(["fit", "--config", str(ROOT / "configs/digits.yaml"), *QUIET, "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1",
              "--model.net", '{"image_size": 16, "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2], '
                             '"num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1, "num_classes": 10}'])


def test_image_size_the_net_cannot_take_is_a_clear_error(tmp_path):
    # Two downsamplings need a multiple of 4: 10 px cannot pass through this UNet.
    with pytest.raises(ValueError, match=r"cannot take image_size=10"):
        main(["fit", "--config", str(ROOT / "configs/digits.yaml"), *QUIET, "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), "--data.image_size", "16",
              "--model.net", '{"image_size": 10, "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2, 2], '
                             '"num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1, "num_classes": 10}'])
