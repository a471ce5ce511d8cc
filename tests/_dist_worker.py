"""One rank of the distributed tests (run by tests/test_distributed.py with RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set). Rank 0 saves what every case produced to the file named by argv[1]."""

import sys

import torch
import torch.distributed as dist

from saef.distributed import DistributedWorker, init_distributed

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _dist_cases import CASES, STEPS, batch, shard, tiny_model  # noqa: E402

BITS = ("bits_up", "bits_down", "bits_averaging")


def run_case(case, world):
    method, compressor, double_way, average_every, server = case
    worker = DistributedWorker(tiny_model(), method=method, compressor=compressor, momentum=0.9, weight_decay=1e-3,
                               double_way=double_way, average_every=average_every, server=server)
    wire_errors = []
    for step in range(STEPS):
        before_bits, before_wire = dict(worker.bits), dict(worker.transport.wire)
        inputs, targets = shard(*batch(step, world), worker.rank, world)
        worker.step(inputs, targets, lr=0.05)
        sent = {k: worker.transport.wire[k] - before_wire[k] for k in before_wire}
        bits = {k: worker.bits[k] - before_bits[k] for k in BITS}
        if (sent["uplink_sent"] * 8, sent["downlink_received"] * 8, sent["averaging_sent"] * 8) != (bits["bits_up"], bits["bits_down"], bits["bits_averaging"]):
            wire_errors.append((step, sent, bits))
    return {"x": worker.x.clone(), "bits": dict(worker.bits), "wire_errors": wire_errors}


def main():
    init_distributed("cpu", timeout_s=60)
    world = dist.get_world_size()
    results = {case: run_case(case, world) for case in CASES}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save(gathered, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
