"""Trained drafters (``model``, ``medusa``) plug into speculative/sfm/rca unchanged, and speculative stays exact.

The exactness checks reuse tests/test_speculative.py's two-sample helper and its lossy control (accept every
draft): with a trained draft — a distilled MLP, and Medusa heads trained by ``MedusaFlow`` on the target's own
rollouts — speculative still matches sde in law, and the control is still caught.
"""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from specflow.checkpoint import TargetInfo
from specflow.data.toy import GaussianMixture, ToyMixtureDataModule
from specflow.lit.draft import MedusaFlow
from specflow.nets import build_net
from specflow.nets.heads import MedusaHeads
from specflow.path import x1_hat
from specflow.sampling import build_sampler
from test_speculative import N_SAMPLES, STEPS, _AcceptAll, _baseline, _run, same_law, two_sample


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FeatureGMM(nn.Module):
    """The exact mixture velocity with a 'trunk': features = [v, x, t], output = the v part."""

    def __init__(self, gm: GaussianMixture):
        super().__init__()
        self.gm, D = gm, gm.dim
        self.in_channels, self.image_size, self.num_classes, self.feature_channels = D, None, None, 2 * D + 1
        self.register_buffer("anchor", torch.zeros(1, dtype=torch.float64))  # a device for .to()/parameters
        self.specflow = TargetInfo("<gmm>", "gmm-" + str(D), "gmm", {"dim": D})

    def features(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return torch.cat([self.gm.velocity(x, t), x, t[:, None]], dim=1)

    def output(self, h):
        return h[:, : self.gm.dim]

    def forward(self, x, t, cond=None):
        return self.output(self.features(x, t))


def _random_mlp_target(dim=3):
    torch.manual_seed(0)
    net = build_net("mlp", dim=dim, hidden=32, depth=2).double().eval()
    nn.init.normal_(net.out.weight, std=0.3)  # its zero-initialised output would make v ≡ 0
    return net


# ------------------------------------------------------------------------------------------- plumbing
@pytest.mark.parametrize("name,opts", [("speculative", dict(window=4)), ("speculative", dict(window=3, draft_eta=0.7)),
                                       ("sfm", dict(leap=4, tol=0.01)), ("sfm", dict(leap=4, tol=0.01, base="ab2")),
                                       ("rca", dict(leap=3))])
def test_untrained_medusa_heads_are_the_frozen_drafter(name, opts):
    """Zero-initialised heads predict Δ = 0: sample for sample the frozen drafter, with draft calls counted."""
    target, x0 = _random_mlp_target(), torch.randn(64, 3, dtype=torch.float64)
    heads = MedusaHeads(32, 3, None, hidden=16).double().eval()
    ref = build_sampler(name, steps=20, drafter="frozen", **opts).sample(
        target, x0, generator=torch.Generator().manual_seed(1))
    res = build_sampler(name, steps=20, drafter="medusa", **opts).sample(
        target, x0, draft=heads, generator=torch.Generator().manual_seed(1))
    # same decisions; states equal up to round-off (the frozen drafter's step is folded into x̂1 form)
    torch.testing.assert_close(res.samples, ref.samples, rtol=1e-12, atol=1e-12)
    assert (res.stats.proposed, res.stats.accepted) == (ref.stats.proposed, ref.stats.accepted)
    assert res.stats.draft_nfe > 0 and res.stats.sequential_nfe == ref.stats.sequential_nfe
    if name != "rca":
        assert res.stats.proposed > res.stats.accepted > 0  # both branches ran


class _Probe:
    """A fake Medusa draft that checks what the drafter hands it, then answers like the frozen drafter."""

    def __init__(self, target):
        self.target, self.calls = target, 0

    def __call__(self, y, s, cond=None, *, features, x_src, t_src, x1_src):
        with torch.no_grad():
            torch.testing.assert_close(features, self.target.features(x_src, t_src))
            torch.testing.assert_close(x1_src, x1_hat(x_src, t_src, self.target(x_src, t_src)))
        assert bool((t_src < s).all()), "heads were asked about a time before their features"
        self.calls += 1
        return (x1_src - y) / (1 - s)[:, None]


@pytest.mark.parametrize("name,opts", [("speculative", dict(window=5)), ("sfm", dict(leap="bandit", tol=0.2, mu=1.0))])
def test_medusa_gets_the_features_of_the_last_paid_evaluation(name, opts):
    target = _random_mlp_target()
    probe = _Probe(target)
    res = build_sampler(name, steps=25, drafter="medusa", **opts).sample(
        target, torch.randn(40, 3, dtype=torch.float64), draft=probe, generator=torch.Generator().manual_seed(0))
    assert probe.calls > 0 and res.stats.draft_nfe > 0


def test_medusa_needs_a_target_with_features_and_heads_need_medusa():
    gm = GaussianMixture.default(dim=2)
    heads = MedusaHeads(5, 2, None, hidden=8).double()
    x0 = torch.randn(8, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"features\(x, t, cond\) and output\(h\)"):
        build_sampler("speculative", steps=5, drafter="medusa").sample(gm, x0, draft=heads)  # a plain callable
    with pytest.raises(ValueError, match="drafter='medusa'"):
        build_sampler("speculative", steps=5, drafter="model").sample(FeatureGMM(gm), x0, draft=heads)
    with pytest.raises(ValueError, match="another target architecture"):
        MedusaHeads(7, 2, None)(x0, torch.full((8,), 0.5, dtype=torch.float64), features=torch.zeros(8, 5),
                                x_src=x0, t_src=torch.zeros(8), x1_src=x0)


# ------------------------------------------------------------------------------------------- trained drafts
@pytest.fixture(scope="module")
def distilled_draft():
    """A small MLP distilled from the exact 2-d mixture velocity for a few hundred steps: good, not perfect."""
    gm = GaussianMixture.default(dim=2)
    torch.manual_seed(0)
    net = build_net("mlp", dim=2, hidden=32, depth=2).double()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        x1 = gm.sample(256, g)
        x0, t = torch.randn(x1.shape, generator=g, dtype=torch.float64), torch.rand(256, generator=g, dtype=torch.float64)
        xt = t[:, None] * x1 + (1 - t[:, None]) * x0
        loss = (net(xt, t) - gm.velocity(xt, t)).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def trained_medusa():
    """Medusa heads on the mixture's 'trunk', trained by MedusaFlow's own training_step on sde rollouts."""
    gm = GaussianMixture.default(dim=2)
    torch.manual_seed(0)
    module = MedusaFlow(hidden=32, depth=2, offsets=4, steps=[STEPS], etas=[1.0], weighting="x1")
    module.attach_target(FeatureGMM(gm))
    module.draft.double()
    opt = torch.optim.Adam(module.draft.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(150):
        loss = module.training_step((gm.sample(256, g), None), i)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    return module.target, module.draft.eval().requires_grad_(False), losses


def test_medusa_training_lowers_the_heads_loss(trained_medusa):
    _, _, losses = trained_medusa
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("drafter", ["model", "anchored", "medusa"])
def test_speculative_with_a_trained_draft_matches_sde_and_the_lossy_control_is_caught(
        drafter, distilled_draft, trained_medusa):
    gm, ref = _baseline(2)
    model, draft = trained_medusa[:2] if drafter == "medusa" else (gm, distilled_draft)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(N_SAMPLES, 2, generator=g, dtype=torch.float64)
    res = build_sampler("speculative", steps=STEPS, drafter=drafter, window=8).sample(model, x0, draft=draft, generator=g)
    p = two_sample(res.samples, ref)
    assert same_law(p), p
    st = res.stats
    assert 0.3 < st.acceptance_rate < 0.999 and st.proposed - st.accepted > 100, st
    # the trained draft beats the training-free one on the same problem (per-sample cost: sequential_nfe is the
    # slowest sample's, too noisy to rank drafters on one batch)
    frozen = _run(build_sampler("speculative", steps=STEPS, drafter="frozen", window=8), gm, seed=2).stats
    assert st.acceptance_rate > frozen.acceptance_rate and st.total_nfe < frozen.total_nfe, (st, frozen)
    # control: the same trained draft, every step accepted, is caught by the same test
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(N_SAMPLES, 2, generator=g, dtype=torch.float64)
    lossy = _AcceptAll(steps=STEPS, drafter=drafter, window=8).sample(model, x0, draft=draft, generator=g)
    assert not same_law(two_sample(lossy.samples, ref))


def test_sfm_with_trained_drafts_tracks_euler(distilled_draft, trained_medusa):
    """The deterministic sampler takes the same draft objects; its leaps stay close to euler-N (the mixture's
    sharp modes make this a hard case at N = 30: acceptance is modest, the check keeps the error bounded)."""
    gm = GaussianMixture.default(dim=2)
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = build_sampler("euler", steps=STEPS).sample(gm, x0).samples
    for drafter, model, draft in [("model", gm, distilled_draft), ("medusa", *trained_medusa[:2])]:
        res = build_sampler("sfm", steps=STEPS, drafter=drafter, leap=4, tol=0.1).sample(model, x0, draft=draft)
        err = (res.samples - ref).norm(dim=1)
        assert res.stats.accepted > 0 and res.stats.draft_nfe > 0, res.stats
        assert err.median() < 0.2, (drafter, err.median())
        if drafter == "medusa":  # heads trained on the target's own rollouts leap further than its Euler steps
            assert res.stats.total_nfe < STEPS, res.stats


# ------------------------------------------------------------------------------------------- DDP
class _SaveHeads(pl.Callback):
    def __init__(self, out_dir, allreduce: bool):
        self.out_dir, self.allreduce = out_dir, allreduce

    def on_train_start(self, trainer, pl_module):
        torch.manual_seed(100 + trainer.global_rank)  # forked ranks: own rollouts, so equality needs the all-reduce
        if not self.allreduce:
            from test_ddp import _no_allreduce
            trainer.strategy.model.register_comm_hook(None, _no_allreduce)

    def on_train_end(self, trainer, pl_module):
        torch.save({"heads": pl_module.draft.state_dict(), "step": trainer.global_step},
                   self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def mlp_target_ckpt(tmp_path_factory):
    from specflow.lit.target import TargetFlow

    tmp = tmp_path_factory.mktemp("mlp_target")
    pl.seed_everything(0)
    model = TargetFlow(arch="mlp", net=dict(dim=2, hidden=16, depth=2), lr=1e-2, ema_decay=0.5)
    tr = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    tr.fit(model, ToyMixtureDataModule(dim=2, batch_size=64, num_samples=256))
    tr.save_checkpoint(tmp / "target.ckpt")
    return tmp / "target.ckpt"


@pytest.mark.parametrize("allreduce", [True, False], ids=["ddp", "control-no-allreduce"])
def test_medusa_training_on_two_ddp_ranks_keeps_heads_identical(tmp_path, mlp_target_ckpt, allreduce):
    pl.seed_everything(0)
    module = MedusaFlow(target_ckpt=str(mlp_target_ckpt), hidden=8, depth=1, offsets=3, steps=[10], lr=1e-2,
                        warmup_steps=0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[_SaveHeads(tmp_path, allreduce)])
    trainer.fit(module, ToyMixtureDataModule(dim=2, batch_size=32, num_samples=256))
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert r0["step"] == r1["step"] == 3
    same = [torch.equal(r0["heads"][k], r1["heads"][k]) for k in r0["heads"]]
    if not allreduce:
        assert not all(same)  # the check below can fail
        return
    assert all(same)
    assert r0["heads"]["out.weight"].abs().sum() > 0, "the zero-initialised output layer never trained"


# ------------------------------------------------------------------------------------------- guidance
def _class_unet():
    torch.manual_seed(0)
    net = build_net("unet", image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(), num_heads=1, num_classes=10).eval()
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)  # its zero-initialised output would make v ≡ 0
        p.requires_grad_(False)
    return net


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_trunk_under_bf16_is_the_guided_call_bit_for_bit(w):
    """As generate() builds it — guidance around autocast — the guided trunk combines its branches in x's dtype
    (float32), as the plain guided call does after Autocast casts each branch back: output(features) and the
    call agree bit for bit, and so do the sampler's two ways of evaluating the target."""
    from specflow.lit.guidance import GuidedTrunk, guidance
    from specflow.precision import Autocast, autocast
    from specflow.sampling.stats import Evaluator, SampleStats

    model = guidance(autocast(_class_unet(), "bf16"), w)  # specflow.generate's order
    assert isinstance(model, GuidedTrunk) and isinstance(model.net, Autocast)
    gen = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(5, 1, 8, 8, generator=gen), torch.rand(5, generator=gen), torch.arange(5)
    with torch.no_grad():
        h = model.features(x, t, c)
        assert h.dtype == torch.bfloat16  # the trunk runs under autocast
        got, want = model.output(h), model(x, t, c)
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
        paid = [Evaluator(model, c, 5, SampleStats(), "target", keep_features=k)(x, t) for k in (True, False)]
        assert torch.equal(*paid)
    if w not in (0.0, 1.0):
        with pytest.raises(ValueError, match="needs class labels"):
            model.features(x, t, None)


def test_raw_medusa_heads_on_a_guided_target_say_to_use_guide_draft():
    """The guided trunk's features hold two branches per sample; raw heads were told they belong to 'another
    target architecture'. The medusa drafter names the fix instead; guide_draft's heads run, as do raw heads
    where the guided trunk runs one branch (w = 1)."""
    from specflow.lit.guidance import guidance, guide_draft

    net = _class_unet()
    heads = MedusaHeads(net.feature_channels, 1, 8, hidden=8, depth=1).eval()
    x0, c = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    sampler = build_sampler("speculative", steps=6, drafter="medusa", window=3)
    with pytest.raises(ValueError, match=r"not: wrap them with specflow\.lit\.guidance\.guide_draft"):
        sampler.sample(guidance(net, 2.5), x0, c, draft=heads)
    assert sampler.sample(guidance(net, 2.5), x0, c, draft=guide_draft(heads, 2.5)).stats.draft_nfe > 0
    assert sampler.sample(guidance(net, 1.0), x0, c, draft=heads).stats.draft_nfe > 0


def test_the_evaluation_callback_guides_its_draft_like_the_target():
    """SamplingEvaluation guided the target but handed the sampler the unguided draft (generate() guides both)."""
    from types import SimpleNamespace

    from specflow.lit.callbacks import SamplingEvaluation
    from specflow.lit.guidance import GuidedHeads

    heads = MedusaHeads(8, 1, 8, hidden=8)
    module = SimpleNamespace(draft_model=lambda: heads)
    medusa = [dict(name="speculative", drafter="medusa")]
    draft = SamplingEvaluation(samplers=medusa, guidance_scale=2.5, feature_extractor="none")._draft(module)
    assert isinstance(draft, GuidedHeads) and draft.heads is heads and draft.scale == 2.5
    assert SamplingEvaluation(samplers=medusa, feature_extractor="none")._draft(module) is heads
    assert SamplingEvaluation(samplers=[dict(name="euler")], guidance_scale=2.5)._draft(module) is None
