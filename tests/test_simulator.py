"""The module simulator against torch.optim.SGD and against itself: per-worker batch statistics, the
auxiliary point, state round trips, non-finite steps, parameters the forward does not use. (The optimizer
facade: test_optim.py.)"""

import pytest
import torch
import torch.nn.functional as F

import saef

from _problems import batches, small_model


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


def test_simulate_skips_non_finite_steps():
    """A NaN gradient in saef.simulate skips that step (with a warning): the result is that of the run
    without the step, and finite."""
    import torch

    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    calls = {"n": 0}

    def grad(k, x):
        calls["n"] += 1
        g = x[0] - target
        return [g * float("nan") if calls["n"] in (5, 6) else g]  # both workers of step 2

    with pytest.warns(UserWarning, match="1 of 10 steps skipped"):
        got = saef.simulate(grad, [torch.zeros(3, dtype=torch.float64)], workers=2, steps=10, lr=0.1, momentum=0.5,
                            compressor="sign")
    want = saef.simulate(lambda k, x: [x[0] - target], [torch.zeros(3, dtype=torch.float64)], workers=2, steps=9,
                         lr=0.1, momentum=0.5, compressor="sign")
    assert torch.equal(got[0], want[0])


def test_the_simulator_takes_a_parameter_the_forward_does_not_use():
    """A parameter unused in forward gets a zero gradient instead of an error (which used to switch the
    simulator's fast paths off for good and then raise): no warning, the stacked path stays, and without
    momentum or weight decay the unused parameter does not move."""
    import warnings

    import torch
    from torch import nn

    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Partial()
    start = model.unused.weight.detach().clone()
    sim = saef.Simulator(model, workers=2, compressor="identity")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            sim.step(torch.randn(8, 4), torch.randint(0, 3, (8,)), lr=0.1)
    assert sim.stacked is not None
    sim.load_into(model)
    assert torch.equal(model.unused.weight, start) and not torch.equal(model.used.weight, Partial().used.weight)


@pytest.mark.parametrize("grad_fn,x0,needle", [
    (lambda k, x: None, [torch.zeros(2)], "grad_fn(0, x) must return worker 0's gradients as a list of tensors shaped [(2,)], got NoneType"),
    (lambda k, x: [1.0], [torch.zeros(2)], "got list of ['float']"),
    (lambda k, x: x[0], [torch.zeros(2)], "got Tensor"),
    (lambda k, x: [torch.zeros(3)], [torch.zeros(2)], "returned gradients of shapes [(3,)] for worker 0, expected [(2,)]"),
    (lambda k, x: [x[0]], [torch.tensor(1.0)], "x0 must hold tensors of at least one dimension"),
])
def test_simulate_refuses_what_it_cannot_run(grad_fn, x0, needle):
    """A grad_fn returning None, non-tensors or wrong shapes, or a 0-dim tensor in x0: a ValueError naming
    the worker and what was expected (or x0's shapes), not a TypeError from deep inside."""
    with pytest.raises(ValueError) as raised:
        saef.simulate(grad_fn, x0, workers=2, steps=1, lr=0.1)
    assert needle in str(raised.value), raised.value
    with pytest.raises(ValueError, match="largest float32"):
        saef.simulate(lambda k, x: [x[0]], [torch.zeros(2)], workers=2, steps=1, lr=1e308)
