"""SamplingEvaluation: during training, sample a fixed-seed noise set with several samplers and log what each
cost (sequential/total NFE, acceptance, bandit arms, wall time) and how good it is (FID/KID or FID-proxy).

Sample index i always starts from the same noise and draws all its later randomness from its own stream
(``per_sample_generators(seed, [i])``), so the samples do not depend on the batch size or on how many DDP
ranks share the work: rank r draws indices r, r + W, r + 2W, … and the results are gathered in index order.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from specflow.sampling import Sampler, build_sampler
from specflow.generate import sample_indices, sample_shape  # noqa: F401  (sample_indices re-exported)
from specflow.precision import autocast, check_precision
from specflow.tally import Tally

DEFAULT_SAMPLERS = [{"name": "euler"}, {"name": "speculative"}, {"name": "sfm"}, {"name": "fastflow"}]


class SamplingEvaluation(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and/or every ``every_n_epochs`` epochs), on every rank: sample
    ``num_samples`` fixed-seed noises with each sampler, gather, and log to the trainer's loggers under
    ``eval/<label>/...``: sequential_nfe, total_nfe, draft_nfe, speedup (N / sequential NFE), acceptance_rate,
    rounds, wall_time_s, arm_<k> counts, and FID/KID against ``reference_size`` fixed training images —
    named ``fid``/``kid`` with Inception, ``fid_proxy``/``kid_proxy`` with the offline classifier (see
    ``specflow.metrics``). Image grids go to TensorBoard (``add_image``); ``save_dir`` also writes each
    evaluation's samples (.npz) and grid (.png) there.

    Args:
        samplers: list of ``{"name": ..., **options}`` for ``build_sampler``; optional keys ``label`` (the
            log name, default the sampler name) and ``steps`` (default ``steps``). Default: euler (the
            baseline), speculative, sfm, fastflow.
        steps: grid size N for samplers that do not set their own.
        num_samples, seed: the fixed evaluation set: indices 0..num_samples−1 of per-sample streams of seed.
        batch_size: samples per sampler call on each rank.
        feature_extractor: "auto" (Inception if its weights are on disk, else the classifier), "inception",
            "classifier", or "none" (no FID/KID). Images only (vector data never gets FID).
        inception_weights: path of torch-fidelity's Inception weights (default: torch hub's cache).
        classifier_cache: file to load the FID-proxy classifier from, or to save it to after training.
        classifier_steps: training steps of that classifier (digits: 600 steps ≈ 12 s on one CPU thread).
        reference_size: real training images the metrics compare against (fixed by ``seed``).
        kid_subsets: KID random subsets.
        log_images, grid_size: log a grid of the first ``grid_size`` samples per sampler.
        ema: sample with the EMA weights (``pl_module.velocity_model(ema)``).
        guidance_scale: classifier-free guidance for a class-conditional model (None: plain conditional).
        precision: "32", or "bf16" / "16" to sample with the net under autocast (the samplers stay in float32).

    Bandit samplers keep learning across evaluations, and their state is saved with the checkpoint. Their
    first evaluation is also their calibration (fastflow runs plain Euler on its first batch).
    """

    def __init__(self, samplers: list[dict] | None = None, steps: int = 50, num_samples: int = 64, seed: int = 0,
                 every_n_steps: int | None = 1000, every_n_epochs: int | None = None, batch_size: int = 256,
                 feature_extractor: Literal["auto", "inception", "classifier", "none"] = "auto",
                 inception_weights: str | None = None, classifier_cache: str | None = None,
                 classifier_steps: int = 600, reference_size: int = 1000, kid_subsets: int = 50,
                 log_images: bool = True, grid_size: int = 64, save_dir: str | None = None, ema: bool = True,
                 guidance_scale: float | None = None, precision: Literal["32", "bf16", "16", 32, 16] = "32"):
        super().__init__()
        precision = check_precision(precision)
        if every_n_steps is None and every_n_epochs is None:
            raise ValueError("SamplingEvaluation needs every_n_steps or every_n_epochs (or both); got neither")
        for name, v in dict(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs).items():
            if v is not None and v < 1:
                raise ValueError(f"{name} must be ≥ 1 or null, got {v}")
        for name, v in dict(num_samples=num_samples, batch_size=batch_size, steps=steps, grid_size=grid_size,
                            classifier_steps=classifier_steps, kid_subsets=kid_subsets).items():
            if v < 1:
                raise ValueError(f"{name} must be ≥ 1, got {v}")
        if feature_extractor not in ("auto", "inception", "classifier", "none"):
            raise ValueError(f"feature_extractor must be 'auto', 'inception', 'classifier' or 'none', "
                             f"got {feature_extractor!r}")
        if feature_extractor != "none" and reference_size < 4:
            raise ValueError(f"reference_size must be ≥ 4 for FID/KID, got {reference_size} "
                             f"(or set feature_extractor: none)")
        self.samplers = self._build(samplers if samplers is not None else DEFAULT_SAMPLERS, steps)
        self.num_samples, self.seed, self.batch_size = num_samples, seed, batch_size
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.feature_extractor, self.inception_weights = feature_extractor, inception_weights
        self.classifier_cache, self.classifier_steps = classifier_cache, classifier_steps
        self.reference_size, self.kid_subsets = reference_size, kid_subsets
        self.log_images, self.grid_size, self.save_dir = log_images, grid_size, save_dir
        self.ema, self.guidance_scale, self.precision = ema, guidance_scale, precision
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1
        self._extractor = None
        self._reference: Tensor | None = None  # (reference_size, d) features, on every rank

    @staticmethod
    def _build(configs: list[dict], steps: int) -> dict[str, Sampler]:
        out: dict[str, Sampler] = {}
        for cfg in configs:
            if not isinstance(cfg, dict) or "name" not in cfg:
                raise ValueError(f"each sampler must be a mapping with a 'name' (e.g. {{name: euler}}), got {cfg!r}")
            cfg = dict(cfg)
            name, label = cfg.pop("name"), cfg.pop("label", None)
            label = label or name
            if label in out:
                raise ValueError(f"two samplers share the label {label!r}; give one a distinct 'label'")
            out[label] = build_sampler(name, **{"steps": steps, **cfg})
        if not out:
            raise ValueError("samplers is empty; list at least one (e.g. [{name: euler}])")
        return out

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        need = [label for label, s in self.samplers.items() if s.needs_draft]
        if need and getattr(pl_module, "draft_model", None) is None:
            raise ValueError(f"samplers {need} need a draft network, but {type(pl_module).__name__} has no "
                             f"draft_model(); use a training-free drafter (drafter: extrapolate or frozen)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
                and trainer.global_step != self._last_step):
            self.evaluate(trainer, pl_module)

    @property
    def state_key(self) -> str:  # two evaluation callbacks with other samplers keep separate states
        return self._generate_state_key(samplers=tuple(self.samplers), every_n_steps=self.every_n_steps,
                                        every_n_epochs=self.every_n_epochs)

    def state_dict(self) -> dict:
        return {"samplers": {label: s.state_dict() for label, s in self.samplers.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        for label, st in state_dict.get("samplers", {}).items():
            if label in self.samplers and st:
                self.samplers[label].load_state_dict(st)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Run every sampler on the evaluation set, log, and return the metrics (the same on every rank)."""
        self._last_step = trainer.global_step
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        model, restore = self._velocity(pl_module)
        shape, num_classes = sample_shape(getattr(pl_module, "net", pl_module)), self._num_classes(pl_module)
        draft = self._draft(pl_module)
        indices = torch.arange(self.num_samples)[rank::world]
        metrics: dict[str, float] = {}
        # Sampling must not move the training's random stream (fastflow/bandits and KID use their own seeds).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            if len(shape) == 3 and self.feature_extractor != "none" and self._extractor is None:
                self._prepare_metrics(trainer, pl_module)
            for label, sampler in self.samplers.items():
                local, stats = sample_indices(model, sampler, indices, shape, self.seed, num_classes,
                                              self.batch_size, device, torch.float32, draft)
                tally = Tally()
                for st, n in zip(stats, indices.split(self.batch_size)):
                    tally.add(st, len(n))
                metrics.update({f"eval/{label}/{k}": v for k, v in self._reduce(trainer, tally, sampler).items()})
                samples = _gather_rows(trainer, local, self.num_samples)
                if self._extractor is not None:
                    metrics.update(self._quality(trainer, label, local))
                if trainer.is_global_zero:
                    self._write(trainer, label, samples)
        restore()
        self.last_metrics = metrics
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            # the learnt schedules (rank 0's bandits: each rank learns from its own batches), logged beside
            learnt = {f"eval/{label}/bandit/{k}": v for label, sampler in self.samplers.items()
                      for k, v in _bandit_schedule(sampler).items()}
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, **learnt}, step=trainer.global_step)
        return metrics

    def _velocity(self, pl_module):
        """The net to sample with (EMA by default, at ``precision``, optionally guided) and a function restoring
        its mode."""
        if hasattr(pl_module, "velocity_model"):
            net = pl_module.ema if self.ema and hasattr(pl_module, "ema") else getattr(pl_module, "net", pl_module)
            was_training = net.training
            model = pl_module.velocity_model(self.ema)
        else:
            net, was_training = pl_module, pl_module.training
            model = pl_module.eval()
        model = autocast(model, self.precision)
        if self.guidance_scale is not None:
            from specflow.lit.guidance import guidance

            model = guidance(model, self.guidance_scale)
        return model, lambda: net.train(was_training)

    def _draft(self, pl_module):
        """The draft network if a sampler needs one, at ``precision`` and guided like the target (as generate())."""
        if not any(s.needs_draft for s in self.samplers.values()):
            return None
        draft = autocast(pl_module.draft_model(), self.precision)
        if self.guidance_scale is not None:
            from specflow.lit.guidance import guide_draft

            draft = guide_draft(draft, self.guidance_scale)
        return draft

    def _num_classes(self, pl_module) -> int | None:
        return getattr(pl_module, "num_classes", None) or getattr(getattr(pl_module, "net", None), "num_classes", None)

    def _reduce(self, trainer, tally: Tally, sampler: Sampler) -> dict[str, float]:
        arms = sorted(int(a) for a in getattr(sampler, "arms", ()))
        vec = tally.to_vector(arms)
        if trainer.world_size > 1:
            vec = trainer.strategy.all_gather(vec.to(trainer.strategy.root_device)).cpu()
        return Tally.from_vectors(vec, arms).summary()

    # ------------------------------------------------------------------------------------------- metrics
    def _prepare_metrics(self, trainer, pl_module) -> None:
        """Build the feature extractor (the classifier on rank 0, broadcast) and the reference features."""
        from specflow.metrics import ClassifierFeatures, InceptionFeatures, classifier_features, extract_features
        from specflow.metrics import inception_weights, reference_images

        dm = trainer.datamodule
        kind = self.feature_extractor
        if kind == "auto":
            kind = "inception" if inception_weights(self.inception_weights) is not None else "classifier"
        if kind == "inception":
            extractor = InceptionFeatures(self.inception_weights)
        else:
            if dm is None:
                raise ValueError("the FID-proxy classifier and the reference images come from the data module: "
                                 "fit with a datamodule, or set feature_extractor: none")
            payload = None
            if trainer.is_global_zero:
                ex = classifier_features(dm, self.classifier_cache, self.classifier_steps, seed=self.seed,
                                         device=pl_module.device)
                payload = (ex.payload(), ex.description)
            payload, description = trainer.strategy.broadcast(payload, src=0)
            extractor = ClassifierFeatures.from_payload(payload)
            extractor.description = description
        self._extractor = extractor.to(pl_module.device)
        rank_zero_info(f"SamplingEvaluation: quality metrics {extractor.fid_name}/{extractor.kid_name} from "
                       f"{extractor.description}")
        ref = reference_images(dm, self.reference_size, self.seed, trainer.global_rank, trainer.world_size)
        local = extract_features(self._extractor, ref)
        self._reference = _gather_rows(trainer, local.to(pl_module.device), self.reference_size).double().cpu()

    def _quality(self, trainer, label: str, local: Tensor) -> dict[str, float]:
        from specflow.metrics import extract_features, fid_from_features, kid_from_features

        feats = _gather_rows(trainer, extract_features(self._extractor, local).to(local.device), self.num_samples)
        feats = feats.double().cpu()
        ex = self._extractor
        kid, kid_std = kid_from_features(self._reference, feats, self.kid_subsets, seed=self.seed)
        return {f"eval/{label}/{ex.fid_name}": fid_from_features(self._reference, feats),
                f"eval/{label}/{ex.kid_name}": kid, f"eval/{label}/{ex.kid_name}_std": kid_std}

    def _write(self, trainer, label: str, samples: Tensor) -> None:
        """Rank 0: the image grid to TensorBoard, and samples/grid files to ``save_dir``."""
        images = samples.ndim == 4 and samples.shape[1] in (1, 3)
        if images and self.log_images:
            from torchvision.utils import make_grid

            x = ((samples[: self.grid_size].float().cpu() + 1) / 2).clamp(0, 1)
            grid = make_grid(x, nrow=max(1, math.ceil(math.sqrt(len(x)))), padding=1)
            for logger in trainer.loggers:
                if hasattr(getattr(logger, "experiment", None), "add_image"):
                    logger.experiment.add_image(f"eval/{label}", grid, trainer.global_step)
        if self.save_dir is not None:
            from specflow.io import save_grid_atomic, save_npz_atomic

            stem = Path(self.save_dir) / f"step{trainer.global_step:07d}_{label}"
            save_npz_atomic(stem.with_suffix(".npz"), samples=samples, indices=torch.arange(len(samples)),
                            seed=self.seed)
            if images:
                save_grid_atomic(samples[: self.grid_size], stem.with_suffix(".png"))


def _bandit_schedule(sampler: Sampler) -> dict[str, float]:
    """Per time bucket: the arm the sampler's bandit prefers now and its mean reward or rate (none: {})."""
    bandit = getattr(sampler, "bandit", None)
    return bandit.schedule() if bandit is not None else {}


def _gather_rows(trainer, local: Tensor, n: int) -> Tensor:
    """Rows r, r + W, r + 2W, … of an n-row set live on rank r: gather them on every rank, in index order."""
    world = trainer.world_size
    if world == 1:
        return local
    m = math.ceil(n / world)
    padded = local.new_zeros((m, *local.shape[1:]))
    padded[: len(local)] = local
    g = trainer.strategy.all_gather(padded)  # (W, m, ...): g[r, j] is index j·W + r
    return g.transpose(0, 1).reshape(m * world, *local.shape[1:])[:n]
