"""Parameter counts and CPU forward/train-step times of the velocity nets at the configs the project uses.

    python benchmarks/net_size.py [--batch 64] [--threads 2]
"""
import argparse
import time

import torch

from specflow.nets import build_net, count_params

CONFIGS = {
    "digits-8px mc32 (config)": ("unet", dict(image_size=8, model_channels=32, channel_mult=(1, 2),
                                              attention_resolutions=(4,), num_classes=10)),
    "digits-8px mc48": ("unet", dict(image_size=8, model_channels=48, channel_mult=(1, 2),
                                     attention_resolutions=(4,), num_classes=10)),
    "digits-16px (train on CPU)": ("unet", dict(image_size=16, model_channels=32, channel_mult=(1, 2, 2),
                                                attention_resolutions=(8,), num_classes=10)),
    "bench-7M-16px": ("unet", dict(image_size=16, model_channels=64, channel_mult=(1, 2, 2),
                                   attention_resolutions=(8,), num_classes=10)),
    "unet mc96 (1,2,2) 16px": ("unet", dict(image_size=16, model_channels=96, channel_mult=(1, 2, 2),
                                            attention_resolutions=(8,), num_classes=10)),
    "dit h256 d6 16px p2": ("dit", dict(image_size=16, in_channels=1, patch_size=2, hidden_size=256, depth=6,
                                        num_heads=4, num_classes=10)),
}


def timed(fn, reps: int) -> float:
    fn(), fn()  # warm-up (allocator, oneDNN kernels, optimizer state)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'config':28s} {'params':>10s} {'fwd ms':>9s} {'train-step ms':>14s}")
    for name, (arch, kw) in CONFIGS.items():
        net = build_net(arch, **kw)
        x = torch.randn(args.batch, net.in_channels, net.image_size, net.image_size)
        t, y = torch.rand(args.batch), torch.randint(0, 10, (args.batch,))
        opt = torch.optim.AdamW(net.parameters(), 1e-4)

        def fwd():
            with torch.no_grad():
                net(x, t, y)

        def step():
            loss = (net(x, t, y) - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        print(f"{name:28s} {count_params(net):>10,d} {timed(fwd, args.reps):9.1f} {timed(step, args.reps):14.1f}")


if __name__ == "__main__":
    main()
