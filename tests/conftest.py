"""Test-wide settings. The suite runs many tiny models, where intra-op threads only add contention
(and DDP tests start several processes on 2 cores), so each process uses one thread."""
import torch

torch.set_num_threads(1)
