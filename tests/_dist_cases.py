"""Cases, model and data shared by the distributed equivalence test and its worker processes."""

import itertools

import torch
from torch import nn

STEPS = 10  # averaging (p = 2, 3), Adam's warm-up (4 steps) and the NaN (step 7) all happen within them
CASES = list(itertools.product(("ef", "saef"), ("sign", "topk:0.1"), (False, True), (None, 2), ("sharded", "rank0")))
CASES += list(itertools.product(("ef21", "direct"), ("sign", "topk:0.1"), (False, True), (None,), ("sharded", "rank0")))
# random draws, stochastic rounding, PowerSGD's state (on the 16 x 6 and 8 x 16 weights), 16-bit values
CASES += [("saef", "powersgd:2", True, None, "sharded"), ("direct", "qsgd:4", True, None, "rank0"),
          ("ef21", "randk:0.25", False, None, "sharded"), ("ef", "topk:0.1:bf16", True, 2, "rank0")]
# top-k per chunk with 4-bit values, and rand-k with 8-bit stochastic rounding (unbiased, direct)
CASES += [("saef", "topk:0.1:chunk=16:int4", True, 2, "sharded"), ("direct", "randk:0.25:unbiased:int8sr", False, None, "rank0")]

# Adam's compressed momentum (1-bit Adam with ef, SAEF-Adam with saef), its warm-up ending at step 4
CASES += [("ef", "sign", True, None, "sharded", "adam"), ("saef", "sign", True, 2, "rank0", "adam"),
          ("saef", "topk:0.1", False, None, "sharded", "adam"), ("direct", "topk:0.1", True, None, "rank0", "adam")]
# Overlapped steps (bytes of gradients per bucket): the tiny model's 8 layers in 4 buckets, or one per layer
OVERLAP_BYTES = (400, 1)
# A NaN in one rank's gradient of the first layer at NAN_STEP, with a finite loss (every rank skips the step);
# overlapped, its bias is in the third of the 4 buckets and its weight in the last (which waits for the vote)
NAN_STEP = 7
NAN_CASES = [("saef", "sign", True, 2, "sharded"), ("ef21", "topk:0.1", True, None, "rank0"),
             ("saef", "powersgd:2", True, None, "sharded"), ("saef", "sign", True, 2, "rank0", "adam")]
ADAM = {"optimizer": "adam", "betas": (0.9, 0.99), "eps": 1e-3, "warmup_steps": 4}
# Local steps: the 10 steps are 5 rounds of H = 2 (with p = 2 the errors are averaged before rounds 1 and 3),
# or 3 rounds of H = 3 and a third of one; outer Nesterov momentum, AdamW inside, a decayed error
ROUNDS = {"rounds-sgd": {"local_steps": 2, "momentum": 0.9, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True},
          "rounds-adamw": {"local_steps": 3, "inner_optimizer": "adamw", "betas": (0.9, 0.99), "eps": 1e-3, "outer_lr": 0.8}}
# The optimizer facade with local steps (dist worker and test alike)
ROUNDS_FACADE = {"lr": 0.01, "compressor": "topk:0.1", "local_steps": 3, "inner_optimizer": "adamw", "betas": (0.9, 0.99),
                 "eps": 1e-3, "outer_lr": 0.8, "outer_momentum": 0.9, "nesterov": True, "error_decay": 0.95, "average_every": 2}
ROUND_CASES = [("saef", "topk:0.1", True, 2, "sharded", "rounds-sgd"), ("ef", "sign", True, None, "rank0", "rounds-adamw"),
               ("direct", "identity", False, None, "sharded", "rounds-sgd"), ("saef", "sign", False, None, "rank0", "rounds-adamw"),
               ("direct", "topk:0.1", True, None, "rank0", "rounds-adamw"), ("ef", "topk:0.1:chunk=16:int2", True, None, "sharded", "rounds-sgd")]


def algorithm_settings(case):
    """The algorithm's keyword settings of a case: (method, compressor, double_way, average_every, server[, "adam" or
    a key of ROUNDS])."""
    method, compressor, double_way, average_every = case[:4]
    optimizer = ADAM if case[5:] == ("adam",) else ROUNDS[case[5]] if case[5:] else {"momentum": 0.9}
    decay = {"error_decay": 0.95} if case[5:] == ("rounds-adamw",) and method != "direct" else {}
    return dict(method=method, compressor=compressor, double_way=double_way, average_every=average_every,
                weight_decay=1e-3, **optimizer, **decay)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def batch(step, workers, per_worker=4):
    g = torch.Generator().manual_seed(1000 + step)
    n = per_worker * workers
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def shard(inputs, targets, rank, workers):
    size = len(inputs) // workers
    return inputs[rank * size : (rank + 1) * size], targets[rank * size : (rank + 1) * size]
