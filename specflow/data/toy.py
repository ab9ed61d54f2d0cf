"""An analytic Gaussian mixture: data whose exact flow-matching velocity is known in closed form.

Component i: x1 ~ N(μ_i, s_i²·I) with weight w_i; x0 ~ N(0, I); x_t = t·x1 + (1 − t)·x0. Given component i,
x_t ~ N(t·μ_i, var_i(t)·I) with var_i(t) = t²·s_i² + (1 − t)², and

    E[x1 − x0 | x_t, i] = μ_i + (t·s_i² − (1 − t)) / var_i(t) · (x_t − t·μ_i),

so the marginal velocity is the posterior-weighted sum over components. Used by tests and benchmarks as a
"perfect target" whose sampler error is pure discretisation error.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianMixture:
    """A mixture in ``dim`` dimensions; ``velocity(x, t)`` is the exact marginal velocity field."""

    def __init__(self, means: Tensor, stds: Tensor | float = 0.1, weights: Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @classmethod
    def default(cls, dim: int = 2, components: int = 8, radius: float = 2.0, std: float = 0.15, seed: int = 0):
        """Components on a circle (dim = 2) or at random points on a sphere of ``radius`` (dim > 2)."""
        if dim == 2:
            a = torch.arange(components, dtype=torch.float64) * 2 * math.pi / components
            means = radius * torch.stack([a.cos(), a.sin()], 1)
        else:
            g = torch.Generator().manual_seed(seed)
            m = torch.randn(components, dim, generator=g, dtype=torch.float64)
            means = radius * m / m.norm(dim=1, keepdim=True)
        w = torch.linspace(1.0, 2.0, components, dtype=torch.float64)  # unequal weights catch mode bias
        return cls(means, std, w)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[idx] + self.stds[idx, None] * eps

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Exact E[x1 − x0 | x_t = x]; x: (B, D) or (B, C, H, W) flattened to D; t: (B,) or scalar."""
        shape, dtype = x.shape, x.dtype
        x = x.reshape(shape[0], -1).to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(shape[0]).reshape(-1, 1, 1)
        mu, s2 = self.means.to(x.device)[None], (self.stds.to(x.device) ** 2)[None, :, None]  # (1,K,D), (1,K,1)
        var = t**2 * s2 + (1 - t) ** 2  # (B,K,1)
        diff = x[:, None] - t * mu  # (B,K,D)
        logp = (-0.5 * (diff**2).sum(-1, keepdim=True) / var - 0.5 * self.dim * var.log()
                + self.weights.to(x.device).log()[None, :, None])
        r = torch.softmax(logp, dim=1)  # posterior over components
        v = ((mu + (t * s2 - (1 - t)) / var * diff) * r).sum(1)
        return v.to(dtype).reshape(shape)

    __call__ = velocity


def __getattr__(name):
    # The DataModule needs Lightning; the analytic mixture above must not (samplers and benchmarks use it).
    if name == "ToyMixtureDataModule":
        from specflow.data.toy_module import ToyMixtureDataModule

        return ToyMixtureDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
