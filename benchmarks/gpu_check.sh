#!/usr/bin/env bash
# The CUDA paths of saef, checked and timed on one GPU; prints one Markdown table. Never part of CI.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a CUDA GPU
#     SAEF_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # the same rows on the CPU (NCCL left out): a dry run
#
# Rows: every compressor's encode + decode on the device (checked: what is decoded stays on the device, and for
# the deterministic ones equals what the CPU decodes from the same input),
# the simulator's step on the GPU (ResNet-20, K = 4, SAEF top-k), the GPT step with SAEF-Adam in fp32 and
# bf16, the step overlapped with backward against the plain one (bit for bit, one process: the hooks run on
# autograd's device threads), and two processes with the NCCL backend on two GPUs (their parameters checked
# against the simulator; skipped with one GPU, where NCCL refuses two ranks on one device). Each row says ok, skipped
# or FAILED with the reason; the script exits 1 if any row failed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'EOF'
import os, socket, subprocess, sys, tempfile, textwrap, time, traceback
import torch

rows, failed = [], False

def row(name, fn):
    global failed
    try:
        detail = fn()
        rows.append((name, "ok", detail))
    except Exception as error:  # report every path, whatever breaks
        failed = True
        rows.append((name, "FAILED", f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"))

device = torch.device(os.environ.get("SAEF_CHECK_DEVICE", "cuda"))
on_gpu = device.type == "cuda"
sync = torch.cuda.synchronize if on_gpu else (lambda: None)

def timed(fn, repeats=20):
    fn(); sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); sync(); times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

if on_gpu and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device (torch.cuda.is_available() is False)")
print(f"torch {torch.__version__}, " + (f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if on_gpu else "CPU dry run"))

import saef
from saef.compress import make_compressor
from saef.compress.base import Layout

SPECS = ["sign", "topk:0.01", "randk:0.01", "qsgd:4", "natural", "powersgd:2", "topk:0.01:bf16"]
v = torch.randn(4, 1 << 20, device=device)
layout = Layout([1 << 20], [(1024, 1024)])
for spec in SPECS:
    def check(spec=spec):
        c = make_compressor(spec)
        ctx = c.context_args(saef.compress.Context(0, 0, (0, 1, 2, 3), None, {})) if (c.random or c.stateful) else {}
        if c.stateful:
            return "stateful: covered by the simulator rows"
        payloads = c.encode_layers(v, layout, **ctx)
        out = c.decode_layers_into(payloads, layout, torch.empty_like(v), **ctx)
        assert out.device.type == device.type, "decoded off the device"
        assert bool(torch.isfinite(out).all()), "non-finite values decoded"
        if not c.random:
            on_cpu = c.decode_layers_into(c.encode_layers(v.cpu(), layout), layout, torch.empty_like(v.cpu()))
            assert torch.allclose(out.cpu(), on_cpu, rtol=1e-5, atol=1e-6), "the device and the CPU decode differently"
        seconds = timed(lambda: c.decode_layers_into(c.encode_layers(v, layout, **ctx), layout, torch.empty_like(v), **ctx))
        return f"encode+decode of 4 x 2^20: {1e3 * seconds:.2f} ms"
    row(f"compressor {spec}", check)

def simulator_resnet():
    from types import SimpleNamespace
    from saef.zoo.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet20", SimpleNamespace(num_classes=10, input_shape=(3, 32, 32))).to(device)
    sim = saef.Simulator(model, workers=4, compressor="topk:0.01", momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32, device=device), torch.randint(0, 10, (128,), device=device)
    seconds = timed(lambda: sim.step(x, y, 0.1), repeats=10)
    assert sim.x.device.type == device.type
    return f"ResNet-20, K = 4, batch 128: {1e3 * seconds:.1f} ms/step"
row("simulator ResNet-20 SAEF top-k", simulator_resnet)

def gpt(precision):
    from types import SimpleNamespace
    from saef.zoo.models import build_model
    torch.manual_seed(0)
    info = SimpleNamespace(num_classes=256, input_shape=(64,), name="text")
    sim = saef.Simulator(build_model("gpt", info).to(device), workers=4, method="saef", optimizer="adam",
                         compressor="sign", warmup_steps=1, eps=1.0, precision=precision)
    x, y = torch.randint(0, 256, (64, 64), device=device), torch.randint(0, 256, (64, 64), device=device)
    seconds = timed(lambda: sim.step(x, y, 1e-3), repeats=10)
    return f"GPT 438k, K = 4, batch 64 x 64: {1e3 * seconds:.1f} ms/step"
row("GPT SAEF-Adam fp32", lambda: gpt("fp32"))
row("GPT SAEF-Adam bf16", lambda: gpt("bf16"))

def overlapped_step():
    """One worker (in-process transport) on ResNet-20 on the device: the step overlapped with backward
    (hooks run on autograd's device threads there) against the plain step, bit for bit, and both timed."""
    from types import SimpleNamespace
    from saef import Algorithm, AlgorithmConfig, InProcessTransport
    from saef.core import flatten
    from saef.core.overlap import OverlappedStep
    from saef.zoo.models import build_model
    data = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
    def runner(overlap):
        torch.manual_seed(0)
        model = build_model("resnet20", SimpleNamespace(num_classes=10, input_shape=(3, 32, 32))).to(device)
        params = list(model.parameters())
        algorithm = Algorithm([p.shape for p in params], AlgorithmConfig(compressor="topk:0.01", momentum=0.9),
                                  InProcessTransport(1))
        x = flatten([p.detach() for p in params]).clone()
        state = algorithm.init_state(x)
        stepper = OverlappedStep(algorithm, params, 1 << 18, lambda ok: ok) if overlap else None
        def step():
            algorithm.write_gradient_points(state, x, [p.data for p in params])
            for p in params:
                p.grad = None
            loss = torch.nn.functional.cross_entropy(model(data[0]), data[1])
            if stepper is None:
                loss.backward()
                algorithm.step(state, x, [p.grad for p in params], 0.1)
            else:
                stepper.run(state, x, 0.1, loss.backward)
        return step, x, state
    (plain, x_plain, s_plain), (overlapped, x_over, s_over) = runner(False), runner(True)
    for _ in range(3):
        plain(); overlapped()
    sync()
    assert torch.equal(x_plain, x_over), f"x differs by {(x_plain - x_over).abs().max().item():.1e}"
    assert all(torch.equal(s_plain.tensors[k], s_over.tensors[k]) for k in s_plain.tensors), "the state differs"
    t_plain, t_over = timed(plain, repeats=10), timed(overlapped, repeats=10)
    return f"ResNet-20, batch 64, 256 KB buckets: bit-identical; {1e3 * t_plain:.1f} ms plain, {1e3 * t_over:.1f} ms overlapped"
row("overlapped step (1 process)", overlapped_step)

def nccl_two_processes():
    worker = textwrap.dedent('''
        import os, sys, torch, torch.distributed as dist
        from torch import nn
        import saef
        from saef.backends.distributed import DistributedTrainer
        dist.init_process_group("nccl")
        torch.cuda.set_device(dist.get_rank())  # NCCL refuses two ranks on one device
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).cuda(dist.get_rank())
        w = DistributedTrainer(model, compressor="topk:0.25", momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 6, generator=g).cuda(dist.get_rank()), torch.randint(0, 3, (8,), generator=g).cuda(dist.get_rank())
        r = dist.get_rank()
        for _ in range(5):
            w.step(x[4 * r:4 * r + 4], y[4 * r:4 * r + 4], 0.1)
        if r == 0:
            torch.save(w.x.cpu(), sys.argv[1])
        dist.destroy_process_group()
    ''')
    with tempfile.TemporaryDirectory() as tmp:
        script, out = os.path.join(tmp, "w.py"), os.path.join(tmp, "x.pt")
        open(script, "w").write(worker)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, script, out], env=dict(os.environ, RANK=str(r), WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), stderr=subprocess.PIPE, text=True) for r in range(2)]
        codes = [p.wait(timeout=300) for p in procs]
        if codes != [0, 0]:
            raise RuntimeError(f"exit codes {codes}: {procs[0].stderr.read()[-300:]}")
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        sim = saef.Simulator(model, workers=2, compressor="topk:0.25", momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        for _ in range(5):
            sim.step(x, y, 0.1)
        diff = (torch.load(out) - sim.x).abs().max().item()
        assert diff < 1e-4, f"NCCL ranks differ from the simulator by {diff}"
        return f"2 ranks on one GPU, 5 steps: max |x - simulator| = {diff:.1e}"
if on_gpu and torch.cuda.device_count() >= 2:
    row("NCCL, 2 processes", nccl_two_processes)
elif on_gpu:  # NCCL refuses two ranks on one device ("Duplicate GPU detected")
    rows.append(("NCCL, 2 processes", "skipped", "one GPU: NCCL needs a device per rank"))

print("| path | result | detail |")
print("|---|---|---|")
for name, status, detail in rows:
    print(f"| {name} | {status} | {detail} |")
sys.exit(1 if failed else 0)
EOF
