"""The measured inputs of benchmarks/cost_model.py (its ``--measure``), written to cost_inputs.json:

* ``steps[model][variant][local batch]``: seconds of one training step of each network-benchmark variant
  (benchmarks/_net_worker.py's own ``make_trainer``) in one process with one thread and a process group
  of one rank, so nothing crosses a network; ``none`` is a plain forward + backward + SGD step. Local
  batches 64 and 32: the global batch 128 over K = 2 and 4. Median of 4 steps after 2 (PowerSGD
  compresses from its third step, saef's Adam variants from their second).
* ``codec[model][spec]``: saef's compressors on the model's layers, seconds per element: ``encode`` (one
  row), ``decode`` (one row, into a buffer), ``mean_1`` (the server's mean of one row) and ``mean_row``
  (each further row, from the mean of 4 rows).
* ``sharing[K][model]``: the plain step at the local batch 128 / K while K processes run it at once, one
  thread each (the CPU sharing of a measured row, where K ranks compute on this machine's cores).
* ``collectives[K]``: gloo's seconds per collective with a tiny payload, K processes of one thread on this
  machine's loopback (no rate limit), K = 2 and 4: all_reduce of one int32, all_to_all_single of 8 bytes
  per peer, broadcast of 16 floats.

Random inputs stand in for the data: a step's cost does not depend on the values.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = {  # the network benchmark's models and their variants
    "mlp5m": ["ddp-fp32", "ddp-fp16", "ddp-powersgd", "saef-ef-sign", "saef-sign", "saef-topk", "saef-topk-fp16"],
    "resnet20": ["ddp-fp32", "ddp-fp16", "ddp-powersgd", "saef-ef-sign", "saef-sign", "saef-topk", "saef-topk-fp16"],
    "gpt": ["ddp-adamw-fp32", "ddp-adamw-fp16", "ddp-adamw-powersgd", "saef-1bit-adam", "saef-adam"],
}
CODECS = ("sign", "topk:0.01", "topk:0.01:fp16", "topk:0.02:chunk=4096:int2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_and_batch(name: str, batch: int):
    """The zoo model as the network benchmark builds it, and a random batch of ``batch`` samples."""
    from saef.zoo.models import build_model

    g = torch.Generator().manual_seed(0)
    if name == "gpt":
        data = SimpleNamespace(num_classes=256, input_shape=(64,), name="text")
        inputs = torch.randint(0, 256, (batch, 64), generator=g)
        targets = torch.randint(0, 256, (batch, 64), generator=g)
    else:
        shape = (3, 32, 32) if name.startswith("resnet") else (1, 40)
        data = SimpleNamespace(num_classes=10, input_shape=shape, name="images")
        inputs, targets = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    torch.manual_seed(0)
    return build_model(name, data), inputs, targets


def plain_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(inputs, targets):
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()

    return step


def time_step(model_name: str, variant: str, batch: int, warmup: int = 2, timed: int = 4) -> float:
    """Median seconds of a step of ``variant`` (in a one-rank process group that is already set up)."""
    from _net_worker import make_trainer

    model, inputs, targets = model_and_batch(model_name, batch)
    lr = 3e-4 if model_name == "gpt" else 0.05
    step = plain_step(model) if variant == "none" else make_trainer(variant, model, lr, warmup=1, eps=1.0)[0]
    times = []
    for i in range(warmup + timed):
        start = time.perf_counter()
        step(inputs, targets)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_steps(batches=(64, 32)) -> dict:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        steps = {}
        for model, variants in MODELS.items():
            steps[model] = {v: {str(b): time_step(model, v, b) for b in batches} for v in ["none"] + variants}
            print(f"# measured steps of {model}: {json.dumps(steps[model])}", file=sys.stderr, flush=True)
        return steps
    finally:
        dist.destroy_process_group()


def _median_s(work, reps: int = 9) -> float:
    work()  # the first calls build per-layout plans
    work()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def codec_rates(model_name: str, spec: str) -> dict:
    """saef's compressor ``spec`` on the layers of ``model_name``: seconds per element of each part."""
    from saef.compress import Layout, make_compressor

    model, _, _ = model_and_batch(model_name, 1)
    shapes = [tuple(p.shape) for p in model.parameters()]
    layout = Layout([p.numel() for p in model.parameters()], shapes)
    compressor, total = make_compressor(spec), layout.total
    g = torch.Generator().manual_seed(0)
    one, four = torch.randn(1, total, generator=g), torch.randn(4, total, generator=g)
    payloads, stacked, out = compressor.encode_layers(one, layout), compressor.encode_layers(four, layout), torch.empty(1, total)
    encode = _median_s(lambda: compressor.encode_layers(one, layout))
    decode = _median_s(lambda: compressor.decode_layers_into(payloads, layout, out))
    mean_1 = _median_s(lambda: compressor.decode_mean_layers(payloads, layout))
    mean_4 = _median_s(lambda: compressor.decode_mean_layers(stacked, layout))
    return {"encode": encode / total, "decode": decode / total, "mean_1": mean_1 / total,
            "mean_row": max(0.0, mean_4 - mean_1) / 3 / total}


def _concurrent_worker(rank: int, k: int, port: int, out: str, iterations: int, timed: int) -> None:
    """One of K processes (one thread each) on this machine: gloo's seconds per tiny collective, then the
    plain step of every model at the local batch 128 / K while the other K - 1 run it too (the process
    group only lines up the start of each measurement). Each rank writes its JSON to ``out.RANK``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k)
    torch.set_num_threads(1)
    vote, floats = torch.zeros(1, dtype=torch.int32), torch.zeros(16)
    send, recv = torch.zeros(8 * k, dtype=torch.uint8), torch.zeros(8 * k, dtype=torch.uint8)
    ops = {"all_reduce": lambda: dist.all_reduce(vote), "all_to_all": lambda: dist.all_to_all_single(recv, send),
           "broadcast": lambda: dist.broadcast(floats, 0)}
    result = {"collectives": {}, "sharing": {}}
    for name, op in ops.items():
        for _ in range(10):
            op()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iterations):
            op()
        result["collectives"][name] = (time.perf_counter() - start) / iterations
    for name in MODELS:
        model, inputs, targets = model_and_batch(name, 128 // k)
        step = plain_step(model)
        step(inputs, targets)
        dist.barrier()
        times = []
        for _ in range(timed):
            start = time.perf_counter()
            step(inputs, targets)
            times.append(time.perf_counter() - start)
        result["sharing"][name] = statistics.median(times)
        dist.barrier()
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure_concurrent(workers=(2, 4), iterations: int = 200, timed: int = 4) -> tuple:
    """``collectives[K][kind]`` (rank 0's seconds per collective) and ``sharing[K][model]`` (the median over
    ranks of the plain step's median seconds while K processes compute at once; divided by the one-process
    time it is the slowdown of sharing this machine's cores)."""
    import torch.multiprocessing as mp

    collectives, sharing = {}, {}
    for k in workers:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "out")
            mp.spawn(_concurrent_worker, args=(k, free_port(), path, iterations, timed), nprocs=k, join=True)
            ranks = [json.loads(Path(f"{path}.{r}").read_text()) for r in range(k)]
        collectives[str(k)] = ranks[0]["collectives"]
        sharing[str(k)] = {m: statistics.median(r["sharing"][m] for r in ranks) for m in MODELS}
    return collectives, sharing


def measure(path: Path) -> dict:
    """Measure every input and write them to ``path`` (with the machine and the date)."""
    import saef.compress.kernels as kernels

    start = time.perf_counter()
    torch.set_num_threads(1)
    inputs = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "torch": torch.__version__,
              "cores": os.cpu_count(), "threads": 1, "kernels": "compiled" if kernels.NATIVE else "numpy"}
    inputs["collectives"], inputs["sharing"] = measure_concurrent()
    inputs["codec"] = {m: {spec: codec_rates(m, spec) for spec in CODECS} for m in MODELS}
    inputs["steps"] = measure_steps()
    inputs["seconds"] = round(time.perf_counter() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(inputs, indent=1))
    return inputs
