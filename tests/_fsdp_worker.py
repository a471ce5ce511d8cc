"""One of 4 ranks of the FSDP2 test (tests/test_hook.py): a (replicate 2 x shard 2) mesh; the model sharded over
the shard dimension, its replica exchange by saef.compress_replicas, against native HSDP (identity) and against
EF written out here per piece of each shard (top-k). Writes OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
import saef  # noqa: E402
from saef.backends.distributed import init_distributed  # noqa: E402

STEPS = 5


def model(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def train(net, steps=STEPS):
    rank = dist.get_rank()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        inputs, targets = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        part = slice(4 * rank, 4 * (rank + 1))
        opt.zero_grad()
        F.cross_entropy(net(inputs[part]), targets[part]).backward()
        opt.step()
    return torch.cat([p.to_local().detach().reshape(-1) for p in net.parameters()])


def reference_hooks(net, group, spec, replicas):
    """EF per piece of each unit's shard: D_k = g_k + e_k, c_k = C(D_k), e_k = D_k - c_k, average mean_k c_k,
    from every replica's shard (all-gathered over the replica group)."""
    from torch.distributed.fsdp import FSDPModule

    compressor = saef.make_compressor(spec)
    errors = {}

    def hook(output, index):
        size = -(-output.numel() // replicas)
        for j, piece in enumerate(torch.split(output.view(-1), size)):
            everyone = [torch.empty_like(piece) for _ in range(replicas)]
            dist.all_gather(everyone, piece.contiguous(), group=group)
            total = None
            for k, g in enumerate(everyone):
                d = g + errors.get((index, j, k), torch.zeros_like(g))
                c = compressor.compress(d)
                errors[index, j, k] = d - c
                total = c.clone() if total is None else total + c
            piece.copy_(total / replicas)

    for index, unit in enumerate(m for m in net.modules() if isinstance(m, FSDPModule)):
        unit.set_all_reduce_hook(lambda output, index=index: hook(output, index))


def main():
    from torch.distributed.device_mesh import init_device_mesh

    out = Path(sys.argv[1])
    init_distributed("cpu", timeout_s=60)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    replicate = mesh.get_group("replicate")
    found = {}
    native = train(model(mesh))
    net = model(mesh["shard"])
    saef.compress_replicas(net, replicate, compressor="identity")
    found["identity_diff"] = float((train(net) - native).abs().max())
    net = model(mesh["shard"])
    state = saef.compress_replicas(net, replicate, compressor="topk:0.25", method="ef", double_way=False)
    hooked = train(net)
    net = model(mesh["shard"])
    reference_hooks(net, replicate, "topk:0.25", 2)
    found["ef_diff"] = float((hooked - train(net)).abs().max())
    found["ef_bits_up"] = state.bits["bits_up"]
    found["moved"] = float((hooked - native).abs().max())
    try:  # sharded on the 2-D mesh, FSDP2 all-reduces the replicas itself: refused
        saef.compress_replicas(model(mesh), replicate)
    except ValueError as error:
        found["hsdp_refused"] = str(error)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
