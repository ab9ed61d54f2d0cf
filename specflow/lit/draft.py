"""Training drafts for speculative sampling against a frozen target (a ``TargetFlow`` checkpoint's EMA net).

``DraftFlow`` distils a small independent velocity net (drafter "model") on the path:

    x_t = t·x1 + (1 − t)·x0,   loss = E‖v_draft(x_t, t, y) − v_target(x_t, t, y)‖²

``MedusaFlow`` trains ``MedusaHeads`` (drafter "medusa") on the target's own trajectories, generated on the
fly by a cheap rollout: start on the path at a grid time t_k, then take L steps of the target's own sampler
— ``euler`` (η = 0) or ``sde`` (η = 1), per row — keeping at every state y_i the target's trunk features
h_i and prediction x̂1_i. Every pair (i, i + d) is an example for offset d: head loss d =
‖x̂1_heads(y_{i+d} | h_i, y_i, x̂1_i) − x̂1_target(y_{i+d})‖², logged per head (``train/loss_head{d}``) next
to the frozen drafter's (``train/frozen``, x̂1_i as the guess). L + 1 target calls give L(L+1)/2 examples.
``weighting="accept"`` weights each example by how much its x̂1 error moves the speculative acceptance.

Both can also be trained on what verification pays rather than on a velocity MSE (``loss`` / ``weighting``
"kl" or "log_accept", see ``transition_loss``): a drafted step from t to s is accepted with probability
2Φ(−z/2), z = ‖m̂ − m‖/c = r·‖x̂1_draft − x̂1_target‖ (the whole image's error in units of the step's noise),
so the loss is priced in z on the grid the sampler will run.

The target is loaded in ``setup`` from ``target_ckpt`` (so ``load_from_checkpoint`` needs neither the
target nor a config), kept frozen and in eval mode, and left out of the draft's checkpoint; the checkpoint
records the target's fingerprint (``specflow.checkpoint``) so a draft is never used with another target.
"""
from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specflow.checkpoint import DRAFT_KEY, build_draft, load_target, target_fingerprint
from specflow.lit.target import sample_time
from specflow.path import expand, interpolate, transition_std, x0_hat, x1_hat


class DraftModule(pl.LightningModule):
    """Shared shell: the frozen target, label dropout, AdamW with warm-up and cosine decay, the fingerprint."""

    drafter = "base"

    def __init__(self, target_ckpt: str, lr: float, weight_decay: float, warmup_steps: int,
                 betas: tuple[float, float], label_dropout: float, decay_steps: int):
        super().__init__()
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if warmup_steps < 0 or decay_steps < 0:
            raise ValueError(f"warmup_steps and decay_steps must be >= 0, got {warmup_steps}, {decay_steps}")
        self.target: nn.Module | None = None  # attached in setup(); not a parameter of the draft
        self.draft: nn.Module | None = None
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------------------- target
    def attach_target(self, target: nn.Module | None = None) -> None:
        """Load (or take) the frozen target and build/check the draft against it. Idempotent."""
        if self.target is not None:
            return
        if target is None:
            if not self.hparams.target_ckpt:
                raise ValueError("model.target_ckpt is empty: pass the target's checkpoint, e.g. "
                                 "--model.target_ckpt runs/digits/checkpoints/last.ckpt")
            target = load_target(self.hparams.target_ckpt)
        self._fingerprint = target_fingerprint(target)
        self._check_target(target)
        self.target = target.requires_grad_(False).eval()

    def _check_target(self, target: nn.Module) -> None:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        self.attach_target()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.target is not None:
            self.target.eval()  # frozen: dropout off, whatever the trainer switches
        return self

    def _cond(self, y: Tensor | None) -> Tensor | None:
        """The batch's labels for a class-conditional target, ``label_dropout`` of them set to the null class."""
        K = getattr(self.target, "num_classes", None)
        if K is None or y is None:
            return None
        drop = torch.rand(y.shape, device=y.device) < self.hparams.label_dropout
        return torch.where(drop, torch.full_like(y, K), y)

    @staticmethod
    def _split(batch) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    def _logging_step(self) -> bool:
        tr = self._trainer
        if tr is None:  # driven by hand (tests, notebooks): nothing to log to
            return False
        every = tr.log_every_n_steps
        return bool(tr.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    # ----------------------------------------------------------------------------------------- checkpoint
    def _build_args(self) -> dict:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("target.")}
        checkpoint[DRAFT_KEY] = {"drafter": self.drafter, "target_fingerprint": self._fingerprint,
                                 "target_path": str(self.hparams.target_ckpt), "build": self._build_args()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(DRAFT_KEY) or {}
        if self.target is not None:  # resuming a fit: same target, and its weights are not in the file
            if meta.get("target_fingerprint") not in (None, self._fingerprint):
                raise ValueError(f"cannot resume: the checkpoint's draft was trained for target fingerprint "
                                 f"{meta['target_fingerprint']}, but model.target_ckpt={self.hparams.target_ckpt!r} "
                                 f"has fingerprint {self._fingerprint}; point target_ckpt at "
                                 f"{meta.get('target_path')!r} or start a fresh run")
            checkpoint["state_dict"].update({f"target.{k}": v for k, v in self.target.state_dict().items()})

    # ----------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.draft.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        warm, decay = max(1, hp.warmup_steps), hp.decay_steps

        def factor(step: int) -> float:  # linear warm-up, then cosine to 10 % over decay_steps (0: constant)
            if step < warm:
                return (step + 1) / warm
            if decay <= 0:
                return 1.0
            u = min(1.0, (step - warm) / max(1, decay - warm))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * u))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DraftFlow(DraftModule):
    """A small velocity net distilled from the frozen target (sample with ``drafter="model"``).

    Args:
        target_ckpt: the target's TargetFlow checkpoint.
        arch, net: the draft's architecture for ``specflow.nets.build_net`` (plain types); its image size,
            channels and classes must match the target's (checked in ``setup``).
        lr, weight_decay, betas, warmup_steps, decay_steps: AdamW, linear warm-up, cosine decay to 10 %.
        time_sampling: law of t on the path ("uniform" | "logit_normal") for ``loss="mse"``.
        label_dropout: share of labels replaced by the null class, so the draft also learns the
            unconditional velocity used by classifier-free guidance.
        loss: "mse" (velocity MSE), or priced in the speculative step's noise on the grids ``steps``
            (t = k/N, k uniform over the steps that have noise): "kl" (z²/2) or "log_accept" (−log of the
            step's acceptance probability); see ``transition_loss``.
        steps: grid sizes N the "kl" / "log_accept" losses price the step on (one N per row).
    """

    drafter = "model"

    def __init__(self, target_ckpt: str = "", arch: str = "unet", net: dict | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 100, betas: tuple[float, float] = (0.9, 0.999),
                 decay_steps: int = 0, time_sampling: str = "uniform", label_dropout: float = 0.1,
                 loss: str = "mse", steps: list[int] = (100,)):
        super().__init__(target_ckpt, lr, weight_decay, warmup_steps, betas, label_dropout, decay_steps)
        if loss not in ("mse", *TRANSITION_LOSSES):
            raise ValueError(f"loss must be one of {('mse', *TRANSITION_LOSSES)}, got {loss!r}")
        steps = [int(n) for n in steps]
        if not steps or min(steps) < 2:
            raise ValueError(f"steps must list grid sizes N >= 2, got {steps}")
        self.save_hyperparameters()
        self.hparams.steps = steps
        self.draft = build_draft("model", self._build_args())

    def _build_args(self) -> dict:
        return {"arch": self.hparams.arch, "net": dict(self.hparams.net or {})}

    def _check_target(self, target):
        for key in ("image_size", "in_channels", "num_classes"):
            tv, dv = getattr(target, key, None), getattr(self.draft, key, None)
            if tv != dv:
                raise ValueError(f"the target has {key}={tv} but the draft net has {key}={dv}: set "
                                 f"model.net.{key}: {'null' if tv is None else tv}")

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.draft(x, t, cond)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x1, y = self._split(batch)
        c = self._cond(y)
        x0 = torch.randn_like(x1)
        hp = self.hparams
        if hp.loss == "mse":
            t = sample_time(x1.shape[0], x1, hp.time_sampling)
        else:  # a grid time with a noisy step after it: t = k/N, k ∈ {0, …, N − 2}
            N = torch.tensor(hp.steps, device=x1.device)[torch.randint(len(hp.steps), x1.shape[:1], device=x1.device)]
            t = ((torch.rand(x1.shape[0], device=x1.device) * (N - 1)).floor() / N).to(x1.dtype)
        x_t = interpolate(x0, x1, t)
        with torch.no_grad():
            v_target = self.target(x_t, t, c)
        v = self.draft(x_t, t, c)
        if hp.loss == "mse":
            loss = F.mse_loss(v.float(), v_target.float())
        else:  # x̂1 = x + (1 − t)·v: the x̂1 error is (1 − t)·(v − v_target)
            err = expand(1 - t, v).float() * (v.float() - v_target.float())
            loss = transition_loss(err, noise_units(t, N, cap=None), hp.loss).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite draft loss at step {self.global_step}: lower model.lr "
                                     f"({self.hparams.lr:g}) or enable trainer.gradient_clip_val")
        if self._logging_step():
            self.log("train/loss", loss, prog_bar=True)
        return loss


class MedusaFlow(DraftModule):
    """Medusa heads on the frozen target's trunk, trained on its own euler/sde rollouts (``drafter="medusa"``).

    Args:
        target_ckpt: the target's TargetFlow checkpoint (its net must have ``features``/``output``).
        hidden, depth: the heads' width and residual layers (``specflow.nets.heads.MedusaHeads``).
        offsets: L, steps ahead per rollout (the speculative window / sfm leap the heads serve).
        steps: grid sizes N to train on (uniform grids t_k = k/N, one N per row).
        weighting: "x1" (plain MSE on x̂1) or "accept": each example weighted by r = b/((1 − s)·c) of the step
            the draft velocity at (y, s) drives (m̂ − m = r·c·Δx̂1 there, so rejections grow like r‖Δx̂1‖;
            capped at 20, the last step's c = 0 would make it infinite): spends capacity where speculative
            acceptance is decided (late times) rather than where x̂1 errors are largest (early times).
            "kl" / "log_accept": the loss itself priced in the step's noise (``transition_loss``; steps into
            t = 1, which accept only an exact match, are left out).
        reuse: optimizer steps per rollout (the target calls dominate the cost on a CPU: reuse > 1 trains
            the heads more per target call; each rollout is still fresh data from the target).
        etas: the samplers rolled out, by η (0 = euler, 1 = sde), one per row.
        feature_channels, in_channels, image_size: the target's geometry, filled in from the target at
            setup (given only when rebuilding from a checkpoint).
        lr, weight_decay, betas, warmup_steps, decay_steps, label_dropout: as for ``DraftFlow``.
    """

    drafter = "medusa"

    def __init__(self, target_ckpt: str = "", hidden: int = 64, depth: int = 2, offsets: int = 8,
                 steps: list[int] = (100,), etas: list[float] = (0.0, 1.0), reuse: int = 1,
                 weighting: str = "x1", lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 100,
                 betas: tuple[float, float] = (0.9, 0.999), decay_steps: int = 0, label_dropout: float = 0.1,
                 feature_channels: int | None = None, in_channels: int | None = None, image_size: int | None = None):
        super().__init__(target_ckpt, lr, weight_decay, warmup_steps, betas, label_dropout, decay_steps)
        steps, etas = [int(n) for n in steps], [float(e) for e in etas]
        if not steps or min(steps) < 2:
            raise ValueError(f"steps must list grid sizes N >= 2, got {steps}")
        if not etas or not all(0.0 <= e <= 1.0 for e in etas):
            raise ValueError(f"etas must list η values in [0, 1] (0 = euler, 1 = sde), got {etas}")
        if weighting not in ("x1", "accept", *TRANSITION_LOSSES):
            raise ValueError(f"weighting must be one of {('x1', 'accept', *TRANSITION_LOSSES)}, got {weighting!r}")
        if offsets < 1 or reuse < 1:
            raise ValueError(f"offsets and reuse must be >= 1, got offsets={offsets}, reuse={reuse}")
        self.save_hyperparameters()
        self.hparams.steps, self.hparams.etas = steps, etas
        if feature_channels is not None and in_channels is not None:
            self.draft = build_draft("medusa", self._build_args())
        self._rollout = None  # (the last rollout, how many steps it has served)

    def _build_args(self) -> dict:
        hp = self.hparams
        return {"feature_channels": hp.feature_channels, "in_channels": hp.in_channels, "image_size": hp.image_size,
                "hidden": hp.hidden, "depth": hp.depth, "offsets": hp.offsets}

    def _check_target(self, target):
        if not (callable(getattr(target, "features", None)) and hasattr(target, "feature_channels")):
            raise ValueError(f"Medusa heads need a target with features(x, t, cond)/output(h); "
                             f"got {type(target).__name__}")
        if type(target).__name__ == "DiT":
            raise ValueError("Medusa heads read (B, C, H, W) or (B, C) features; a DiT's token features are not "
                             "supported yet: use DraftFlow (drafter 'model') for DiT targets")
        geo = {"feature_channels": target.feature_channels, "in_channels": target.in_channels,
               "image_size": target.image_size}
        for key, v in geo.items():
            if self.hparams[key] is not None and self.hparams[key] != v:
                raise ValueError(f"model.{key}={self.hparams[key]} but the target has {key}={v}; drop the key "
                                 f"(it is filled in from the target)")
            self.hparams[key] = v
        if self.draft is None:
            self.draft = build_draft("medusa", self._build_args())

    def forward(self, y, s, cond=None, **context):
        return self.draft(y, s, cond, **context)

    @torch.no_grad()
    def rollout(self, x1: Tensor, c: Tensor | None):
        """A piece of the target's own trajectory per row: states y_0..y_L from y_0 on the path at a grid time
        t_k, L steps of euler (η = 0) or sde (η = 1), and at every state the target's trunk features h_i and
        prediction x̂1_i. Returns (Y, T, H, X1, valid, N): (L+1, B, ...) each, ``valid`` = time < 1, and N
        the rows' grid sizes."""
        hp, f = self.hparams, self.target
        B, L, dev = x1.shape[0], hp.offsets, x1.device
        N = torch.tensor(hp.steps, device=dev)[torch.randint(len(hp.steps), (B,), device=dev)]
        eta = torch.tensor(hp.etas, device=dev, dtype=x1.dtype)[torch.randint(len(hp.etas), (B,), device=dev)]
        k = (torch.rand(B, device=dev) * (N - 1)).long()  # k ≤ N − 2: at least one later state before t = 1
        T = torch.stack([((k + j).clamp(max=N) / N).to(x1.dtype) for j in range(L + 1)])  # (L+1, B)
        y = interpolate(torch.randn_like(x1), x1, T[0])  # a state of the path at t_k
        Y, H, X1 = [], [], []
        for j in range(L + 1):
            h = f.features(y, T[j], c)
            v = f.output(h).to(y.dtype)
            Y.append(y), H.append(h), X1.append(x1_hat(y, T[j], v))
            if j < L:  # the target's own step: y ← s·x̂1 + sqrt(σ_s² − c²)·x̂0 + c·ε, with c ∝ η
                t, s = T[j], T[j + 1]
                cj = transition_std(t, s, 1.0) * eta
                g = ((1 - s) ** 2 - cj**2).clamp_min(0).sqrt()
                y = expand(s, y) * X1[-1] + expand(g, y) * x0_hat(y, t, v) + expand(cj, y) * torch.randn_like(y)
        valid = torch.stack([(k + j) <= N - 1 for j in range(L + 1)])
        return torch.stack(Y), T, torch.stack(H), torch.stack(X1), valid, N

    def training_step(self, batch, batch_idx: int) -> Tensor:
        """Every pair (i, i + d), d = 1..L, of one rollout trains head offset d: L + 1 target calls give
        L(L+1)/2 examples per row (features at y_i, label x̂1 at y_{i+d})."""
        x1, y = self._split(batch)
        if self._rollout is None or self._rollout[1] >= self.hparams.reuse:
            self._rollout = [self.rollout(x1, self._cond(y)), 0]
        (Y, T, H, X1, valid, N), self._rollout[1] = self._rollout[0], self._rollout[1] + 1
        L = Y.shape[0] - 1
        src = torch.cat([torch.arange(L + 1 - d) for d in range(1, L + 1)]).to(Y.device)
        off = torch.cat([torch.full((L + 1 - d,), d) for d in range(1, L + 1)]).to(Y.device)
        dst = src + off
        pred = self.draft.predict_x1(Y[dst].flatten(0, 1), T[dst].flatten(), features=H[src].flatten(0, 1),
                                     x_src=Y[src].flatten(0, 1), t_src=T[src].flatten(),
                                     x1_src=X1[src].flatten(0, 1)).view_as(Y[dst])
        diff = pred.float() - X1[dst].float()
        w = valid[dst].float()
        if self.hparams.weighting in TRANSITION_LOSSES:  # steps into t = 1 (r = 0 there): no draft can win them
            w = w * (T[dst] < 1 - 1.0 / N - 1e-6).float()
            r = torch.where(w > 0, noise_units(T[dst], N, cap=None), 0.0)  # zeroed before the loss, not after:
            err = transition_loss(diff, r, self.hparams.weighting)  # a masked huge z would still send NaN back
        else:
            err = diff.pow(2).flatten(2).mean(2)  # (pairs, B)
            if self.hparams.weighting == "accept":
                w = w * noise_units(T[dst], N).float()
        per_head = torch.zeros(L, device=Y.device).index_add_(0, off - 1, (err * w).sum(1))
        n_head = torch.zeros(L, device=Y.device).index_add_(0, off - 1, w.sum(1))
        per_head = per_head / n_head.clamp_min(1e-12)
        loss = per_head.sum() / (n_head > 0).sum().clamp_min(1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite heads loss at step {self.global_step}: lower model.lr "
                                     f"({self.hparams.lr:g}) or enable trainer.gradient_clip_val")
        if self._logging_step():
            with torch.no_grad():  # the training-free (frozen) drafter's loss on the same pairs, for reference
                frozen = (X1[src].float() - X1[dst].float()).pow(2).flatten(2).mean(2)
                frozen = (frozen * w).sum() / w.sum().clamp_min(1e-12)
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/frozen", frozen)
            self.log_dict({f"train/loss_head{d + 1}": per_head[d] for d in range(L)})
        return loss


TRANSITION_LOSSES = ("kl", "log_accept")


def transition_loss(err_x1: Tensor, r: Tensor, kind: str) -> Tensor:
    """Per-example loss of a draft whose x̂1 misses the target's by ``err_x1`` (n, ...), at steps whose noise
    units are ``r`` (n,) (``noise_units``): with z = r·‖err_x1‖ = ‖m̂ − m‖/c over the whole example,

        "kl":          KL(q‖p) = z²/2 between the draft's and the target's Gaussian transitions;
        "log_accept":  −log P(accept) = −log 2Φ(−z/2): linear in z near a match (where the sampler's
                       acceptance is decided) and ≈ z²/8 far from one, so a poor draft still gets a gradient.
                       Summed over a window it is −log P(all steps accepted).
    """
    z = r.float() * err_x1.flatten(r.ndim).float().norm(dim=-1)
    if kind == "kl":
        return 0.5 * z.square()
    return -(torch.special.log_ndtr(-0.5 * z) + math.log(2.0))


def noise_units(t: Tensor, N: Tensor, cap: float | None = 20.0) -> Tensor:
    """r = b/((1 − t)·c) for the sde step t → t + 1/N (rows' N): the draft mean's error per unit x̂1 error, in
    units of the step's noise std c (see ``MedusaFlow``). It grows from ~0.01 at t = 0 to ~86 at t = 0.98
    (N = 100). Capped at ``cap`` (the last step's c = 0 would make it infinite); ``cap=None``: exact, and 0
    on steps into t = 1 (they accept only an exact match: no draft error is priced there)."""
    from specflow.path import transition_coefficients

    s = (t + 1.0 / N.to(t.dtype)).clamp(max=1.0)
    _, b, c = transition_coefficients(t.double(), s.double(), 1.0)
    r = b / ((1 - t.double()).clamp_min(1e-12) * c.clamp_min(1e-12))
    r = r.clamp(0, cap) if cap is not None else torch.where(c > 0, r, 0.0)
    return r.to(t.dtype)
