"""Models trained with other libraries, as velocity models in specflow's convention (specflow/path.py).

    from specflow.adapters import from_diffusers
    m = from_diffusers(pipe.unet, pipe.scheduler)            # or from_flow_matching(net), from_torchcfm(net)
    sampler = build_sampler("speculative", steps=50, grid=m.grid(50))
    x = m.to_data(sampler.sample(m.model, m.start(torch.randn(shape))).samples)

Each adapter returns an ``Adapted`` module: ``.model`` (= itself) is ``v(x, t, cond)`` on our path
x_t = t·x1 + (1 − t)·x0 (t = 0 noise, t = 1 data), ``.grid(steps)`` the library's own ``steps``-step schedule
on our time axis (float64, ends at 1), ``.start(noise)`` the library's start noise placed on our path at
grid[0], and ``.to_data(x)`` our t = 1 state in the library's data space. What each does to time, sign and
scale:

- flow_matching (facebookresearch): the same convention; ``cond`` is passed as the keyword ``cond_key``.
- torchcfm: the same path, called ``model(t, x[, y])``; its ``MLP`` (time as an extra input column) and
  ``torch_wrapper`` are recognised.
- diffusers rectified flow (``FlowMatchEulerDiscreteScheduler``: SD3, FLUX): σ = 1 − t, the net predicts
  dx/dσ = −v, timestep = σ·num_train_timesteps; the grid is the scheduler's own (shifted) sigmas.
- diffusers ε / v / x0-prediction with a β-schedule (DDPM, DDIM): x_vp = α_s·x0 + σ_s·ε maps onto the linear
  path at t = α_s / (α_s + σ_s) with x_lin = x_vp / (α_s + σ_s); the net's timestep at any t is the schedule's
  (fractional) index of that log-SNR, so grid points hit its integer timesteps exactly. ``clip_sample``
  is reproduced exactly (x̂0 clipped, ε re-derived from it: DDPM's posterior, DDIM with
  ``use_clipped_model_output=True``); dynamic thresholding is refused.

Draft heads (``medusa``) need a trunk that exposes ``features`` / ``output``: adapted models do not, so use the
training-free drafters (``frozen``, ``extrapolate``) with them. The libraries are imported only when used.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

from specflow.path import time_grid

EXTRA = 'pip install -e ".[peers]"'


class Adapted(nn.Module):
    """A velocity model in our convention around another library's network (see the module docstring)."""

    library = "?"

    def __init__(self, net: nn.Module, shape: tuple[int, ...] | None = None, num_classes: int | None = None):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        if shape is not None:  # what specflow.generate.sample_shape reads
            self.in_channels = shape[0]
            self.image_size = shape[-1] if len(shape) == 3 else None

    @property
    def model(self) -> "Adapted":
        return self

    def grid(self, steps: int) -> Tensor:
        return time_grid(steps)

    def start(self, noise: Tensor) -> Tensor:
        return noise

    def to_data(self, x: Tensor) -> Tensor:
        return x

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        raise NotImplementedError


def _checked(v, x: Tensor, library: str) -> Tensor:
    v = getattr(v, "sample", v)  # diffusers returns an output object (or a tuple with return_dict=False)
    if isinstance(v, (tuple, list)):
        v = v[0]
    if not isinstance(v, Tensor) or v.shape != x.shape:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"the {library} model returned {got} for input {tuple(x.shape)}: an adapter needs a model "
                         f"whose output is shaped like its input (a velocity, noise or sample prediction)")
    return v


def _params(net) -> dict | None:
    """The call's parameters by name, or None where Python cannot tell (then the first call tells)."""
    try:
        return dict(inspect.signature(net.forward if isinstance(net, nn.Module) else net).parameters)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- flow_matching, torchcfm
class FlowMatching(Adapted):
    library = "flow_matching"

    def __init__(self, net, cond_key: str = "cond", **kw):
        super().__init__(net, **kw)
        self.cond_key = cond_key

    def forward(self, x, t, cond=None):
        extras = {} if cond is None else {self.cond_key: cond}
        return _checked(self.net(x=x, t=t.to(x.dtype), **extras), x, self.library)


def from_flow_matching(model, cond_key: str = "cond", shape=None, num_classes=None) -> Adapted:
    """A facebookresearch/flow_matching velocity model (a ``ModelWrapper`` or any ``model(x=, t=, **extras)``):
    our convention already; ``cond`` goes to the keyword ``cond_key``. ``t`` arrives as one time per row."""
    if not callable(model):
        raise ValueError(f"from_flow_matching needs a callable model(x, t, **extras), got {type(model).__name__}")
    params = _params(model)
    if params is not None and not ({"x", "t"} <= set(params) or any(
            p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())):
        raise ValueError(f"from_flow_matching needs a model called as model(x=..., t=..., **extras) (flow_matching's "
                         f"ModelWrapper), but {type(model).__name__} takes ({', '.join(params)}); for torchcfm's "
                         f"model(t, x) or its MLP use from_torchcfm")
    return FlowMatching(model, cond_key, shape=shape, num_classes=num_classes)


class TorchCFM(Adapted):
    library = "torchcfm"

    def __init__(self, net, time_column: bool, **kw):
        super().__init__(net, **kw)
        self.time_column = time_column

    def forward(self, x, t, cond=None):
        t = t.to(x.dtype)
        if self.time_column:  # torchcfm's MLP: time is the last input column
            if cond is not None:
                raise ValueError("torchcfm's MLP takes no condition; drop cond (labels)")
            return _checked(self.net(torch.cat([x, t[:, None]], 1)), x, self.library)
        v = self.net(t, x) if cond is None else self.net(t, x, cond)
        return _checked(v, x, self.library)


def from_torchcfm(model, shape=None, num_classes=None) -> Adapted:
    """A torchcfm velocity model: the same path (x0 noise at t = 0), called ``model(t, x[, y])`` — e.g. its
    ``UNetModelWrapper`` — or its ``MLP(dim, time_varying=True)`` / ``torch_wrapper(MLP)`` (time as a column)."""
    try:
        from torchcfm.models import MLP
        from torchcfm.utils import torch_wrapper
    except ImportError as e:
        raise ImportError(f"from_torchcfm needs torchcfm ({e}); install the extra: {EXTRA}") from None
    if isinstance(model, torch_wrapper):
        model = model.model
    if isinstance(model, MLP):
        if not getattr(model, "time_varying", False):
            raise ValueError("this torchcfm MLP was built with time_varying=False: it is not a velocity field of "
                             "(x, t); build it with MLP(dim, time_varying=True)")
        return TorchCFM(model, time_column=True, shape=shape or (model.net[-1].out_features,), num_classes=num_classes)
    names = list(_params(model) or {}) if callable(model) else []
    if not callable(model) or (names and names[:2] != ["t", "x"]):
        raise ValueError(f"from_torchcfm needs a model called as model(t, x[, y]) (torchcfm's order), but "
                         f"{type(model).__name__} takes ({', '.join(names)}); for model(x, t) use from_flow_matching")
    return TorchCFM(model, time_column=False, shape=shape, num_classes=num_classes)


# -------------------------------------------------------------------------------------------------------- diffusers
def _denoiser_info(denoiser):
    cfg = getattr(denoiser, "config", None)
    get = (lambda k: cfg.get(k) if isinstance(cfg, dict) else getattr(cfg, k, None))
    size = get("sample_size")
    size = size[-1] if isinstance(size, (tuple, list)) else size
    C = get("in_channels")
    shape = (C, size, size) if C and size else None
    classes = get("num_class_embeds")
    return shape, classes


class DiffusersFlow(Adapted):
    """FlowMatchEulerDiscreteScheduler: x = (1 − σ)·data + σ·noise, the net predicts noise − data."""

    library = "diffusers"

    def __init__(self, denoiser, scheduler, cond_key: str, **kw):
        super().__init__(denoiser, **kw)
        self.scheduler, self.cond_key = scheduler, cond_key
        self.T = float(scheduler.config.num_train_timesteps)

    def grid(self, steps: int, **set_timesteps_kwargs) -> Tensor:
        self.scheduler.set_timesteps(steps, device="cpu", **set_timesteps_kwargs)
        sigmas = self.scheduler.sigmas.detach().to("cpu", torch.float64)
        if len(sigmas) != steps + 1 or sigmas[-1] != 0:
            raise ValueError(f"the scheduler made {len(sigmas)} sigmas ending at {sigmas[-1].item():.4g} for {steps} "
                             f"steps; specflow needs steps + 1 ending at 0 (data)")
        return 1 - sigmas

    def forward(self, x, t, cond=None):
        sigma = 1 - t.to(x.dtype)
        extras = {} if cond is None else {self.cond_key: cond}
        return -_checked(self.net(x, timestep=sigma * self.T, **extras), x, self.library)


class DiffusersVP(Adapted):
    """A β-schedule (DDPM/DDIM-like): x_vp = √ᾱ·x0 + √(1 − ᾱ)·ε, mapped onto the linear path."""

    library = "diffusers"

    def __init__(self, denoiser, scheduler, cond_key: str, **kw):
        super().__init__(denoiser, **kw)
        cfg = scheduler.config
        self.scheduler, self.cond_key = scheduler, cond_key
        self.prediction = cfg.prediction_type
        self.clip = float(cfg.clip_sample_range) if cfg.get("clip_sample", False) else None
        abar = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        self.register_buffer("logsnr", 0.5 * torch.log(abar / (1 - abar)), persistent=False)  # log(α/σ), falls with k
        t = self._times(abar)
        self.t_range = (float(t[-1]), float(t[0]))  # the times the net was trained on; others are clamped
        self._t0 = None

    def _times(self, abar: Tensor) -> Tensor:
        a, s = abar.sqrt(), (1 - abar).sqrt()
        return a / (a + s)

    def grid(self, steps: int, **set_timesteps_kwargs) -> Tensor:
        sch = self.scheduler
        sch.set_timesteps(steps, device="cpu", **set_timesteps_kwargs)
        ts = [int(k) for k in sch.timesteps]
        if len(ts) != steps:
            raise ValueError(f"the scheduler made {len(ts)} timesteps for {steps} steps; specflow needs one per step")
        if hasattr(sch, "final_alpha_cumprod"):  # DDIM: steps to t − T/n, ends at final_alpha_cumprod
            prev = [k - sch.config.num_train_timesteps // steps for k in ts]
            if prev[:-1] != ts[1:]:
                raise ValueError(f"with timestep_spacing={sch.config.timestep_spacing!r} this DDIM scheduler steps "
                                 f"from timestep k to k − T/n but evaluates the model at the next listed timestep "
                                 f"({ts[:3]}… vs {prev[:3]}…): no time grid reproduces that; use "
                                 f"timestep_spacing='leading' or 'trailing'")
            if float(sch.final_alpha_cumprod) != 1.0:
                raise ValueError("this DDIM scheduler has set_alpha_to_one=False: its last step stops at ᾱ_0 < 1, "
                                 "short of the data (t = 1) where specflow's grid ends; load it with "
                                 "set_alpha_to_one=True")
        abar = self.scheduler.alphas_cumprod.detach().to("cpu", torch.float64)[ts]
        g = torch.cat([self._times(abar), torch.ones(1, dtype=torch.float64)])
        self._t0 = float(g[0])
        return g

    def start(self, noise: Tensor) -> Tensor:
        """The library's start x_vp = noise (unit variance) at its first timestep, as x_lin = noise / (α + σ)
        at the first time of the grid built last (the first timestep depends on the step count)."""
        if self._t0 is None:
            raise ValueError("call .grid(steps) first: the start noise is placed at that grid's first time")
        return noise * math.hypot(self._t0, 1 - self._t0)  # 1 / (α + σ)

    def timestep(self, t: Tensor) -> Tensor:
        """The schedule's fractional timestep whose log-SNR is log(t / (1 − t)), clamped to the table."""
        lam = (torch.log(t) - torch.log1p(-t)).to(torch.float64)
        table = self.logsnr.to(t.device)
        k = torch.searchsorted(-table, -lam).clamp(1, len(table) - 1)  # table[k−1] ≥ λ > table[k]
        lo, hi = table[k - 1], table[k]
        frac = ((lo - lam) / (lo - hi)).clamp(0, 1)
        kf = (k - 1) + frac
        near = (kf - kf.round()).abs() < 1e-6  # grid points: the scheduler's integer timesteps exactly
        return torch.where(near, kf.round(), kf)

    def forward(self, x, t, cond=None):
        t64 = t.to(torch.float64).clamp(*self.t_range)  # e.g. heun's last call at t = 1, where σ = 0
        r = torch.sqrt(t64**2 + (1 - t64) ** 2)  # 1 / (α + σ) of the VP state at t (α² + σ² = 1)
        a, s = (t64 / r), ((1 - t64) / r)
        shape = (-1,) + (1,) * (x.ndim - 1)
        a_, s_, r_ = (u.to(x.dtype).view(shape) for u in (a, s, r))
        x_vp = x / r_
        extras = {} if cond is None else {self.cond_key: cond}
        out = _checked(self.net(x_vp, timestep=self.timestep(t64).to(x.dtype), **extras), x, self.library).to(x.dtype)
        if self.prediction == "epsilon":
            eps, x0 = out, (x_vp - s_ * out) / a_
        elif self.prediction == "v_prediction":
            x0, eps = a_ * x_vp - s_ * out, a_ * out + s_ * x_vp
        else:  # "sample"
            x0, eps = out, (x_vp - a_ * out) / s_
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
            eps = (x_vp - a_ * x0) / s_
        return x0 - eps  # d/dt of t·x0 + (1 − t)·ε


def from_diffusers(denoiser, scheduler, cond_key: str = "class_labels") -> Adapted:
    """A diffusers denoiser (``UNet2DModel``, ``SD3Transformer2DModel``, … called ``denoiser(x, timestep=,
    **{cond_key: cond})``) with its scheduler: ``FlowMatchEulerDiscreteScheduler`` (rectified flow), or a
    β-schedule scheduler (``DDPMScheduler``, ``DDIMScheduler``, …) with prediction_type "epsilon",
    "v_prediction" or "sample". Anything else is refused with the reason."""
    cfg = getattr(scheduler, "config", None)
    if cfg is None or not hasattr(scheduler, "set_timesteps"):
        raise ValueError(f"from_diffusers needs a diffusers scheduler (with .config and .set_timesteps), got "
                         f"{type(scheduler).__name__}")
    if not callable(denoiser):
        raise ValueError(f"from_diffusers needs a callable denoiser, got {type(denoiser).__name__}")
    shape, classes = _denoiser_info(denoiser)
    kind = type(scheduler).__name__
    if kind.startswith("FlowMatch"):
        if cfg.get("invert_sigmas", False):
            raise ValueError(f"{kind} with invert_sigmas=True runs time backwards; load it with invert_sigmas=False")
        return DiffusersFlow(denoiser, scheduler, cond_key, shape=shape, num_classes=classes)
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"from_diffusers supports FlowMatchEulerDiscreteScheduler and β-schedule schedulers "
                         f"(DDPMScheduler, DDIMScheduler, …); {kind} has neither sigmas of a flow nor alphas_cumprod")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"{kind} has prediction_type={pred!r}; specflow maps 'epsilon', 'v_prediction' and "
                         f"'sample' onto the linear path")
    if str(cfg.get("variance_type", "fixed_small")).startswith("learned"):
        raise ValueError(f"{kind} has variance_type={cfg.get('variance_type')!r}: the net also predicts the step's "
                         f"variance (2× the channels), which specflow's samplers do not use; only the mean "
                         f"(ε, v or x0) prediction is supported")
    if cfg.get("thresholding", False):
        raise ValueError(f"{kind} has thresholding=True: dynamic thresholding rescales x̂0 by a per-sample "
                         f"quantile, which specflow does not reproduce; load it with thresholding=False "
                         f"(clip_sample is supported)")
    return DiffusersVP(denoiser, scheduler, cond_key, shape=shape, num_classes=classes)


def load_diffusers(folder, subfolder: str | None = None, cond_key: str = "class_labels") -> Adapted:
    """A pipeline saved with ``save_pretrained`` in a local folder (nothing is downloaded): its ``unet`` or
    ``transformer`` and its ``scheduler``, adapted with ``from_diffusers``."""
    import json
    from pathlib import Path

    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"--diffusers needs diffusers ({e}); install the extra: {EXTRA}") from None
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"diffusers folder {str(root)!r} does not exist (a pipeline saved with "
                                f"pipe.save_pretrained(folder))")
    sched_cfg = root / "scheduler" / "scheduler_config.json"
    if not sched_cfg.is_file():
        raise ValueError(f"{root} has no scheduler/scheduler_config.json: specflow needs the pipeline's scheduler to "
                         f"know its time, sign and scale; save the whole pipeline with save_pretrained")
    sched_name = json.loads(sched_cfg.read_text()).get("_class_name")
    sched_cls = getattr(diffusers, str(sched_name), None)
    if sched_cls is None:
        raise ValueError(f"{sched_cfg} names scheduler class {sched_name!r}, which this diffusers does not have")
    scheduler = sched_cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    names = [subfolder] if subfolder else [n for n in ("unet", "transformer") if (root / n).is_dir()]
    if not names:
        raise ValueError(f"{root} has neither a unet/ nor a transformer/ folder; name the denoiser's subfolder")
    cfg_file = root / names[0] / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{cfg_file} is missing: the denoiser was not saved with save_pretrained")
    net_name = json.loads(cfg_file.read_text()).get("_class_name")
    net_cls = getattr(diffusers, str(net_name), None)
    if net_cls is None:
        raise ValueError(f"{cfg_file} names model class {net_name!r}, which this diffusers does not have")
    denoiser = net_cls.from_pretrained(root, subfolder=names[0], local_files_only=True).eval()
    return from_diffusers(denoiser, scheduler, cond_key)
