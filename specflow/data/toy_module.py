"""The Lightning DataModule of the analytic Gaussian mixture (``specflow.data.toy.ToyMixtureDataModule``)."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from specflow.data.toy import GaussianMixture


class ToyMixtureDataModule(pl.LightningDataModule):
    """A fixed data set drawn from ``GaussianMixture.default(dim, components)``; ``.mixture`` gives its exact velocity.

    Batches are ``(x, y)`` with x: (D,) float32 vectors and y the (long) component each point was drawn from
    (for diagnostics only: ``num_classes`` is None, so nets treat the data as unconditional). The training
    set has ``num_samples`` points, the validation set an independent ``num_samples // 10``, both drawn from
    ``seed`` so every run sees the same data.
    """

    def __init__(self, dim: int = 2, components: int = 8, num_samples: int = 20000, batch_size: int = 256,
                 seed: int = 0):
        super().__init__()
        if dim < 1 or components < 1 or num_samples < 10 or batch_size < 1:
            raise ValueError(f"need dim ≥ 1, components ≥ 1, num_samples ≥ 10, batch_size ≥ 1; got dim={dim}, "
                             f"components={components}, num_samples={num_samples}, batch_size={batch_size}")
        self.mixture = GaussianMixture.default(dim=dim, components=components, seed=seed)
        self.image_size, self.in_channels, self.num_classes = None, dim, None
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.train_set: TensorDataset | None = None

    def draw(self, n: int, generator: torch.Generator) -> TensorDataset:
        """n points with their component index (the same law as ``GaussianMixture.sample``)."""
        m = self.mixture
        idx = torch.multinomial(m.weights, n, replacement=True, generator=generator)
        x = m.means[idx] + m.stds[idx, None] * torch.randn(n, m.dim, generator=generator, dtype=torch.float64)
        return TensorDataset(x.float(), idx)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            g = torch.Generator().manual_seed(self.seed)
            self.train_set, self.val_set = self.draw(self.num_samples, g), self.draw(self.num_samples // 10, g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
