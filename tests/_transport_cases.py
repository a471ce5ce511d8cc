"""The cases of the transport-equivalence test: every rule, compressor, direction and server placement on a
toy problem whose gradients are elementwise, so that a rank and the in-process run compute them alike."""

import itertools

import torch

SHAPES = [(4, 5), (7,), (3, 3), (1,), (6,)]  # with K = 2 the sharded server owns layers that are not side by side
STEPS = 12
RULE_CASES = [(m, c, dw, p, s) for m, c, dw, s in itertools.product(("ef", "saef", "ef21", "direct"), ("sign", "topk:0.25", "identity"),
                                                                    (False, True), ("sharded", "rank0"))
              for p in ((None, 2) if m in ("ef", "saef") else (None,))]
# nothing compressed: the dense mean travels as in an all-reduce (the full-precision baseline's path)
ALLREDUCE_CASES = [(m, "identity", False, None, "allreduce") for m in ("ef", "saef", "ef21", "direct")]
# the random, quantising, low-rank and 16-bit compressors: each with a rule it suits, one- and two-way, both servers
COMPRESSOR_CASES = [("saef", "randk:0.3", True, 2, "sharded"), ("direct", "randk:0.3:unbiased", False, None, "rank0"),
                    ("direct", "qsgd:4", True, None, "sharded"), ("direct", "natural", True, None, "rank0"),
                    ("saef", "powersgd:1", True, None, "sharded"), ("ef21", "powersgd:2", True, None, "rank0"),
                    ("ef", "topk:0.25:bf16", True, None, "sharded"), ("saef", "qsgd:2:fp16", False, None, "sharded")]
# Adam's compressed momentum: each rule it is defined with, one- and two-way, both servers, and lossless (plain Adam)
ADAM_CASES = [("ef", "sign", True, None, "sharded", "adam"), ("saef", "sign", True, 2, "rank0", "adam"),
              ("saef", "topk:0.25", False, 2, "sharded", "adam"), ("direct", "topk:0.25", True, None, "rank0", "adam"),
              ("saef", "identity", False, None, "allreduce", "adam")]
CASES = RULE_CASES + ALLREDUCE_CASES + COMPRESSOR_CASES + ADAM_CASES
SEED = 7  # of the random compressors' draws
ADAM = {"optimizer": "adam", "betas": (0.9, 0.99), "eps": 1e-3, "warmup_steps": 3}


def algorithm_settings(case):
    """The algorithm's keyword settings of a case: (method, compressor, double_way, average_every, server[, "adam"])."""
    method, compressor, double_way, average_every = case[:4]
    optimizer = ADAM if case[5:] == ("adam",) else {"momentum": 0.9}
    return dict(method=method, compressor=compressor, double_way=double_way, average_every=average_every,
                weight_decay=1e-3, seed=SEED, **optimizer)


def start():
    return torch.randn(sum(torch.Size(s).numel() for s in SHAPES), generator=torch.Generator().manual_seed(0))


def gradient(worker, step, point):
    """Worker ``worker``'s gradient at ``point`` (P,) in step ``step``: a_k * z - b_k plus fresh noise."""
    g = torch.Generator().manual_seed(1000 * step + worker)
    n = point.numel()
    scale, shift, noise = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g), torch.randn(n, generator=g)
    return scale * point - shift + 0.1 * noise
