"""Two DDP ranks on CPU (gloo), forked in-process: after training, both hold the same weights (and EMA).

``ddp_fork`` keeps this in one pytest process; plain ``ddp`` would re-launch pytest itself and hang.
"""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from specflow.data.toy import ToyMixtureDataModule
from specflow.lit.target import TargetFlow


def _no_allreduce(state, bucket):
    """A DDP communication hook that keeps each rank's local gradient (the control's broken DDP)."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class SaveWeights(pl.Callback):
    """Each rank writes its online and EMA weights to ``<dir>/rank<k>.pt`` when training ends."""

    def __init__(self, out_dir, allreduce: bool = True):
        self.out_dir, self.allreduce = out_dir, allreduce

    def on_train_start(self, trainer, pl_module):
        # Forked ranks inherit one RNG state; give each its own x0 and t, so that identical weights
        # afterwards can only come from the gradient all-reduce (whatever the data sharding does).
        torch.manual_seed(100 + trainer.global_rank)
        if not self.allreduce:
            trainer.strategy.model.register_comm_hook(None, _no_allreduce)

    def on_train_end(self, trainer, pl_module):
        state = {"net": pl_module.net.state_dict(), "ema": pl_module.ema.state_dict(),
                 "step": trainer.global_step, "world": trainer.world_size}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("allreduce", [True, False], ids=["ddp", "control-no-allreduce"])
def test_two_ranks_hold_identical_weights(tmp_path, allreduce):
    pl.seed_everything(0)
    model = TargetFlow(arch="mlp", net=dict(dim=2, hidden=32, depth=2), lr=1e-2, ema_decay=0.9)
    init = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=5, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[SaveWeights(tmp_path, allreduce)])
    trainer.fit(model, ToyMixtureDataModule(dim=2, batch_size=64))
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 5
    if not allreduce:  # control: the check below must catch ranks that drifted apart
        assert any(not torch.equal(r0["net"][k], r1["net"][k]) for k in r0["net"])
        return
    for part in ("net", "ema"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k} differs between ranks"
    assert any(not torch.equal(r0["net"][k], init[k]) for k in init), "training did not change the weights"
