"""The module simulator and the optimizer facade against torch.optim.SGD and against each other."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saef


def small_model(batchnorm=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv1d(1, 4, 5, padding=2)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12, 5)]
    return nn.Sequential(*layers)


def batches(n, size=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 12, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method", ["ef", "saef"])
def test_identity_simulator_equals_sgd_on_global_batch(method):
    """K = 4 workers with identity compression equal one model trained by torch.optim.SGD on the whole
    global batch (the mean of equal-sized shard losses is the global mean loss)."""
    data = batches(20)
    sim = saef.Simulator(small_model(), workers=4, method=method, compressor="identity", momentum=0.9, weight_decay=1e-3)
    ref = small_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for inputs, targets in data:
        sim.step(inputs, targets, lr=0.1)
        opt.zero_grad()
        F.cross_entropy(ref(inputs), targets).backward()
        opt.step()
    got = sim.load_into(small_model(seed=5))
    for a, b in zip(got.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_vmap_and_loop_agree_with_batchnorm():
    """The vectorised (vmap) gradients and the per-worker loop give the same parameters and the same
    per-worker BatchNorm running statistics."""
    runs = []
    for vectorize in (True, False):
        sim = saef.Simulator(small_model(batchnorm=True), workers=3, compressor="topk:0.2", momentum=0.9, vectorize=vectorize)
        for inputs, targets in batches(5):
            sim.step(inputs, targets, lr=0.05)
        runs.append(sim)
    assert torch.allclose(runs[0].x, runs[1].x, rtol=1e-5, atol=1e-6)
    for name in runs[0].buffers:
        assert torch.allclose(runs[0].buffers[name].double(), runs[1].buffers[name].double(), atol=1e-6)
    assert runs[0].bits == runs[1].bits


def test_batchnorm_statistics_are_per_worker_and_averaged_for_evaluation():
    """Each worker's running mean follows its own shard; the evaluated model gets the workers' mean."""
    sim = saef.Simulator(small_model(batchnorm=True), workers=2, compressor="sign")
    inputs, targets = batches(1)[0]
    inputs[12:] += 3.0  # worker 1's shard is shifted
    sim.step(inputs, targets, lr=0.0)
    stats = sim.buffers["1.running_mean"]
    assert not torch.allclose(stats[0], stats[1])
    model = sim.load_into()
    assert torch.allclose(model[1].running_mean, stats.mean(0))


def test_auxiliary_point_is_x_minus_errors():
    """load_into(point="auxiliary") writes x - (e_s + mean_k e_k)."""
    sim = saef.Simulator(small_model(), workers=2, compressor="topk:0.1")
    for inputs, targets in batches(3):
        sim.step(inputs, targets, lr=0.1)
    e = sim.state.server_error + sim.state.worker_error.mean(0)
    model = sim.load_into(small_model(), point="auxiliary")
    flat = saef.core.flatten([p.detach() for p in model.parameters()])
    assert torch.allclose(flat, sim.x - e)
    assert sim.mismatch()["mismatch_ef"] > 0
    with pytest.raises(ValueError, match="point"):
        sim.load_into(point="tilde")


def test_state_dict_round_trip_continues_identically():
    """Saving after 4 steps and loading into a fresh simulator continues bit-identically."""
    data = batches(8)
    kwargs = dict(workers=2, compressor="sign", momentum=0.9, average_every=3)
    a = saef.Simulator(small_model(batchnorm=True), **kwargs)
    for inputs, targets in data[:4]:
        a.step(inputs, targets, lr=0.1)
    saved = a.state_dict()
    for inputs, targets in data[4:]:
        a.step(inputs, targets, lr=0.1)
    b = saef.Simulator(small_model(batchnorm=True, seed=3), **kwargs)
    b.load_state_dict(saved)
    for inputs, targets in data[4:]:
        b.step(inputs, targets, lr=0.1)
    assert torch.equal(a.x, b.x)
    assert a.bits == b.bits
    assert torch.equal(a.state.worker_error, b.state.worker_error)


def test_batch_not_divisible_by_workers():
    """A global batch that does not split evenly over the workers is refused."""
    sim = saef.Simulator(small_model(), workers=5)
    with pytest.raises(ValueError, match="divisible"):
        sim.step(*batches(1)[0], lr=0.1)


def test_optimizer_identity_equals_sgd_with_scheduler():
    """The SAEF optimizer with identity compression equals torch.optim.SGD in a user's loop with a
    MultiStepLR schedule."""
    data = batches(12)
    models = [small_model(), small_model()]
    opts = [
        saef.SAEF(models[0].parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, compressor="identity"),
        torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
    ]
    scheds = [torch.optim.lr_scheduler.MultiStepLR(o, milestones=[4, 8], gamma=0.1) for o in opts]
    for inputs, targets in data:
        for model, opt, sched in zip(models, opts, scheds):
            opt.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            opt.step()
            sched.step()
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.001)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_equals_one_worker_simulator():
    """One SAEF optimizer in a user's loop equals the simulator with K = 1 (same algorithm, same points)."""
    data = batches(6)
    model = small_model()
    opt = saef.SAEF(model.parameters(), lr=0.1, momentum=0.9, compressor="topk:0.2")
    sim = saef.Simulator(small_model(), workers=1, compressor="topk:0.2", momentum=0.9)
    for inputs, targets in data:
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()
        sim.step(inputs, targets, lr=0.1)
    assert torch.allclose(opt.x, sim.x, rtol=1e-5, atol=1e-6)
    with opt.evaluation_point("x"):
        flat = saef.core.flatten([p.detach() for p in model.parameters()])
        assert torch.equal(flat, opt.x)
    # outside the context the parameters hold the SAEF gradient point x - e
    flat = saef.core.flatten([p.detach() for p in model.parameters()])
    assert torch.allclose(flat, opt.x - opt.ef_state.worker_error[0])


def test_optimizer_state_dict_holds_everything():
    """The optimizer's state dict holds momentum, errors, step and counters, and restores a run exactly."""
    data = batches(6)
    model = small_model()
    opt = saef.SAEF(model.parameters(), lr=0.1, momentum=0.9, compressor="sign")
    for inputs, targets in data[:3]:
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()
    saved = opt.state_dict()
    for key in ("worker_momentum", "worker_error", "server_error"):
        assert key in saved["state"]["algorithm"]["tensors"]
    assert saved["state"]["algorithm"]["step"] == 3 and set(saved["state"]["ledger"]) >= {"bits_up", "bits_down", "bits_averaging"}
    assert "x" in saved["state"]
    clone = small_model(seed=9)
    opt2 = saef.SAEF(clone.parameters(), lr=0.5, momentum=0.9, compressor="sign")
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.1
    for m, o in ((model, opt), (clone, opt2)):
        for inputs, targets in data[3:]:
            o.zero_grad()
            F.cross_entropy(m(inputs), targets).backward()
            o.step()
    assert torch.equal(opt.x, opt2.x)
