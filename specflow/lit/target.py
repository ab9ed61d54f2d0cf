"""TargetFlow: the Lightning shell that trains a velocity network by flow matching on the linear path.

    x_t = t·x1 + (1 − t)·x0,  x0 ~ N(0, I),  loss = E‖v_θ(x_t, t, y) − (x1 − x0)‖²

The network, the path math and the sampler live elsewhere (``specflow.nets``, ``specflow.path``,
``specflow.sampling``); this module only adds the training concerns: time sampling, label dropout for
classifier-free guidance, AdamW with linear warm-up, EMA weights (what sampling uses) and a loud stop on a
non-finite loss. Hyper-parameters are plain types, so ``TargetFlow.load_from_checkpoint(path)`` rebuilds the
model with no config (and loads with ``weights_only``).
"""
from __future__ import annotations

import copy
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specflow.path import conditional_velocity, interpolate

TimeSampling = Literal["uniform", "logit_normal"]


def sample_time(n: int, like: Tensor, kind: str = "uniform", loc: float = 0.0, scale: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Training times t ∈ (0, 1), shape (n,), on ``like``'s device/dtype.

    "uniform": t ~ U(0, 1). "logit_normal": t = sigmoid(loc + scale·n), n ~ N(0, 1) (SD3), which spends
    more of the budget on mid-path times, where the velocity is hardest to predict.
    """
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)
    if kind == "logit_normal":
        z = torch.randn(n, generator=generator, device=like.device, dtype=like.dtype)
        return torch.sigmoid(loc + scale * z)
    raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {kind!r}")


def flow_matching_loss(net: nn.Module, x1: Tensor, x0: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    """MSE between v_θ(x_t, t, cond) and the conditional velocity x1 − x0, in float32."""
    x_t = interpolate(x0, x1, t)
    v = net(x_t, t, cond)
    return F.mse_loss(v.float(), conditional_velocity(x0, x1).float())


class TargetFlow(pl.LightningModule):
    """Flow-matching training of a velocity net ``net(x, t, cond=None) -> v`` built by ``specflow.nets``.

    Args:
        arch: network family for ``specflow.nets.build_net`` ("unet", "dit", "mlp").
        net: keyword arguments of that network (plain types: ints, floats, lists), e.g.
            ``{image_size: 8, in_channels: 1, model_channels: 32, num_classes: 10}``.
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear learning-rate warm-up from lr/warmup_steps to lr over this many optimizer steps.
        ema_decay: EMA of the weights, updated after every optimizer step; the EMA net samples.
        ema_warmup: use decay min(ema_decay, (1 + n)/(10 + n)) after n steps, so short runs are not
            dominated by the random initialisation.
        time_sampling, time_loc, time_scale: law of the training time t (see ``sample_time``).
        label_dropout: probability of replacing a label with the null class (index ``num_classes``) so the
            same net learns the unconditional velocity used by classifier-free guidance.
    """

    def __init__(
        self,
        arch: str = "unet",
        net: dict | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        time_sampling: TimeSampling = "uniform",
        time_loc: float = 0.0,
        time_scale: float = 1.0,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.save_hyperparameters()
        from specflow.nets import build_net  # late import: nets are optional for the sampling-only user

        self.net = build_net(arch, **(net or {}))
        # The EMA copy follows the trainer's train/eval switching; velocity_model() puts it in eval mode.
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.num_classes: int | None = getattr(self.net, "num_classes", None)
        if label_dropout > 0 and self.num_classes is None:
            raise ValueError(f"label_dropout={label_dropout} needs a class-conditional net; "
                             f"set model.net.num_classes or label_dropout: 0")

    # ----------------------------------------------------------------------------------------- sampling
    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The online (training) net. Sample with ``velocity_model()`` instead."""
        return self.net(x, t, cond)

    def velocity_model(self, ema: bool = True) -> nn.Module:
        """The net to sample with: the EMA copy (default) in eval mode, ``model(x, t, cond=None) -> v``."""
        return (self.ema if ema else self.net).eval()

    # ----------------------------------------------------------------------------------------- training
    def _cond(self, y: Tensor | None, dropout: float, generator: torch.Generator | None = None) -> Tensor | None:
        """Labels for the net: None for an unconditional net; else y with ``dropout`` of them set to null."""
        if self.num_classes is None or y is None:
            return None
        if dropout > 0:
            drop = torch.rand(y.shape, generator=generator, device=y.device) < dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y

    def _split(self, batch) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x1, y = self._split(batch)
        x0 = torch.randn_like(x1)
        hp = self.hparams
        t = sample_time(x1.shape[0], x1, hp.time_sampling, hp.time_loc, hp.time_scale)
        loss = flow_matching_loss(self.net, x1, x0, t, self._cond(y, hp.label_dropout))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}: lower model.lr "
                f"(now {hp.lr:g}) or raise model.warmup_steps, enable trainer.gradient_clip_val (e.g. 1.0), "
                f"and on GPU train with precision bf16-mixed rather than 16-mixed")
        if self._logging_step():
            self.log("train/loss", loss, prog_bar=True)
            self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _logging_step(self) -> bool:
        """True on the steps the logger writes (every ``log_every_n_steps``). ``self.log`` costs about a
        millisecond of Python per call, most of Lightning's overhead on a small net, and between these steps
        the logger discards the values anyway (the progress bar shows the last logged loss)."""
        tr = self.trainer
        every = tr.log_every_n_steps
        return bool(tr.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        """The same loss with the EMA net, on noise and times fixed per batch so epochs are comparable."""
        x1, y = self._split(batch)
        g = torch.Generator(device=x1.device).manual_seed(batch_idx)
        x0 = torch.randn(x1.shape, generator=g, device=x1.device, dtype=x1.dtype)
        hp = self.hparams
        t = sample_time(x1.shape[0], x1, hp.time_sampling, hp.time_loc, hp.time_scale, generator=g)
        loss = flow_matching_loss(self.ema, x1, x0, t, self._cond(y, 0.0))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema ← decay·ema + (1 − decay)·net, after each optimizer step (n = steps taken so far)."""
        n = self.global_step
        decay = self.hparams.ema_decay
        if self.hparams.ema_warmup:
            decay = min(decay, (1 + n) / (10 + n))
        ema_p, net_p = list(self.ema.parameters()), list(self.net.parameters())
        torch._foreach_lerp_(ema_p, net_p, 1.0 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.net.buffers()):
            b_ema.copy_(b)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                weight_decay=hp.weight_decay)
        warm = max(1, hp.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        """Fail early when the data and the net disagree on shapes or classes (names the config key)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        for key in ("image_size", "in_channels"):
            dv, nv = getattr(dm, key, None), getattr(self.net, key, None)
            if dv is not None and nv is not None and dv != nv:
                raise ValueError(f"data.{key}={dv} but the net has {key}={nv}; set model.net.{key}: {dv} "
                                 f"(or change the data) in the config")
        dc = getattr(dm, "num_classes", None)
        if self.num_classes is not None and dc is not None and dc != self.num_classes:
            raise ValueError(f"data has num_classes={dc} but model.net.num_classes={self.num_classes}; "
                             f"set model.net.num_classes: {dc} (or null for an unconditional model)")
        if self.num_classes is not None and hasattr(dm, "num_classes") and dc is None:
            raise ValueError(f"model.net.num_classes={self.num_classes} but the data has no labels; "
                             f"set model.net.num_classes: null")
