"""One rank of the slow-network benchmark (launched by bench_network.py with RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT inside a rate-limited network namespace). Rank 0 prints one JSON line.

Variants: ddp-fp32, ddp-fp16, ddp-powersgd (PyTorch's DDP and its built-in communication hooks), and
saef-ef-sign, saef-sign, saef-topk (saef's distributed worker, double-way, sharded server).
"""

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from saef.zoo.data import epoch_batches, load_dataset
from saef.backends.distributed import DistributedWorker
from saef.zoo.models import build_model


def make_trainer(variant, model, lr):
    if variant.startswith("ddp"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel

        # PowerSGD's asynchronous per-bucket collectives can interleave differently on each rank over gloo
        # ("Received data size doesn't match"); one bucket keeps them in one order.
        ddp = DistributedDataParallel(model, bucket_cap_mb=1024 if variant == "ddp-powersgd" else 25)
        if variant == "ddp-fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif variant == "ddp-powersgd":
            state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)

        def step(inputs, targets):
            opt.zero_grad()
            F.cross_entropy(ddp(inputs), targets).backward()
            opt.step()

        return step, (lambda: model)
    method, compressor = {"saef-ef-sign": ("ef", "sign"), "saef-sign": ("saef", "sign"), "saef-topk": ("saef", "topk:0.01")}[variant]
    worker = DistributedWorker(model, method=method, compressor=compressor, momentum=0.9, double_way=True)
    import copy

    eval_model = copy.deepcopy(model)
    return (lambda inputs, targets: worker.step(inputs, targets, lr)), (lambda: worker.load_into(eval_model))


@torch.no_grad()
def accuracy(model, split):
    model.eval()
    acc = (model(split.inputs).argmax(1) == split.targets).float().mean().item()
    model.train()
    return acc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True)
    parser.add_argument("--model", default="mlp5m")
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=0, help="then train this many epochs, evaluating after each")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--data-dir", default="~/.cache/saef")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if args.model.startswith("resnet"):
        g = torch.Generator().manual_seed(0)
        n = 4 * args.batch
        data = SimpleNamespace(num_classes=10, input_shape=(3, 32, 32),
                               train=SimpleNamespace(inputs=torch.randn(n, 3, 32, 32, generator=g), targets=torch.randint(0, 10, (n,), generator=g)))
    else:
        data = load_dataset("mnist1d", args.data_dir)
    torch.manual_seed(0)
    model = build_model(args.model, data)
    step, current = make_trainer(args.variant, model, args.lr)
    order = torch.Generator().manual_seed(0)
    per = args.batch // world

    def batches():
        while True:
            for indices in epoch_batches(len(data.train.targets), args.batch, order):
                mine = indices[rank * per : (rank + 1) * per]
                yield data.train.inputs[mine], data.train.targets[mine]

    stream = batches()
    times = []
    for i in range(args.timing_steps + 3):
        inputs, targets = next(stream)
        dist.barrier()
        start = time.perf_counter()
        step(inputs, targets)
        if i >= 3:
            times.append(time.perf_counter() - start)
    result = {"variant": args.variant, "model": args.model, "workers": world, "step_s": statistics.median(times)}
    if args.epochs:
        torch.manual_seed(0)
        model = build_model(args.model, data)
        step, current = make_trainer(args.variant, model, args.lr)
        order.manual_seed(0)
        curve, train_time = [], 0.0
        steps_per_epoch = len(data.train.targets) // args.batch
        for epoch in range(args.epochs):
            dist.barrier()
            start = time.perf_counter()
            for indices in epoch_batches(len(data.train.targets), args.batch, order):
                mine = indices[rank * per : (rank + 1) * per]
                step(data.train.inputs[mine], data.train.targets[mine])
            train_time += time.perf_counter() - start
            curve.append((train_time, accuracy(current(), data.test)))
        result["curve"] = curve
        result["steps_per_epoch"] = steps_per_epoch
    if rank == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
