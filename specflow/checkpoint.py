"""Loading checkpoints for sampling: the target's EMA velocity net, and drafts checked against their target.

    target = specflow.load_target("runs/digits/checkpoints/last.ckpt", device="cpu")   # eval-mode EMA net
    draft = specflow.load_draft("runs/digits_medusa/checkpoints/last.ckpt", target)    # heads or small net

Both read Lightning checkpoints with ``torch.load(weights_only=True)``: a checkpoint holds tensors and
plain hyper-parameters, never pickled code. A draft checkpoint records the *fingerprint* of the target it
was trained against — sha256 over the target's architecture, its net hyper-parameters and its EMA weights
(``target_fingerprint``) — and ``load_draft`` refuses a draft for another target. Every failure (missing,
corrupt or wrong-kind file, bad device string, foreign draft) is a ValueError/FileNotFoundError that says
what was found and what to do, never an unpickling trace.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

DRAFT_KEY = "specflow_draft"  # the entry DraftFlow writes into its checkpoints


@dataclass
class TargetInfo:
    """What ``load_target`` knows about the net it returns (``net.specflow``)."""

    path: str
    fingerprint: str
    arch: str
    net: dict
    global_step: int | None = None
    hparams: dict = field(default_factory=dict)


@dataclass
class DraftInfo:
    """What ``load_draft`` knows about the draft it returns (``draft.specflow``)."""

    path: str
    drafter: str  # "model" (a small velocity net) or "medusa" (heads on the target's features)
    target_fingerprint: str
    hparams: dict = field(default_factory=dict)


def parse_device(device: str | torch.device) -> torch.device:
    """A usable torch.device from a string, or a ValueError naming the bad value and what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"bad device {device!r} ({e}); use 'cpu', 'cuda', 'cuda:0', … or 'mps'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {device!r} asked for CUDA, but no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: specflow samples on 'cpu', 'cuda[:i]' or 'mps'")
    return dev


def fingerprint(arch: str, net_kwargs: dict, state_dict: dict) -> str:
    """sha256 (first 16 hex digits) of the architecture, its hyper-parameters and the weights, bit for bit."""
    h = hashlib.sha256(json.dumps({"arch": arch, "net": net_kwargs}, sort_keys=True, default=list).encode())
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        v = v.reshape(-1)
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, with clear errors for missing/corrupt/unsafe files."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist; check the path (train one with train.py / "
                                f"train_draft.py: checkpoints land in runs/<name>/checkpoints/last.ckpt)")
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} is a directory, not a checkpoint file; pass e.g. {str(p / 'last.ckpt')!r}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (zip errors, unpickling errors, EOF: all mean "not a usable file")
        text = str(e)
        msg = (text.split("WeightsUnpickler error:")[-1].strip().splitlines() or [type(e).__name__])[0][:200]
        if "Unsupported global" in text:  # a real pickled object, refused on purpose
            raise ValueError(f"{what} {str(p)!r} contains pickled Python objects, which safe loading refuses "
                             f"(specflow checkpoints hold only tensors and plain hyper-parameters). Use a "
                             f"checkpoint written by train.py/train_draft.py ({type(e).__name__}: {msg})") from None
        raise ValueError(f"{what} {str(p)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {msg}); the "
                         f"file is corrupt or truncated (an interrupted copy or save?): re-copy or re-train") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{what} {str(p)!r} is not a Lightning checkpoint (no 'state_dict'); pass the .ckpt "
                         f"written by train.py or train_draft.py")
    return ckpt


def checkpoint_kind(ckpt: dict) -> str:
    """"draft", "target" or "unknown"."""
    if isinstance(ckpt.get(DRAFT_KEY), dict):
        return "draft"
    hp = ckpt.get("hyper_parameters") or {}
    if "arch" in hp and any(k.startswith("ema.") for k in ckpt["state_dict"]):
        return "target"
    return "unknown"


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_target(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The EMA velocity net of a ``TargetFlow`` checkpoint, in eval mode, frozen, on ``device``.

    ``net(x, t, cond=None) -> v``; ``net.specflow`` is a ``TargetInfo`` (path, fingerprint, arch, net kwargs).
    """
    dev = parse_device(device)
    ckpt = read_checkpoint(path, "target checkpoint")
    kind = checkpoint_kind(ckpt)
    if kind == "draft":
        raise ValueError(f"{str(path)!r} is a DRAFT checkpoint (drafter {ckpt[DRAFT_KEY].get('drafter')!r}), not a "
                         f"target: pass the target's checkpoint first and this one as the draft "
                         f"(sample.py TARGET --draft {path}; specflow.load_draft(path, target))")
    if kind != "target":
        raise ValueError(f"{str(path)!r} is not a specflow target checkpoint (expected TargetFlow hyper-parameters "
                         f"with 'arch' and EMA weights 'ema.*'); train one with python train.py fit --config ...")
    from specflow.nets import build_net

    hp = ckpt["hyper_parameters"]
    arch, net_kwargs = hp["arch"], dict(hp.get("net") or {})
    state = _prefixed(ckpt["state_dict"], "ema.")
    net = build_net(arch, **net_kwargs)
    net.load_state_dict(state)
    net.specflow = TargetInfo(str(path), fingerprint(arch, net_kwargs, state), arch, net_kwargs,
                              ckpt.get("global_step"), {k: v for k, v in hp.items() if not k.startswith("_")})
    return net.requires_grad_(False).eval().to(dev)


def target_fingerprint(target: nn.Module) -> str:
    """The fingerprint of a net returned by ``load_target`` (its checkpoint's, computed at load time)."""
    info = getattr(target, "specflow", None)
    if not isinstance(info, TargetInfo):
        raise ValueError(f"cannot fingerprint a {type(target).__name__} that was not loaded with "
                         f"specflow.load_target(path): load the target from its checkpoint so the draft can be checked")
    return info.fingerprint


def load_draft(path: str | os.PathLike, target: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """The draft of a ``DraftFlow``/``MedusaFlow`` checkpoint for ``target`` (from ``load_target``), in eval mode.

    Returns the small velocity net (drafter "model") or the ``MedusaHeads`` (drafter "medusa"), on the
    target's device unless ``device`` is given; ``draft.specflow`` is a ``DraftInfo``. A draft trained
    against another target is a ValueError naming both fingerprints.
    """
    fp = target_fingerprint(target)
    dev = parse_device(device) if device is not None else next(target.parameters()).device
    ckpt = read_checkpoint(path, "draft checkpoint")
    kind = checkpoint_kind(ckpt)
    if kind == "target":
        raise ValueError(f"{str(path)!r} is a TARGET checkpoint (TargetFlow), not a draft: train a draft against "
                         f"it with python train_draft.py fit --config configs/digits_medusa.yaml "
                         f"--model.target_ckpt {path}, and pass that draft's checkpoint")
    if kind != "draft":
        raise ValueError(f"{str(path)!r} is not a specflow draft checkpoint (no {DRAFT_KEY!r} entry); pass a "
                         f"checkpoint written by train_draft.py")
    meta = ckpt[DRAFT_KEY]
    if meta["target_fingerprint"] != fp:
        raise ValueError(f"draft {str(path)!r} was trained for the target with fingerprint "
                         f"{meta['target_fingerprint']} ({meta.get('target_path')}), but the target given has "
                         f"fingerprint {fp} ({target.specflow.path}). Load the target it was trained for, or train "
                         f"a draft for this one: python train_draft.py fit --config <draft config> "
                         f"--model.target_ckpt {target.specflow.path}")
    draft = build_draft(meta["drafter"], meta["build"])
    draft.load_state_dict(_prefixed(ckpt["state_dict"], "draft."))
    hp = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    draft.specflow = DraftInfo(str(path), meta["drafter"], fp, hp)
    return draft.requires_grad_(False).eval().to(dev)


def build_draft(drafter: str, build: dict) -> nn.Module:
    """The draft module from the plain arguments a draft checkpoint stores (``build``)."""
    if drafter == "model":
        from specflow.nets import build_net

        return build_net(build["arch"], **build["net"])
    if drafter == "medusa":
        from specflow.nets.heads import MedusaHeads

        return MedusaHeads(**build)
    raise ValueError(f"unknown draft kind {drafter!r} in checkpoint; valid: 'model', 'medusa'")
