"""One rank of the transport-equivalence test: every rule on a toy problem through the torch.distributed
transport, with gradients computed exactly as the in-process run computes them (see test_distributed.py)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _transport_cases import CASES, SHAPES, STEPS, algorithm_settings, gradient, start  # noqa: E402

from saef import Algorithm, AlgorithmConfig  # noqa: E402
from saef.backends.distributed import DistributedTransport, init_distributed  # noqa: E402


def run(case, rank):
    server = case[4]
    config = AlgorithmConfig(**algorithm_settings(case))
    x = start()
    transport = DistributedTransport([t.numel() for t in (torch.empty(s) for s in SHAPES)], server, dtype=x.dtype)
    algorithm = Algorithm(SHAPES, config, transport)
    state = algorithm.init_state(x)
    for t in range(STEPS):
        z = algorithm.gradient_points(state, x)
        algorithm.step(state, x, gradient(rank, t, z[0]).unsqueeze(0), lr=0.05 * 0.95**t)
    return {"x": x.clone(), "tensors": {n: v.clone() for n, v in state.tensors.items()}, "model": algorithm.point(state, x, "x").clone(),
            "bits": transport.ledger.per_worker(), "owned": algorithm.plan.owned}


def main(out):
    init_distributed("cpu", timeout_s=60)
    rank = torch.distributed.get_rank()
    results = {case: run(case, rank) for case in CASES}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
