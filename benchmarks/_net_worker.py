"""One rank of the slow-network benchmark (launched by bench_network.py with RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT inside a rate-limited network namespace). Rank 0 prints one JSON line.

Variants: ddp-fp32, ddp-fp16, ddp-powersgd (PyTorch's DDP and its built-in communication hooks),
ddp-saef-hook-topk / -sign and ddp-adamw-saef-hook-topk / -sign (DDP with saef's hook: EF, top-k 1 % or scaled
sign; ddp-saef-hook-overlap-topk / -sign: the hook's exchange overlapped with backward), and
saef-ef-sign, saef-sign, saef-topk, saef-topk-fp16 (top-k 1 % with 16-bit values; saef's distributed worker,
double-way, sharded server), saef-fp32 (the same worker with nothing compressed: as many bytes as DDP fp32) and saef-fp16 (16-bit
values both ways, as DDP's fp16 hook sends, through the sharded server), all with momentum SGD; for the GPT: ddp-adamw-fp32, ddp-adamw-fp16, ddp-adamw-bf16 (its hook needs CUDA and NCCL),
ddp-adamw-powersgd (torch.optim.AdamW under DDP and its hooks), saef-1bit-adam (EF-Adam) and saef-adam (SAEF-Adam), both scaled sign, double-way, after a warm-up;
and communicating rarely (16 inner AdamW steps a round, the settings of saef reproduce loco): saef-diloco (the fp32
pseudo-gradient all-reduced, outer Nesterov 0.7 / 0.9), saef-diloco-bf16 (bf16 both ways), saef-sparseloco (EF, error
decay 0.95, top-k 2 % per chunk of 4096 with 2-bit values, both ways) and saef-loco (the same with SAEF's step-ahead
start). Their timing is per round (H steps and one exchange), reported per step and per round.
"""

import argparse
import json
import math
import statistics
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from saef.zoo.datasets import epoch_batches, load_dataset
from saef.backends.distributed import DistributedTrainer
from saef.zoo.models import build_model


SAEF_VARIANTS = {"saef-fp32": dict(method="saef", compressor="identity", momentum=0.9),  # nothing compressed
                 "saef-fp16": dict(method="saef", compressor="identity:fp16", momentum=0.9),  # 16-bit values both ways
                 "saef-ef-sign": dict(method="ef", compressor="sign", momentum=0.9),
                 "saef-sign": dict(method="saef", compressor="sign", momentum=0.9),
                 "saef-topk": dict(method="saef", compressor="topk:0.01", momentum=0.9),
                 "saef-topk-fp16": dict(method="saef", compressor="topk:0.01:fp16", momentum=0.9),
                 "saef-1bit-adam": dict(method="ef", compressor="sign", optimizer="adam"),
                 "saef-adam": dict(method="saef", compressor="sign", optimizer="adam")}
# communicating rarely (saef reproduce loco's settings): 16 inner AdamW steps a round, then one exchange
_ROUND = dict(inner_optimizer="adamw", momentum=0.0, local_steps=16)
SAEF_VARIANTS.update({
    "saef-diloco": dict(**_ROUND, method="direct", compressor="identity", double_way=False, outer_lr=0.7, outer_momentum=0.9,
                        nesterov=True),  # DiLoCo: the fp32 pseudo-gradient all-reduced, outer Nesterov
    "saef-diloco-bf16": dict(**_ROUND, method="direct", compressor="identity:bf16", outer_lr=0.7, outer_momentum=0.9, nesterov=True),
    "saef-sparseloco": dict(**_ROUND, method="ef", compressor="topk:0.02:chunk=4096:int2", error_decay=0.95, outer_lr=1.0),
    "saef-loco": dict(**_ROUND, method="saef", compressor="topk:0.02:chunk=4096:int2", error_decay=0.95, outer_lr=1.0),
})


STEP_AFTER_BACKWARD = []  # seconds, per step of a saef variant without overlap


def local_step(forward, opt):
    """A training step of ``forward`` (a model, or DDP around one) with the torch optimizer ``opt``."""
    def step(inputs, targets):
        opt.zero_grad()
        F.cross_entropy(forward(inputs), targets).backward()
        opt.step()

    return step


def make_trainer(variant, model, lr, warmup, eps=1e-8, overlap_mb=0.0):
    if variant == "compute-only":  # this rank's forward, backward and a local SGD step: no communication at all
        return local_step(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)), (lambda: model)
    if variant.startswith("ddp"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel

        # PowerSGD's asynchronous per-bucket collectives can interleave differently on each rank over gloo
        # ("Received data size doesn't match"); one bucket keeps them in one order.
        ddp = DistributedDataParallel(model, bucket_cap_mb=1024 if variant.endswith("powersgd") else 25)
        if variant in ("ddp-fp16", "ddp-adamw-fp16"):
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif variant == "ddp-adamw-bf16":
            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        elif variant.endswith("powersgd"):
            state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=max(2, warmup))
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        elif "saef-hook" in variant:  # saef's DDP hook: EF with the compressor the variant names (its reply compressed: the default)
            import saef

            compressor = {"topk": "topk:0.01", "sign": "sign"}[variant.rsplit("-", 1)[1]]
            ddp.register_comm_hook(saef.CommHookState(compressor=compressor, method="ef", module=model, overlap="overlap" in variant),
                                   saef.comm_hook)
        if "adamw" in variant:
            opt = torch.optim.AdamW(ddp.parameters(), lr=lr, weight_decay=0.0)  # (saef's Adam runs: wd 0 too)
        else:
            opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
        return local_step(ddp, opt), (lambda: model)
    settings = SAEF_VARIANTS[variant]
    if settings.get("optimizer") == "adam":
        settings = {**settings, "warmup_steps": warmup, "eps": eps}
    worker = DistributedTrainer(model, overlap_bytes=int(overlap_mb * (1 << 20)), **{"double_way": True, **settings})
    # The time of the algorithm's step after backward (compression, both exchanges, decoding, the update):
    # the step's communication, where it does not overlap backward.
    STEP_AFTER_BACKWARD.clear()
    timed = worker.algorithm.step

    def step_after_backward(*a, **k):
        start = time.perf_counter()
        timed(*a, **k)
        STEP_AFTER_BACKWARD.append(time.perf_counter() - start)

    worker.algorithm.step = step_after_backward
    import copy

    eval_model = copy.deepcopy(model)
    return (lambda inputs, targets: worker.step(inputs, targets, lr)), (lambda: worker.load_into(eval_model))


@torch.no_grad()
def evaluate(model, split):
    """Test accuracy (a fraction), or for the GPT the validation loss in bits per byte."""
    model.eval()
    outputs = model(split.inputs)
    if split.targets.dim() == 2:
        value = F.cross_entropy(outputs, split.targets).item() / math.log(2)
    else:
        value = (outputs.argmax(1) == split.targets).float().mean().item()
    model.train()
    return value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True)
    parser.add_argument("--model", default="mlp5m")
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=0, help="then train this many epochs, evaluating after each")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=0, help="training: Adam variants' full-precision steps (and PowerSGD's start_powerSGD_iter)")
    parser.add_argument("--eps", type=float, default=1e-8, help="training: saef's Adam eps")
    parser.add_argument("--evals-per-epoch", type=int, default=1, help="training: evaluations per epoch (the clock stops for them)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--overlap-mb", type=float, default=0.0, help="saef variants: overlap with backward, buckets of this many MB (0: no overlap)")
    parser.add_argument("--local-workers", type=int, default=None, help="the batch is cut for this many workers (default: the world size)")
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
    elif args.model == "gpt":  # the default corpus; 512 validation windows keep an evaluation short
        data = load_dataset("text", args.data_dir)
        data.test = SimpleNamespace(inputs=data.test.inputs[:512], targets=data.test.targets[:512])
    else:
        data = load_dataset("mnist1d", args.data_dir)
    torch.manual_seed(0)
    model = build_model(args.model, data)
    # Timed: the compressed phase, from the second step (PowerSGD from its third). Adam's v then holds one
    # step's gradients, so eps = 1 keeps the few timed steps finite; values do not change a step's cost.
    step, current = make_trainer(args.variant, model, args.lr, warmup=1, eps=1.0, overlap_mb=args.overlap_mb)
    order = torch.Generator().manual_seed(0)
    per = args.batch // (args.local_workers or world)

    def batches():
        while True:
            for indices in epoch_batches(len(data.train.targets), args.batch, order):
                mine = indices[rank * per : (rank + 1) * per]
                yield data.train.inputs[mine], data.train.targets[mine]

    stream = batches()
    times = []
    h = SAEF_VARIANTS.get(args.variant, {}).get("local_steps", 1)  # timed in whole rounds: H steps, one exchange
    warm = 3 if h == 1 else 1
    for i in range(args.timing_steps + warm):
        round_batches = [next(stream) for _ in range(h)]
        dist.barrier()
        start = time.perf_counter()
        for inputs, targets in round_batches:
            step(inputs, targets)
        if i >= warm:
            times.append(time.perf_counter() - start)
    result = {"variant": args.variant, "model": args.model, "workers": world, "step_s": statistics.median(times) / h,
              "round_s": statistics.median(times), "local_steps": h}
    if STEP_AFTER_BACKWARD and h == 1:  # (with local steps most steps exchange nothing)
        result["after_backward_s"] = statistics.median(STEP_AFTER_BACKWARD[3:])
    if args.epochs:
        torch.manual_seed(0)
        model = build_model(args.model, data)
        step, current = make_trainer(args.variant, model, args.lr, args.warmup, args.eps, overlap_mb=args.overlap_mb)
        order.manual_seed(0)
        curve, train_time = [], 0.0
        steps_per_epoch = len(data.train.targets) // args.batch
        every = max(1, steps_per_epoch // args.evals_per_epoch)  # evaluate every this many steps (and at the end)
        for epoch in range(args.epochs):
            dist.barrier()
            start = time.perf_counter()
            for i, indices in enumerate(epoch_batches(len(data.train.targets), args.batch, order), start=1):
                mine = indices[rank * per : (rank + 1) * per]
                step(data.train.inputs[mine], data.train.targets[mine])
                if i % every == 0 and i < steps_per_epoch:  # the clock stops while evaluating
                    train_time += time.perf_counter() - start
                    curve.append((train_time, evaluate(current(), data.test)))
                    dist.barrier()
                    start = time.perf_counter()
            train_time += time.perf_counter() - start
            curve.append((train_time, evaluate(current(), data.test)))
        result["curve"] = curve
        result["steps_per_epoch"] = steps_per_epoch
    if rank == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
