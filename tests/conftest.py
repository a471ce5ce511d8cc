"""Test-wide settings: one intra-op thread keeps small kernels fast on a 2-core machine where pytest and
torch would otherwise compete for the cores (timing, not results, depends on it)."""

import torch

torch.set_num_threads(1)
