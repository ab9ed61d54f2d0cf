"""The training command line: ``python train.py fit --config configs/digits.yaml``.

A thin LightningCLI around TargetFlow and any LightningDataModule (``data.class_path`` picks it), so every
YAML key is type-checked against the modules' ``__init__`` signatures and an unknown key is an error.
"""
from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from specflow.lit.target import TargetFlow


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them; no effect on CPU
    return LightningCLI(TargetFlow, LightningDataModule, subclass_mode_data=True,
                        save_config_kwargs={"overwrite": True}, args=args, run=run)


def draft_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """``python train_draft.py fit --config configs/digits_medusa.yaml``: a draft (``specflow.lit.draft.DraftFlow``
    or ``MedusaFlow``, picked by ``model.class_path``) trained against the frozen target at ``model.target_ckpt``."""
    from specflow.lit.draft import DraftModule

    torch.set_float32_matmul_precision("high")
    return LightningCLI(DraftModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        save_config_kwargs={"overwrite": True}, args=args, run=run)
