"""Generate n samples from a target (optionally with a draft) in batches, reproducibly per sample.

    samples, labels, stats = generate(target, build_sampler("speculative", steps=100), n=64, batch_size=32,
                                      seed=0, labels="cycle", guidance=None, draft=None, device="cpu")

Sample i's initial noise and all of its sampler noise come from its own generator
``per_sample_generators(seed, [i])`` (noise first, then the sampler continues the same stream — on a GPU
through a generator there seeded from it, see ``noise.NoiseTable``), so sample i is the same whatever the
batch size or the batch it lands in. Used by sample.py and the evaluation callback.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from specflow.precision import autocast, check_precision
from specflow.sampling.base import Sampler
from specflow.sampling.noise import per_sample_generators, randn
from specflow.sampling.stats import SampleStats
from specflow.tally import Tally


@dataclass
class Generated:
    samples: Tensor  # (n, ...) float32 on the CPU
    labels: Tensor | None  # (n,) long class labels, or None (unconditional)
    stats: SampleStats  # the batches combined: Tally.stats()


def sample_shape(net) -> tuple[int, ...]:
    """The shape of one sample for a specflow net: (C, H, W) for UNet/DiT, (dim,) for the MLP."""
    C, S = getattr(net, "in_channels", None), getattr(net, "image_size", None)
    if C is None:
        raise ValueError(f"cannot tell the sample shape of a {type(net).__name__}: it has no in_channels "
                         f"(use a specflow.nets model, e.g. from specflow.load_target)")
    return (C,) if S is None else (C, S, S)


def resolve_labels(labels, n: int, num_classes: int | None, seed: int) -> Tensor | None:
    """Class labels per sample: None (unconditional or the null class), "random" (uniform, from ``seed``),
    "cycle" (0, 1, …, K−1, 0, …), an int (all the same) or a list/tensor cycled to length n."""
    if labels is None:
        return None
    if num_classes is None:
        raise ValueError(f"labels={labels!r} given, but the target is unconditional (num_classes is None); "
                         f"drop --labels")
    if isinstance(labels, str):
        if labels == "random":
            return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed + 7919))
        if labels == "cycle":
            return torch.arange(n) % num_classes
        raise ValueError(f"labels must be 'random', 'cycle', an int or a list of ints; got {labels!r}")
    lab = torch.as_tensor([labels] if isinstance(labels, int) else labels, dtype=torch.long).flatten()
    if lab.numel() == 0 or lab.min() < 0 or lab.max() >= num_classes:
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}]; got {lab.tolist()}")
    return lab.repeat(math.ceil(n / lab.numel()))[:n]


def sample_chunks(model, sampler: Sampler, indices, shape: tuple[int, ...], seed: int, labels: Tensor | None = None,
                  batch_size: int = 256, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  draft=None, start=None):
    """Yield one ``SampleResult`` per chunk of ``batch_size`` sample indices.

    Row i starts from noise drawn from ``per_sample_generators(seed, [indices[i]])`` (on the CPU, so the noise is
    the same on every device) and the sampler keeps drawing from that stream (on another device, from a generator
    there seeded by it: the sampler noise, hence the samples, differ between CPU and GPU), placed on the path by
    ``start`` if given (an adapted model's ``.start``); ``labels`` (aligned with ``indices``, or None) are the
    class labels. So a sample is the same alone, in any batch, or on any rank —
    for every sampler whose per-sample work does not depend on its batch neighbours (euler, heun, sde,
    speculative with a fixed window, sfm with a fixed leap); samplers with a bandit learn from the whole batch.
    """
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    like = torch.empty(0, device=device, dtype=dtype)
    for lo in range(0, len(indices), batch_size):
        chunk = indices[lo:lo + batch_size]
        gens = per_sample_generators(seed, chunk)
        noise = randn((len(chunk), *shape), gens, like)
        noise = noise if start is None else start(noise)
        cond = labels[lo:lo + batch_size].to(device) if labels is not None else None
        yield sampler.sample(model, noise, cond=cond, draft=draft, generator=gens)


def sample_indices(model, sampler: Sampler, indices, shape: tuple[int, ...], seed: int,
                   num_classes: int | None = None, batch_size: int = 256, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, draft=None) -> tuple[Tensor, list[SampleStats]]:
    """Samples (len(indices), *shape) on ``device`` for the given sample indices (``sample_chunks``), with label
    ``indices[i] % num_classes`` when the model is class-conditional; and the stats of each chunk."""
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    labels = indices % num_classes if num_classes else None
    out, stats = [], []
    for res in sample_chunks(model, sampler, indices, shape, seed, labels, batch_size, device, dtype, draft):
        out.append(res.samples)
        stats.append(res.stats)
    samples = torch.cat(out) if out else torch.empty((0, *shape), device=device, dtype=dtype)
    return samples, stats


def generate(target, sampler: Sampler, n: int, batch_size: int, seed: int = 0, labels=None,
             guidance: float | None = None, draft=None, device: str | torch.device = "cpu",
             precision: str = "32") -> Generated:
    """n samples of ``target`` (a specflow net) with ``sampler``, ``batch_size`` at a time, on ``device``.

    ``guidance``: classifier-free guidance scale (None: the plain model; needs labels and a conditional net).
    ``precision``: "32", or "bf16" / "16" to run the networks (target and draft) under autocast while the
    sampler stays in float32 (``specflow.precision``).
    """
    outs, labs, tally = [], [], Tally()
    for _, g in generate_batches(target, sampler, n, batch_size, seed, labels, guidance, draft, device, precision):
        outs.append(g.samples)
        labs.append(g.labels)
        tally.add(g.stats, g.samples.shape[0])
    return Generated(torch.cat(outs), None if labs[0] is None else torch.cat(labs), tally.stats())


def generate_batches(target, sampler: Sampler, n: int, batch_size: int, seed: int = 0, labels=None,
                     guidance: float | None = None, draft=None, device: str | torch.device = "cpu",
                     precision: str = "32", batches=None) -> Iterator[tuple[int, Generated]]:
    """``generate()`` one batch at a time: yields ``(b, Generated)`` for batch b = samples b·batch_size … of the
    n, for the batch indices in ``batches`` (default: all, in order) — each batch exactly as ``generate()``
    makes it, so a run can be split into parts (sample.py: resumable, shared by processes). The arguments
    are checked here, before the first batch is asked for.
    """
    from specflow.checkpoint import parse_device  # late: keeps this module free of Lightning at import

    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"the number of samples must be a positive integer, got {n!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be built with specflow.sampling.build_sampler, got {type(sampler).__name__}")
    count = math.ceil(n / batch_size)
    batches = range(count) if batches is None else [int(b) for b in batches]
    if any(not 0 <= b < count for b in batches):
        raise ValueError(f"batch indices must lie in [0, {count - 1}] for n={n}, batch_size={batch_size}; "
                         f"got {sorted(set(batches))}")
    dev = parse_device(device)
    check_precision(precision, dev)
    target = target.to(dev).eval()
    if draft is not None:
        draft = draft.to(dev).eval()
    if sampler.needs_draft and draft is None:
        raise ValueError(f"sampler {sampler.name!r} with drafter {getattr(sampler, 'drafter', None)!r} needs a draft: "
                         f"pass draft= (specflow.load_draft / sample.py --draft)")
    shape = sample_shape(target)
    start, to_data = getattr(target, "start", None), getattr(target, "to_data", lambda x: x)  # adapted models
    if start is not None and sampler.grid is None:
        raise ValueError(f"{type(target).__name__} is a model adapted from {target.library}: build the sampler on "
                         f"its own schedule, build_sampler(..., grid=model.grid(steps))")
    lab = resolve_labels(labels, n, getattr(target, "num_classes", None), seed)
    model = autocast(target, precision)
    draft = None if draft is None else autocast(draft, precision)
    if guidance is not None:
        from specflow.lit.guidance import guidance as guided, guide_draft

        if lab is None:
            raise ValueError(f"guidance={guidance} needs class labels (labels='random', 'cycle' or a list)")
        model = guided(model, guidance)
        draft = None if draft is None else guide_draft(draft, guidance)  # it drafts the guided velocity

    def run():
        for b in batches:
            idx = range(b * batch_size, min(n, (b + 1) * batch_size))
            part_labels = None if lab is None else lab[idx.start:idx.stop]
            res = next(sample_chunks(model, sampler, idx, shape, seed, part_labels, batch_size, dev, draft=draft,
                                     start=start))
            # collected on the CPU: n may exceed what the device holds
            yield b, Generated(to_data(res.samples).float().cpu(), part_labels, res.stats)
    return run()
