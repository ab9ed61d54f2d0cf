"""Adapters for models trained with other libraries, proven against each library's own sampler.

Small randomly initialised networks built here (nothing is downloaded). Deterministic samplers are compared
step for step in float64 (relative difference ≤ 1e-5); the stochastic ones by their transition (mean and
standard deviation at every step) and by two-sample tests, each with a lossy control that must be caught.
"""
import math
import sys

import pytest
import torch

from specflow.adapters import from_diffusers, from_flow_matching, from_torchcfm, load_diffusers
from specflow.path import transition_mean, transition_std
from specflow.sampling import build_sampler
from test_speculative import _AcceptAll, same_law, two_sample

diffusers = pytest.importorskip("diffusers")  # the test extra installs it; a core-only install skips these


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_unet(size=8, classes=None):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=classes).double().eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def library_loop(unet, sch, x, steps, **step_kw):
    sch.set_timesteps(steps)
    with torch.no_grad():
        for k in sch.timesteps:
            x = sch.step(unet(x, k).sample, k, x, **step_kw).prev_sample
    return x


def ours(m, name, steps, noise, **options):
    res = build_sampler(name, steps=steps, grid=m.grid(steps), **options).sample(m.model, m.start(noise))
    return m.to_data(res.samples)


# ------------------------------------------------------------------------------------------ deterministic, ≤ 1e-5
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_is_ddim(unet, pred, spacing):
    sch = diffusers.DDIMScheduler(clip_sample=False, prediction_type=pred, timestep_spacing=spacing)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = from_diffusers(unet, sch)
    assert rel(ours(m, "euler", 10, noise), library_loop(unet, sch, noise.clone(), 10)) < 1e-5


def test_class_labels_reach_a_class_conditional_unet():
    net = tiny_unet(classes=3)
    sch = diffusers.DDIMScheduler(clip_sample=False)
    noise = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    sch.set_timesteps(8)
    x = noise.clone()
    with torch.no_grad():
        for k in sch.timesteps:
            x = sch.step(net(x, k, class_labels=labels).sample, k, x).prev_sample
    m = from_diffusers(net, sch)
    assert m.num_classes == 3 and (m.in_channels, m.image_size) == (1, 8)
    got = build_sampler("euler", steps=8, grid=m.grid(8)).sample(m.model, m.start(noise), cond=labels).samples
    assert rel(m.to_data(got), x) < 1e-5
    other = build_sampler("euler", steps=8, grid=m.grid(8)).sample(m.model, m.start(noise), cond=labels.flip(0))
    assert rel(m.to_data(other.samples), x) > 1e-3  # the labels matter, so the test would see them dropped


def test_clip_sample_reproduced_exactly(unet):
    """x̂0 clipped, ε re-derived from it: DDIM with use_clipped_model_output=True. The clip must bite here (the
    unclipped adapter is far off), so the test would catch an adapter that ignored it."""
    sch = diffusers.DDIMScheduler(clip_sample=True, clip_sample_range=0.5, prediction_type="sample")
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lib = library_loop(unet, sch, noise.clone(), 10, use_clipped_model_output=True)
    assert rel(ours(from_diffusers(unet, sch), "euler", 10, noise), lib) < 1e-5
    unclipped = diffusers.DDIMScheduler(clip_sample=False, prediction_type="sample")
    assert rel(ours(from_diffusers(unet, unclipped), "euler", 10, noise), lib) > 1e-2


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_flow_match_euler_scheduler(unet, shift):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    m = from_diffusers(unet, sch)
    g = m.grid(12)
    sch.set_timesteps(12)
    assert g[0] == 0 and g[-1] == 1 and torch.equal(g, 1 - sch.sigmas.double())  # the shifted schedule itself
    x = noise.clone()
    with torch.no_grad():
        for k in sch.timesteps:
            x = sch.step(unet(x, k.expand(4)).sample, k, x).prev_sample
    assert rel(ours(m, "euler", 12, noise), x) < 1e-5
    # sign and time direction: the wrong sign is far off
    flipped = build_sampler("euler", steps=12, grid=g).sample(lambda x, t: -m(x, t), noise).samples
    assert rel(flipped, x) > 1e-2


class FMNet(torch.nn.Module):
    """A velocity net in flow_matching's call style: model(x=, t=, **extras); t a scalar or one per row."""

    def __init__(self, d=3):
        super().__init__()
        torch.manual_seed(4)
        self.lin = torch.nn.Sequential(torch.nn.Linear(d + 1, 32), torch.nn.Tanh(), torch.nn.Linear(32, d)).double()

    def forward(self, x, t, **extras):
        t = t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype)
        return self.lin(torch.cat([x, t], 1)) + extras.get("label", torch.zeros(1)).to(x.dtype).reshape(-1, 1)


def test_euler_is_flow_matching_ode_solver():
    from flow_matching.solver import ODESolver

    net, x0 = FMNet(), torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    label = torch.arange(16) % 3
    grid = torch.linspace(0, 1, 21, dtype=torch.float64)
    ref = ODESolver(velocity_model=net).sample(x_init=x0, step_size=None, method="euler", time_grid=grid,
                                                label=label)
    m = from_flow_matching(net, cond_key="label")
    got = build_sampler("euler", steps=20, grid=m.grid(20)).sample(m.model, m.start(x0), cond=label).samples
    assert rel(m.to_data(got), ref) < 1e-5
    wrong = build_sampler("euler", steps=20).sample(from_flow_matching(net).model, x0).samples  # label dropped
    assert rel(wrong, ref) > 1e-2


def test_euler_is_torchcfm_neural_ode():
    from torchcfm.models import MLP
    from torchcfm.utils import torch_wrapper
    from torchdyn.core import NeuralODE

    torch.manual_seed(6)
    mlp = MLP(dim=2, w=32, time_varying=True).double()
    x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    node = NeuralODE(torch_wrapper(mlp), solver="euler", sensitivity="adjoint")
    with torch.no_grad():
        ref = node.trajectory(x0, t_span=torch.linspace(0, 1, 17, dtype=torch.float64))[-1]
    for model in (mlp, torch_wrapper(mlp)):
        m = from_torchcfm(model)
        assert rel(ours(m, "euler", 16, x0), ref) < 1e-5


# -------------------------------------------------------------------------------------------- stochastic samplers
def test_sde_transition_is_ddpm_step(unet):
    """At every step of a 10-step DDPM schedule: our ancestral step's mean and std (mapped to the VP scale) are
    DDPMScheduler.step's, read off two calls with known noise."""
    sch = diffusers.DDPMScheduler(clip_sample=False)
    m = from_diffusers(unet, sch)
    g = m.grid(10)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for i, k in enumerate(sch.timesteps):
        t, s = g[i].expand(3), g[i + 1].expand(3)
        with torch.no_grad():
            out = unet(x, k).sample
            steps = [sch.step(out, k, x, generator=torch.Generator().manual_seed(j)).prev_sample for j in (0, 1)]
        z = [torch.randn(x.shape, generator=torch.Generator().manual_seed(j), dtype=x.dtype) for j in (0, 1)]
        r_t, r_s = math.hypot(g[i], 1 - g[i]), math.hypot(g[i + 1], 1 - g[i + 1])  # x_lin = x_vp·r
        with torch.no_grad():
            v = m(x * r_t, t)
        mean, c = transition_mean(x * r_t, t, s, v) / r_s, transition_std(g[i], g[i + 1]).item() / r_s
        if i + 1 < len(sch.timesteps):
            std_lib = ((steps[0] - steps[1]) / (z[0] - z[1])).median().item()
            assert abs(c - std_lib) / std_lib < 1e-5, (i, c, std_lib)
        else:
            assert c == 0 and torch.equal(steps[0], steps[1])  # the last step is deterministic in both
        assert rel(mean, steps[0] - c * z[0]) < 1e-5, i
        x = steps[0]


N_LAW, STEPS_LAW = 2000, 8


class NearlyTrained(torch.nn.Module):
    """ε̂ = σ_k·x (the exact denoiser of N(0, I) data) + 0.3 × a random UNet: shaped like a trained model, so that
    drafts are accepted often enough to exercise acceptance and the coupling (a random UNet alone gives a
    velocity that jumps from step to step)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.unet, self.abar = unet, scheduler.alphas_cumprod.double()

    def forward(self, sample, timestep, **kw):
        k = torch.as_tensor(timestep).round().long().expand(sample.shape[0])
        sigma = (1 - self.abar[k]).sqrt().view(-1, 1, 1, 1).to(sample.dtype)
        return diffusers.models.unets.unet_2d.UNet2DOutput(sample=sigma * sample + 0.3 * self.unet(sample, k).sample)


@pytest.fixture(scope="module")
def law_setup():
    """A 4×4 (D = 16) denoiser with a DDPM schedule: samples of the library's loop and of our sde."""
    sch = diffusers.DDPMScheduler(clip_sample=False)
    net = NearlyTrained(tiny_unet(size=4), sch)
    m = from_diffusers(net, sch)
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(N_LAW, 1, 4, 4, dtype=torch.float64, generator=g)
    sch.set_timesteps(STEPS_LAW)
    x = noise.clone()
    with torch.no_grad():
        for k in sch.timesteps:
            x = sch.step(net(x, k).sample, k, x, generator=g).prev_sample
    noise2 = torch.randn(N_LAW, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    sde = ours(m, "sde", STEPS_LAW, noise2, )
    return m, x.flatten(1), sde.flatten(1)


def test_sde_has_ddpm_law(law_setup):
    m, lib, sde = law_setup
    assert same_law(two_sample(sde, lib))
    # control: fewer steps (another law) is caught by the same test
    few = ours(m, "sde", 2, torch.randn(N_LAW, 1, 4, 4, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(11))).flatten(1)
    assert not same_law(two_sample(few, lib))


def test_speculative_is_exact_on_an_adapted_diffusers_model(law_setup):
    m, lib, _ = law_setup
    noise = torch.randn(N_LAW, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    g = m.grid(STEPS_LAW)
    gen = torch.Generator().manual_seed(13)
    res = build_sampler("speculative", steps=STEPS_LAW, grid=g, drafter="frozen", window=4).sample(
        m.model, m.start(noise), generator=gen)
    st = res.stats
    assert 0.1 < st.acceptance_rate < 0.999 and st.proposed - st.accepted > 100, st  # both branches exercised
    assert same_law(two_sample(m.to_data(res.samples).flatten(1), lib))
    lossy = _AcceptAll(steps=STEPS_LAW, grid=g, drafter="frozen", window=4).sample(
        m.model, m.start(noise), generator=torch.Generator().manual_seed(13)).samples
    assert not same_law(two_sample(m.to_data(lossy).flatten(1), lib))


# ---------------------------------------------------------------------------------------------------- bad input
def test_grid_option_is_checked():
    good = torch.linspace(0.1, 1, 5, dtype=torch.float64)
    assert torch.equal(build_sampler("euler", steps=4, grid=good).grid, good)
    for bad, msg in [(torch.linspace(0, 1, 4), "steps \\+ 1"), (good.flip(0), "increase"),
                     (torch.linspace(0, 0.9, 5), "exactly 1"), (torch.linspace(-0.1, 1, 5), "t_0 >= 0"),
                     ([0, 0.5, 1.0], "1-D floating tensor")]:
        with pytest.raises(ValueError, match=msg):
            build_sampler("euler", steps=4 if not isinstance(bad, list) else 2, grid=bad)


def test_adapters_refuse_models_of_another_kind(unet):
    class Single(torch.nn.Module):  # time concatenated to x by the caller (torchcfm's MLP)
        def forward(self, z):
            return z

    with pytest.raises(ValueError, match="model\\(x=..., t=..."):
        from_flow_matching(Single())
    with pytest.raises(ValueError, match="torchcfm's order"):
        from_torchcfm(FMNet())
    m = from_flow_matching(lambda x, t: x[:, :1])  # wrong output shape: named when called
    with pytest.raises(ValueError, match="shaped like its input"):
        build_sampler("euler", steps=2).sample(m.model, torch.randn(2, 3))
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(unet, diffusers.DDPMScheduler(prediction_type="flow_prediction"))
    with pytest.raises(ValueError, match="variance"):
        from_diffusers(unet, diffusers.DDPMScheduler(variance_type="learned_range"))
    with pytest.raises(ValueError, match="thresholding"):
        from_diffusers(unet, diffusers.DDPMScheduler(thresholding=True))
    with pytest.raises(ValueError, match="scheduler"):
        from_diffusers(unet, object())
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        from_diffusers(unet, diffusers.DDIMScheduler(set_alpha_to_one=False)).grid(10)
    with pytest.raises(ValueError, match="timestep_spacing"):
        from_diffusers(unet, diffusers.DDIMScheduler(timestep_spacing="linspace")).grid(7)
    with pytest.raises(ValueError, match="grid"):
        from_diffusers(unet, diffusers.DDPMScheduler()).start(torch.randn(1, 1, 8, 8))


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcfm", None)
    monkeypatch.setitem(sys.modules, "torchcfm.models", None)
    with pytest.raises(ImportError, match=r"\.\[peers\]"):
        from_torchcfm(FMNet())
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"\.\[peers\]"):
        load_diffusers(".")


def test_diffusers_folder_without_scheduler_is_refused(tmp_path, unet):
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="scheduler_config.json"):
        load_diffusers(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_diffusers(tmp_path / "nope")


def test_sample_py_samples_a_saved_pipeline(tmp_path):
    """sample.py --diffusers DIR: every kind of sampler runs; euler's samples are the library's DDIM loop from
    the same start noise (so the CLI applies the adapter's grid, start and to_data)."""
    import numpy as np

    import sample
    from specflow.generate import per_sample_generators, randn

    unet = tiny_unet().float()
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(clip_sample=False)).save_pretrained(
        tmp_path / "pipe")
    for name, opts in [("euler", []), ("sde", []), ("speculative", ["--opt", "drafter=frozen", "--opt", "window=3"])]:
        out = tmp_path / name
        assert sample.main(["--diffusers", str(tmp_path / "pipe"), "--sampler", name, "--steps", "6", "-n", "6",
                            "--batch-size", "4", "--out", str(out), *opts]) == 0
        with np.load(out / "samples.npz") as z:
            x = torch.from_numpy(z["samples"])
            assert x.shape == (6, 1, 8, 8) and torch.isfinite(x).all()
        if name == "euler":
            noise = randn((6, 1, 8, 8), per_sample_generators(0, torch.arange(6)), torch.empty(0))
            ddim = diffusers.DDIMScheduler.from_config(diffusers.DDPMScheduler(clip_sample=False).config)
            assert rel(x, library_loop(unet, ddim, noise, 6)) < 1e-4
    assert sample.main(["--diffusers", str(tmp_path / "pipe"), "--guidance", "2", "--out", str(tmp_path / "g")]) == 2
    assert sample.main(["--diffusers", str(tmp_path / "nope"), "--out", str(tmp_path / "n")]) == 2
