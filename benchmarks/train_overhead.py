"""Lightning's per-step overhead: TargetFlow under a Trainer vs the same step in a plain PyTorch loop.

Same net, same batch (one fixed batch, already on the device, so data loading is out of both), same
optimizer, clipping and EMA. The Lightning run logs to TensorBoard as the configs do. Both are timed in
the same process after warm-up; the two are interleaved over several rounds and the median is reported.

    python benchmarks/train_overhead.py                     # CPU, the digits UNet
    python benchmarks/train_overhead.py --device cuda --precision bf16-mixed --arch cifar
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from specflow.lit.target import TargetFlow, flow_matching_loss

NETS = {
    "digits": ("unet", dict(image_size=8, in_channels=1, model_channels=32, channel_mult=[1, 2], num_res_blocks=2,
                            attention_resolutions=[4], num_heads=4, num_classes=10)),
    "cifar": ("unet", dict(image_size=32, in_channels=3, model_channels=128, channel_mult=[1, 2, 2, 2],
                           num_res_blocks=2, attention_resolutions=[16], num_heads=4, num_classes=10)),
    "mlp": ("mlp", dict(dim=2, hidden=256, depth=3)),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Repeat:
    """An iterable that yields the same batch ``n`` times (a 'data loader' with zero cost)."""

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __iter__(self):
        return (self.batch for _ in range(self.n))

    def __len__(self):
        return self.n


class StepTimer(pl.Callback):
    def __init__(self, device):
        self.device, self.stamps = device, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(self.device)
        self.stamps.append(time.perf_counter())


def plain_loop(model: TargetFlow, batch, steps: int, device, precision: str) -> list[float]:
    """forward, loss, backward, clip, AdamW step, LR schedule, EMA update — the same work as training_step."""
    net, ema, hp = model.net, model.ema, model.hparams
    opt = torch.optim.AdamW(net.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, hp.warmup_steps)))
    x1, y = batch
    stamps = []
    for step in range(steps):
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=device)
        cond = None
        if model.num_classes is not None:  # label dropout to the null class, as TargetFlow._cond
            drop = torch.rand(y.shape, device=device) < hp.label_dropout
            cond = torch.where(drop, torch.full_like(y, model.num_classes), y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = flow_matching_loss(net, x1, x0, t, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(hp.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - d)
        sync(device)
        stamps.append(time.perf_counter())
    return stamps


def lightning_fit(model: TargetFlow, batch, steps: int, device, precision: str, logdir: str) -> list[float]:
    timer = StepTimer(device)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                         max_steps=steps, gradient_clip_val=1.0, log_every_n_steps=50,
                         logger=TensorBoardLogger(logdir, name="bench"), callbacks=[timer],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=Repeat(batch, steps))
    return timer.stamps


def per_step_ms(stamps: list[float], warmup: int) -> float:
    return (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(NETS), default="digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run (after warm-up)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved plain/Lightning rounds; median reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, help="32-true (CPU default) or bf16-mixed (CUDA default)")
    args = ap.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    arch, kw = NETS[args.arch]
    pl.seed_everything(0, verbose=False)
    proto = TargetFlow(arch=arch, net=kw, lr=1e-4, warmup_steps=100, ema_decay=0.999,
                       label_dropout=0.1 if kw.get("num_classes") else 0.0)
    if arch == "mlp":
        batch = (torch.randn(args.batch, kw["dim"], device=device), torch.zeros(args.batch, dtype=torch.long, device=device))
    else:
        shape = (args.batch, kw["in_channels"], kw["image_size"], kw["image_size"])
        batch = (torch.randn(shape, device=device), torch.randint(0, 10, (args.batch,), device=device))
    n = args.warmup + args.steps
    plain, light = [], []
    with tempfile.TemporaryDirectory() as logdir:
        for _ in range(args.rounds):
            plain.append(per_step_ms(plain_loop(copy.deepcopy(proto).to(device), batch, n, device, precision), args.warmup))
            light.append(per_step_ms(lightning_fit(copy.deepcopy(proto), batch, n, device, precision, logdir), args.warmup))
    p, q = statistics.median(plain), statistics.median(light)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\narch={args.arch} batch={args.batch} precision={precision} device={name} "
          f"steps={args.steps} (+{args.warmup} warm-up) rounds={args.rounds}")
    print(f"{'loop':<22}{'ms/step (median)':>18}{'all rounds':>34}")
    print(f"{'plain PyTorch':<22}{p:>18.2f}{'  '.join(f'{v:.2f}' for v in plain):>34}")
    print(f"{'Lightning Trainer':<22}{q:>18.2f}{'  '.join(f'{v:.2f}' for v in light):>34}")
    print(f"{'ratio (goal <= 1.10)':<22}{q / p:>18.3f}")


if __name__ == "__main__":
    main()
