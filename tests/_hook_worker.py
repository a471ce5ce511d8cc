"""One rank of the comm-hook tests (tests/test_hook.py): DDP with saef.comm_hook against DDP's own all-reduce,
against the EF definition computed here from every rank's gradient, and resumed from the hook's state.
Writes its findings as JSON to OUT/rank{r}.json."""

import copy
import json
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
import saef  # noqa: E402
from saef.backends.distributed import init_distributed  # noqa: E402

STEPS = 6


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def batch(step, rank, world):
    g = torch.Generator().manual_seed(100 + step)
    inputs, targets = torch.randn(8 * world, 6, generator=g), torch.randint(0, 3, (8 * world,), generator=g)
    return inputs[8 * rank:8 * (rank + 1)], targets[8 * rank:8 * (rank + 1)]


def train(net, ddp, opt, steps, first=0):
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(first, first + steps):
        opt.zero_grad()
        F.cross_entropy(ddp(batch(step, rank, world)[0]), batch(step, rank, world)[1]).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def wrapped(hook_state=None):
    net = model()
    ddp = DDP(net, bucket_cap_mb=0.002)  # several buckets, rebuilt after the first iteration
    if hook_state is not None:
        ddp.register_comm_hook(hook_state(net), saef.comm_hook)
    return net, ddp, torch.optim.AdamW(net.parameters(), lr=1e-2)


def reference_ef(spec, double_way=False):
    """The definition, per parameter: D_k = g_k + e_k, c_k = C(D_k), e_k = D_k - c_k, gradient mean_k c_k
    (double-way: D = e_s + mean_k c_k, gradient C(D), e_s = D - C(D)), from every rank's gradient
    (all-gathered), then AdamW."""
    rank, world = dist.get_rank(), dist.get_world_size()
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    compressor = saef.make_compressor(spec)
    errors = [[torch.zeros_like(p) for p in net.parameters()] for _ in range(world)]
    server = [torch.zeros_like(p) for p in net.parameters()]
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(net(batch(step, rank, world)[0]), batch(step, rank, world)[1]).backward()
        for i, p in enumerate(net.parameters()):
            everyone = [torch.empty_like(p.grad) for _ in range(world)]
            dist.all_gather(everyone, p.grad)
            sent = []
            for k in range(world):
                d = everyone[k] + errors[k][i]
                c = compressor.compress(d)
                errors[k][i] = d - c
                sent.append(c)
            total = sent[0].clone()
            for c in sent[1:]:
                total += c
            p.grad = total / world
            if double_way:
                d = server[i] + p.grad
                p.grad = compressor.compress(d)
                server[i] = d - p.grad
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def main():
    out = Path(sys.argv[1])
    init_distributed("cpu", timeout_s=60)
    rank = dist.get_rank()
    found = {}
    plain = train(*wrapped(), STEPS)
    hooked = train(*wrapped(lambda net: saef.CommHookState(compressor="identity", module=net)), STEPS)
    found["identity_equal"] = bool(torch.equal(plain, hooked))
    state = {}
    for spec, double_way in (("topk:0.25", False), ("sign", False), ("topk:0.25", True)):
        case = f"{spec}{'-double' if double_way else ''}"

        def make(net, spec=spec, double_way=double_way, case=case):
            state[case] = saef.CommHookState(compressor=spec, method="ef", double_way=double_way, module=net)
            return state[case]
        hooked = train(*wrapped(make), STEPS)
        found[f"ef_{case}_diff"] = float((hooked - reference_ef(spec, double_way)).abs().max())
        found[f"ef_{case}_bits_up"] = state[case].bits["bits_up"]
        found[f"ef_{case}_rebuilt"] = state[case].compositions > len(state[case]._buckets)
    # overlap: each bucket's exchange in the hook's thread while backward goes on -- the same results
    same = train(*wrapped(lambda net: saef.CommHookState(compressor="topk:0.25", double_way=True, module=net)), STEPS)
    threads = set()

    def overlapping(net):
        hook = saef.CommHookState(compressor="topk:0.25", double_way=True, module=net, overlap=True)
        exchange = hook.exchange
        hook.exchange = lambda bucket: threads.add(threading.current_thread().name) or exchange(bucket)
        state["overlap"] = hook
        return hook
    overlapped = train(*wrapped(overlapping), STEPS)
    found["overlap_equal"] = bool(torch.equal(same, overlapped))
    found["overlap_threads"] = sorted(threads)
    state["overlap"].close()  # (the thread and the hook's group end)
    found["overlap_closed"] = state["overlap"]._thread is None and state["overlap"].group is None
    # resume: 3 steps, save, 3 more; against a new model, DDP, hook and AdamW loaded from the saved state
    net, ddp, opt = wrapped(lambda net: state.setdefault("resume", saef.CommHookState(compressor="topk:0.25", module=net)))
    train(net, ddp, opt, 3)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict(), state["resume"].state_dict()))  # (AdamW's holds live tensors)
    whole = train(net, ddp, opt, 3, first=3)
    net2 = model()
    net2.load_state_dict(saved[0])
    ddp2 = DDP(net2, bucket_cap_mb=0.002)
    hook2 = saef.CommHookState(compressor="topk:0.25", module=ddp2)  # (named through the wrapper: "module." dropped)
    hook2.load_state_dict(saved[2])
    ddp2.register_comm_hook(hook2, saef.comm_hook)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved[1])
    found["resume_equal"] = bool(torch.equal(whole, train(net2, ddp2, opt2, 3, first=3)))
    found["resume_bits_equal"] = hook2.bits == state["resume"].bits
    try:
        hook2.load_state_dict({**saved[2], "rank": (rank + 1) % dist.get_world_size()})
    except ValueError as error:
        found["foreign_rank"] = str(error)
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()  # (no rank leaves, taking the store with it, while another is still in a collective)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
