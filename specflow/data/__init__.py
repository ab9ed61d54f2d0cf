"""Data: image DataModules (digits, CIFAR-10, ImageFolder) and the analytic Gaussian mixture for tests/benchmarks."""
from specflow.data.images import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from specflow.data.toy import GaussianMixture, ToyMixtureDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "GaussianMixture", "ImageFolderDataModule", "ToyMixtureDataModule"]
