"""Image quality: FID/KID through torchmetrics with a pluggable feature extractor.

Every extractor takes images in the data space, [−1, 1] shaped (B, C, H, W), and returns features (B, d):

- ``InceptionFeatures``: the standard FID Inception-v3 (torch-fidelity's port, loaded by torchmetrics). Used
  only when torch-fidelity is installed **and** its weights file is already on disk — nothing here ever
  downloads. Its numbers are called ``fid``/``kid``.
- ``ClassifierFeatures``: the penultimate layer of a small CNN trained on the same data module (seconds on a
  CPU; ≥ 95 % validation accuracy on the digits). Its numbers are called ``fid_proxy``/``kid_proxy``
  everywhere — in logs, metric keys and printed tables — because they are *not* comparable with published
  FIDs: they rank samplers of one model against one reference set, nothing more.

FID (Fréchet distance between Gaussians fitted to the two feature sets):

    FID = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)

KID is the unbiased squared MMD with the cubic kernel k(a, b) = (aᵀb / d + 1)³ on random subsets. Features
are extracted once, and the torchmetrics metrics consume them through an identity module, so FID, KID and
the bootstrap below share one feature pass. FID is biased upward at small n; compare samplers only at the
same number of samples against the same reference set (``bootstrap_fid_difference`` does exactly that).
"""
from __future__ import annotations

import importlib.util
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ExtractorKind = Literal["auto", "inception", "classifier"]
# torch-fidelity fetches this file with torch.hub.load_state_dict_from_url into <hub dir>/checkpoints/.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ------------------------------------------------------------------------------------------- extractors
class FeatureExtractor(nn.Module):
    """Images in [−1, 1], (B, C, H, W) → features (B, num_features). ``fid_name``/``kid_name`` are the names
    its metrics are logged under ("fid" only for the real Inception network)."""

    num_features: int
    fid_name: str
    kid_name: str
    description: str


def inception_weights(path: str | Path | None = None) -> Path | None:
    """The local Inception weights file, or None when FID-Inception is unavailable offline.

    Available means: torch-fidelity is importable, and ``path`` (if given) or torch-fidelity's hub cache
    file ``<torch.hub.get_dir()>/checkpoints/{INCEPTION_FILE}`` exists. Never touches the network.
    """
    if importlib.util.find_spec("torch_fidelity") is None:
        return None
    candidate = Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return candidate if candidate.is_file() else None


class InceptionFeatures(FeatureExtractor):
    """torchmetrics' FID Inception-v3 (pool3, 2048-d) on images in [−1, 1]; grey images are repeated to RGB."""

    fid_name, kid_name = "fid", "kid"

    def __init__(self, weights: str | Path | None = None, feature: int = 2048):
        super().__init__()
        path = inception_weights(weights)
        if path is None:
            where = weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
            raise FileNotFoundError(
                f"FID-Inception needs torch-fidelity installed and its weights at {where} (no download is "
                f"attempted); install torch-fidelity and place {INCEPTION_FILE} there, or use the offline "
                f"extractor (feature_extractor: classifier, reported as fid_proxy)")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                      feature_extractor_weights_path=str(path))
        self.num_features = feature
        self.description = f"Inception-v3 pool features ({feature}-d, {path.name})"

    def forward(self, x: Tensor) -> Tensor:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # the network's uint8 input
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x).reshape(x.shape[0], -1)


class FeatureCNN(nn.Module):
    """A small classifier for FID-proxy features:

        conv3×3(C→w) → GELU → conv3×3(w→2w, stride 2) → GELU → conv3×3(2w→2w) → GELU → mean-pool
        → Linear(2w→d) → GELU  = features (B, d)   → Linear(d→classes) = logits
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, num_features: int = 64):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, num_features=num_features)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU())
        self.embed = nn.Linear(2 * w, num_features)
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.gelu(self.embed(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features of a trained ``FeatureCNN``; its metrics are named ``fid_proxy``/``kid_proxy``."""

    fid_name, kid_name = "fid_proxy", "kid_proxy"

    def __init__(self, cnn: FeatureCNN, val_accuracy: float = math.nan, note: str = ""):
        super().__init__()
        self.cnn = cnn.eval().requires_grad_(False)
        self.num_features = cnn.config["num_features"]
        self.val_accuracy = float(val_accuracy)
        self.description = (f"FID-proxy: penultimate features ({self.num_features}-d) of a small CNN classifier "
                            f"trained on the data module (val acc {self.val_accuracy:.3f}){note}")

    def forward(self, x: Tensor) -> Tensor:
        return self.cnn.features(x.to(next(self.cnn.parameters()).dtype))

    def train(self, mode: bool = True):  # a frozen embedding: never leaves eval mode
        return super().train(False)

    def payload(self) -> dict:
        """Plain types and tensors (loads with ``weights_only=True``)."""
        return {"config": dict(self.cnn.config), "state_dict": {k: v.detach().cpu() for k, v in self.cnn.state_dict().items()},
                "val_accuracy": self.val_accuracy}

    @classmethod
    def from_payload(cls, payload: dict, note: str = "") -> "ClassifierFeatures":
        cnn = FeatureCNN(**payload["config"])
        cnn.load_state_dict(payload["state_dict"])
        return cls(cnn, payload["val_accuracy"], note)


@dataclass
class ClassifierReport:
    steps: int
    seconds: float
    train_accuracy: float
    val_accuracy: float


def _labelled(batch) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("the FID-proxy classifier needs a labelled image data module yielding (x, y) batches; "
                         "use feature_extractor: inception or none for unlabelled data")
    return batch[0], batch[1]


@torch.no_grad()
def _accuracy(cnn: nn.Module, loader, device) -> float:
    right = total = 0
    for batch in loader:
        x, y = (b.to(device) for b in _labelled(batch))
        right += int((cnn(x).argmax(1) == y).sum())
        total += len(y)
    return right / total if total else math.nan


def train_classifier(datamodule, steps: int = 600, max_seconds: float = 60.0, lr: float = 3e-3, seed: int = 0,
                     width: int = 32, num_features: int = 64, device: str | torch.device = "cpu"
                     ) -> tuple[FeatureCNN, ClassifierReport]:
    """Train a ``FeatureCNN`` on ``datamodule``'s train loader for ``steps`` AdamW steps (one-cycle lr).

    A fixed step count (not a time budget) keeps the features, hence the FID-proxy, reproducible;
    ``max_seconds`` is only a safety cap (the report says where training stopped). The global RNG is forked,
    so training the extractor never changes the caller's random stream. On the CPU it runs on one thread:
    the net is so small that more threads only add synchronisation (10× slower on a busy machine).
    """
    if getattr(datamodule, "num_classes", None) is None or getattr(datamodule, "image_size", None) is None:
        raise ValueError(f"the FID-proxy classifier needs a labelled image data module (image_size and "
                         f"num_classes set); {type(datamodule).__name__} has num_classes="
                         f"{getattr(datamodule, 'num_classes', None)}")
    if steps < 1:
        raise ValueError(f"classifier steps must be ≥ 1, got {steps}")
    datamodule.setup("fit")
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():  # callers may sit under no_grad
            torch.manual_seed(seed)
            cnn = FeatureCNN(datamodule.in_channels, datamodule.num_classes, width, num_features).to(device)
            opt = torch.optim.AdamW(cnn.parameters(), lr=lr, weight_decay=1e-4)
            # one-cycle needs ≥ 2 warm-up steps (0.1·steps − 1 > 0), else it divides by zero: a constant lr below that
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1) \
                if steps >= 20 else None
            t0, step, right, seen = time.perf_counter(), 0, 0, 0
            while step < steps and time.perf_counter() - t0 < max_seconds:
                for batch in datamodule.train_dataloader():
                    x, y = (b.to(device) for b in _labelled(batch))
                    logits = cnn(x)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    step += 1
                    if step > steps * 3 // 4:  # training accuracy over the last quarter
                        right, seen = right + int((logits.argmax(1) == y).sum()), seen + len(y)
                    if step >= steps or time.perf_counter() - t0 >= max_seconds:
                        break
            seconds = time.perf_counter() - t0
            cnn.eval()
            val = datamodule.val_dataloader()
            val_acc = _accuracy(cnn, val, device) if val else math.nan
    finally:
        torch.set_num_threads(threads)
    return cnn, ClassifierReport(step, seconds, right / seen if seen else math.nan, val_acc)


def classifier_features(datamodule, cache: str | Path | None = None, steps: int = 600, max_seconds: float = 60.0,
                        seed: int = 0, device: str | torch.device = "cpu") -> ClassifierFeatures:
    """The offline extractor for ``datamodule``: loaded from ``cache`` when that file exists (and matches the
    data's channels and classes), else trained with ``train_classifier`` and, if ``cache`` is given, saved
    there atomically."""
    from specflow.io import atomic_write

    want = dict(in_channels=getattr(datamodule, "in_channels", None), num_classes=getattr(datamodule, "num_classes", None))
    if cache is not None and Path(cache).is_file():
        try:
            payload = torch.load(cache, map_location="cpu", weights_only=True)
            have = {k: payload["config"].get(k) for k in want}
        except Exception as e:
            raise ValueError(f"{cache} is not a FID-proxy classifier file ({type(e).__name__}); delete it or point "
                             f"the classifier cache elsewhere") from None
        if have != want:
            raise ValueError(f"the cached FID-proxy classifier {cache} was trained on data with {have}, but this "
                             f"data module has {want}; delete the file or point classifier_cache elsewhere")
        budget = payload.get("budget")  # older files did not record it
        if budget is not None and budget.get("steps") != steps:
            raise ValueError(f"the cached FID-proxy classifier {cache} was trained for {budget.get('steps')} steps, "
                             f"but steps={steps} were asked: features (hence FID-proxy values) of another "
                             f"classifier are not comparable; ask for the same budget, delete the file, or point "
                             f"classifier_cache elsewhere")
        return ClassifierFeatures.from_payload(payload, note=f", loaded from {cache}").to(device)
    cnn, rep = train_classifier(datamodule, steps=steps, max_seconds=max_seconds, seed=seed, device=device)
    note = f", {rep.steps} steps in {rep.seconds:.1f}s"
    extractor = ClassifierFeatures(cnn, rep.val_accuracy, note).to(device)
    if cache is not None:
        payload = {**extractor.payload(), "budget": {"steps": steps}}
        atomic_write(cache, ".pt", lambda tmp: torch.save(payload, tmp))
    return extractor


def build_feature_extractor(kind: ExtractorKind = "auto", datamodule=None, inception: str | Path | None = None,
                            cache: str | Path | None = None, steps: int = 600, max_seconds: float = 60.0,
                            seed: int = 0, device: str | torch.device = "cpu") -> FeatureExtractor:
    """"inception" (error if its weights are not on disk), "classifier" (FID-proxy), or "auto": Inception when
    available offline, else the classifier."""
    if kind not in ("auto", "inception", "classifier"):
        raise ValueError(f"feature extractor must be 'auto', 'inception' or 'classifier', got {kind!r}")
    if kind == "inception" or (kind == "auto" and inception_weights(inception) is not None):
        return InceptionFeatures(inception).to(device)
    if datamodule is None:
        raise ValueError("the offline FID-proxy extractor is trained on the data: pass datamodule=..., or make "
                         "the Inception weights available (see specflow.metrics.inception_weights)")
    return classifier_features(datamodule, cache, steps, max_seconds, seed, device)


def reference_dataset(datamodule):
    """The training images as FID's reference: ``datamodule.reference_set()`` (no augmentation) where the data
    module defines it, else its training loader's dataset."""
    return datamodule.reference_set() if hasattr(datamodule, "reference_set") else datamodule.train_dataloader().dataset


def reference_images(datamodule, n: int, seed: int = 0, rank: int = 0, world: int = 1,
                     num_workers: int = 0, dataset=None) -> Tensor:
    """This rank's share (r, r + W, …) of n images (x of each item) of ``reference_dataset`` (or ``dataset``, that
    one already built: a large folder takes a while to scan), in [−1, 1]: a fixed subset chosen by ``seed``,
    loaded under a seeded, forked random stream (any random transform of a data module without
    ``reference_set`` repeats; the caller's stream does not move)."""
    from torch.utils.data import DataLoader, Subset

    ds = reference_dataset(datamodule) if dataset is None else dataset
    if len(ds) < n:
        raise ValueError(f"{n} reference images asked for, but the training set has only {len(ds)}; ask for fewer")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n][rank::world]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loader = DataLoader(Subset(ds, idx.tolist()), batch_size=256, num_workers=num_workers)
        x = [b[0] if isinstance(b, (tuple, list)) else b for b in loader]
    return torch.cat(x).float() if x else torch.zeros(0)


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Features (N, d) in float64 on the CPU, of images in [−1, 1] (clamped: samples may overshoot)."""
    device = next(extractor.parameters()).device
    out = [extractor(images[i:i + batch_size].to(device).clamp(-1, 1)).double().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else images.new_zeros((0, getattr(extractor, "num_features", 0)), dtype=torch.float64)


# ------------------------------------------------------------------------------------------- distances
class _Given(nn.Module):
    """Identity 'extractor': lets torchmetrics' FID/KID consume features computed once elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, f: Tensor) -> Tensor:
        return f


def _check(real: Tensor, fake: Tensor) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, d) with the same d, got real {tuple(real.shape)}, fake {tuple(fake.shape)}")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(real)} real and {len(fake)} generated")


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (torchmetrics, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check(real, fake)
    m = FrechetInceptionDistance(feature=_Given(real.shape[1]), sync_on_compute=False)
    m.update(real.double().cpu(), real=True)
    m.update(fake.double().cpu(), real=False)
    return float(m.compute())


def kid_from_features(real: Tensor, fake: Tensor, subsets: int = 50, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``min(subset_size, n // 2)`` rows of each set; half
    the rows at most, so the subsets differ and the std means something), seeded: the global RNG is forked
    so the caller's random stream is untouched."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check(real, fake)
    size = max(2, min(subset_size, len(real) // 2, len(fake) // 2))
    with warnings.catch_warnings():  # "will save all extracted features": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        m = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size,
                                    sync_on_compute=False)
    m.update(real.double().cpu(), real=True)
    m.update(fake.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


@dataclass
class Interval:
    """A point estimate with a bias-corrected percentile-bootstrap interval at ``level``."""

    value: float
    low: float
    high: float
    level: float
    n_boot: int
    bias: float  # mean(bootstrap) − value, already subtracted from low/high

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _bootstrap(stat, sizes: tuple[int, ...], n_boot: int, level: float, seed: int, value: float) -> Interval:
    """Percentile interval of ``stat`` over resamples (with replacement) of each index set, shifted by the
    bootstrap bias. The shift matters for FID: a resample repeats rows, which shrinks the fitted covariance
    and inflates every resampled FID, so the raw percentile interval can miss the estimate altogether."""
    if not 0 < level < 1 or n_boot < 10:
        raise ValueError(f"need 0 < level < 1 and n_boot ≥ 10, got level={level}, n_boot={n_boot}")
    g = torch.Generator().manual_seed(seed)
    draws = torch.tensor([stat(*(torch.randint(n, (n,), generator=g) for n in sizes)) for _ in range(n_boot)],
                         dtype=torch.float64)
    bias = float(draws.mean()) - value
    lo, hi = torch.quantile(draws, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=draws.dtype)).tolist()
    return Interval(value, lo - bias, hi - bias, level, n_boot, bias)


def bootstrap_fid(real: Tensor, fake: Tensor, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> Interval:
    """FID of ``fake`` against ``real`` features, with a percentile interval from resampling both sets."""
    _check(real, fake)
    iv = _bootstrap(lambda i, j: fid_from_features(real[i], fake[j]), (len(real), len(fake)), n_boot, level, seed,
                    fid_from_features(real, fake))
    iv.low = max(iv.low, 0.0)  # a distance: the bias shift must not push the interval below zero
    return iv


def bootstrap_fid_difference(real: Tensor, a: Tensor, b: Tensor, n_boot: int = 200, level: float = 0.95,
                             seed: int = 0) -> Interval:
    """FID(a) − FID(b) with a paired bootstrap: a and b are resampled with the *same* indices (row i of both
    came from the same noise seed) and share each resampled reference set. An interval containing 0 means
    "equal within noise"."""
    _check(real, a)
    _check(real, b)
    if len(a) != len(b):
        raise ValueError(f"paired sets must have the same size (same sample indices), got {len(a)} and {len(b)}")
    diff = lambda i, j: fid_from_features(real[i], a[j]) - fid_from_features(real[i], b[j])
    return _bootstrap(diff, (len(real), len(a)), n_boot, level, seed,
                      fid_from_features(real, a) - fid_from_features(real, b))
