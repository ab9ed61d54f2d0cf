"""specflow.sampling: every sampler, in plain PyTorch (no Lightning), for any ``model(x, t, cond=None)``.

    from specflow.sampling import build_sampler
    res = build_sampler("speculative", steps=100, drafter="extrapolate", window=8).sample(model, noise)
    res.samples, res.stats.as_dict()
"""
from specflow.sampling.base import SAMPLERS, Sampler, build_sampler
from specflow.sampling.stats import SampleResult, SampleStats
from specflow.sampling import solvers  # noqa: F401  (registers euler, heun, ab2, sde)
from specflow.sampling import sfm, skip  # noqa: F401,E402  (registers sfm, rca, fastflow)
from specflow.sampling import speculative  # noqa: F401  (registers speculative)

__all__ = ["SAMPLERS", "Sampler", "SampleResult", "SampleStats", "build_sampler"]
