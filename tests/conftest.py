"""Test-wide settings: one torch thread per process (the networks are small, and on a shared
2-core machine more threads only contend)."""

import torch

torch.set_num_threads(1)
