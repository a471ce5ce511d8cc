"""One rank of the distributed tests (run by tests/test_distributed.py with RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set). Rank 0 saves what every case produced to the file named by argv[1]."""

import sys
import time

import torch
import torch.distributed as dist

from saef.backends.distributed import DistributedTransport, DistributedTrainer, init_distributed
from saef.core import NonFiniteStep, Pending

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _dist_cases import ADAM, CASES, NAN_CASES, ROUND_CASES, ROUNDS_FACADE, NAN_STEP, OVERLAP_BYTES, STEPS, algorithm_settings, batch, shard, tiny_model  # noqa: E402

BITS = ("bits_up", "bits_down", "bits_averaging")


def wire(worker):
    """The bytes handed to torch.distributed, per direction, from the transport's ledger."""
    return {k[len("wire_"):]: v for k, v in worker.transport.ledger.counts.items() if k.startswith("wire_")}


def poison(worker, step, world, layer):
    """At step NAN_STEP, the last rank's gradient of parameter ``layer`` turns NaN, with a finite loss:
    overlapped, the first layer's weight (0) is the last bucket, which starts only after the vote, and its
    bias (1) a bucket before it, which the other ranks have sent and settled by then. Returns the hook."""
    if step != NAN_STEP or worker.rank != world - 1:
        return None
    return worker.params[layer].register_hook(lambda g: torch.full_like(g, float("nan")))


def skew_arrivals(rank):
    """Overlapped steps with the ranks' second stages at the most different moments: rank 0's uplinks never
    say they have arrived (it serves every bucket after backward), the other ranks' wait until they have
    when asked (they serve each bucket in the first hook after it was sent). Over one shared channel the
    ranks' collectives would then start in different orders."""
    begin = DistributedTransport.begin_uplink

    def begin_uplink(self, *args, **kwargs):
        pending = begin(self, *args, **kwargs)
        if rank == 0:
            return Pending(pending.wait, lambda: False)

        def arrived():
            while not pending.ready():
                time.sleep(1e-4)
            return True

        return Pending(pending.wait, arrived)

    DistributedTransport.begin_uplink = begin_uplink


def run_case(case, world, overlap_bytes=0, nan=None):
    worker = DistributedTrainer(tiny_model(), server=case[4], overlap_bytes=overlap_bytes, **algorithm_settings(case))
    wire_errors, skipped = [], []
    for step in range(STEPS):
        before_bits, before_wire = dict(worker.bits), wire(worker)
        inputs, targets = shard(*batch(step, world), worker.rank, world)
        hook = poison(worker, step, world, nan) if nan is not None else None
        try:
            worker.step(inputs, targets, lr=0.05)
        except NonFiniteStep:
            skipped.append(step)
            continue
        finally:
            if hook is not None:
                hook.remove()
        worker.mismatch()  # diagnostics traffic must not be counted as error averaging
        sent = {k: wire(worker)[k] - before_wire[k] for k in before_wire}
        bits = {k: worker.bits[k] - before_bits[k] for k in BITS}
        if (sent["uplink_sent"] * 8, sent["downlink_received"] * 8, (sent["averaging_sent"] + sent["averaging_received"]) * 8) != (bits["bits_up"], bits["bits_down"], bits["bits_averaging"]) \
                or (sent["diagnostics_sent"] == 0) == worker.has_diagnostics:  # read-outs only where the rule has them
            wire_errors.append((step, sent, bits))
    return {"x": worker.x.clone(), "bits": dict(worker.bits), "wire_errors": wire_errors, "skipped": skipped,
            "state": worker.state.state_dict()["tensors"]}


def _user_loop(opt, model, world):
    """Each rank steps on its shard, as a user's training loop would."""
    import torch.nn.functional as F

    for step in range(STEPS):
        inputs, targets = shard(*batch(step, world), dist.get_rank(), world)
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()
    return {"x": opt.x.clone(), "bits_up": opt.bits["bits_up"]}


def run_facade(world):
    """The optimizer facade in a user's loop. The last layer joins through add_param_group, from values that
    differ by rank (the group must start from rank 0's)."""
    import saef

    model = tiny_model()
    opt = saef.SAEF(list(model[:5].parameters()), lr=0.05, momentum=0.9, compressor="topk:0.1", average_every=3)
    with torch.no_grad():
        model[5].weight.add_(dist.get_rank())
    opt.add_param_group({"params": model[5].parameters()})
    return _user_loop(opt, model, world)


def run_adam_facade(world):
    """The optimizer facade with optimizer adam (SAEF-Adam, sign, warm-up of 4 steps, p = 3)."""
    import saef

    model = tiny_model()
    return _user_loop(saef.SAEF(model.parameters(), lr=0.01, compressor="sign", average_every=3, **ADAM), model, world)


def run_rounds_facade(world):
    """The optimizer facade with local steps (inner AdamW, H = 3, outer Nesterov, a decayed error, p = 2)."""
    import saef

    model = tiny_model()
    return _user_loop(saef.SAEF(model.parameters(), **ROUNDS_FACADE), model, world)


def resnet20_wire():
    """Uplink bytes handed to torch.distributed in one ResNet-20 step, per compressor, against the fp32
    all-reduce payload (4 bytes per parameter)."""
    from types import SimpleNamespace

    from saef.zoo.models import build_model

    out = {}
    for compressor, server in (("sign", "sharded"), ("topk:0.01", "sharded"), ("identity", "allreduce")):
        torch.manual_seed(0)
        model = build_model("resnet20", SimpleNamespace(input_shape=(3, 32, 32), num_classes=10))
        worker = DistributedTrainer(model, compressor=compressor, double_way=compressor != "identity", server=server, momentum=0.9)
        g = torch.Generator().manual_seed(dist.get_rank())
        worker.step(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g), lr=0.1)
        out[compressor] = {"uplink": worker.transport.ledger.counts["wire_uplink_sent"], "downlink": worker.transport.ledger.counts["wire_downlink_received"],
                           "fp32": 4 * worker.x.numel(), "bits_up": worker.bits["bits_up"]}
    return out


def main():
    init_distributed("cpu", timeout_s=60)
    world = dist.get_world_size()
    results = {case: run_case(case, world) for case in CASES + ROUND_CASES}
    for case in NAN_CASES:
        results["nan", case] = run_case(case, world, nan=1)
    skew_arrivals(dist.get_rank())  # (only the overlapped steps ask whether uplinks have arrived)
    for n, case in enumerate(CASES):  # the same cases, overlapped with backward: buckets of a few layers, or one per layer
        results["overlap", case] = run_case(case, world, OVERLAP_BYTES[n % 2])
    for case in NAN_CASES:  # a NaN in a middle bucket, and in the last one
        results["nan overlap", case] = run_case(case, world, OVERLAP_BYTES[0], nan=1)
        results["nan overlap last", case] = run_case(case, world, OVERLAP_BYTES[0], nan=0)
    results["facade"] = run_facade(world)
    results["adam facade"] = run_adam_facade(world)
    results["rounds facade"] = run_rounds_facade(world)
    if world == 2:
        results["resnet20"] = resnet20_wire()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save(gathered, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
