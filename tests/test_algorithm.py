"""Algorithm 1: invariants, reduction to momentum SGD, a hand-computed example, argument validation."""

import math
import sys
from pathlib import Path

import pytest
import torch

import saef
from saef import Algorithm, AlgorithmConfig, InProcessTransport

sys.path.insert(0, str(Path(__file__).parent))
from _problems import quadratic_problem  # noqa: E402

CASES = [(m, c, dw) for m in ("ef", "saef") for c in ("sign", "topk:0.3") for dw in (False, True)]


@pytest.mark.parametrize("method,compressor,double_way", CASES)
def test_delta_equals_compressed_plus_error(method, compressor, double_way):
    """Every step: D_k == C(D_k) + new e_k for each worker, D == C_s(D) + new e_s for the server, and
    x moves by exactly -C_s(D)."""
    shapes = [(3, 4), (7,), (1,)]
    grad_fn, x0 = quadratic_problem(3, shapes)
    cfg = AlgorithmConfig(method=method, momentum=0.9, weight_decay=0.01, compressor=compressor, double_way=double_way, average_every=3)
    alg = Algorithm(shapes, cfg, InProcessTransport(3))
    x = saef.core.flatten(x0).clone()
    state = alg.init_state(x)
    comp, server_comp = cfg.compressor, cfg.downlink_compressor
    for t in range(10):
        z = alg.gradient_points(state, x).clone()  # EF's point is a view of x, which the step moves
        grads = torch.stack([saef.core.flatten(grad_fn(k, saef.core.unflatten(z[k], shapes))) for k in range(3)])
        e_old, m_old, es_old, x_old = state.worker_error.clone(), state.worker_momentum.clone(), state.server_error.clone(), x.clone()
        lr = 0.1 / (1 + t)
        alg.step(state, x, grads, lr)
        m_new = 0.9 * m_old + grads + 0.01 * z
        assert torch.allclose(state.worker_momentum, m_new, rtol=0, atol=1e-12)
        delta = e_old + lr * m_new
        sent = torch.cat([comp.compress_rows(delta[:, alg.layer(i)]) for i in range(3)], dim=1)
        e_new = delta - sent
        if (t + 2) % 3 == 0:  # averaged for the next step
            e_new = e_new.mean(0, keepdim=True).expand_as(e_new)
        assert torch.allclose(state.worker_error, e_new, rtol=0, atol=1e-12)
        server_delta = es_old + sent.mean(0)
        applied = torch.cat([server_comp.compress(server_delta[alg.layer(i)]) for i in range(3)])
        assert torch.allclose(state.server_error + applied, server_delta, rtol=0, atol=1e-12)
        assert torch.allclose(x, x_old - applied, rtol=0, atol=1e-12)
        if not double_way:
            assert torch.count_nonzero(state.server_error) == 0


@pytest.mark.parametrize("double_way", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("method", saef.available_rules())
def test_identity_equals_torch_sgd(method, momentum, double_way):
    """With C = identity, 50 steps of every rule (EF, SAEF, EF21, direct; single- and double-way) equal
    torch.optim.SGD(momentum, weight_decay) fed the mean of the workers' gradients (allclose 1e-6), with a
    learning rate that changes every step; mu = 0 is plain SGD."""
    shapes = [(5, 3), (3,)]
    grad_fn, x0 = quadratic_problem(4, shapes, dtype=torch.float32)
    lr = lambda t: 0.05 * (0.97**t)
    got = saef.simulate(grad_fn, x0, workers=4, steps=50, lr=lr, momentum=momentum, weight_decay=5e-3, method=method,
                        compressor="identity", double_way=double_way)
    params = [t.clone().requires_grad_(True) for t in x0]
    opt = torch.optim.SGD(params, lr=lr(0), momentum=momentum, weight_decay=5e-3)
    for t in range(50):
        opt.param_groups[0]["lr"] = lr(t)
        per_worker = [grad_fn(k, [p.detach() for p in params]) for k in range(4)]
        for i, p in enumerate(params):
            p.grad = torch.stack([g[i] for g in per_worker]).mean(0)
        opt.step()
    for a, b in zip(got, params):
        assert torch.allclose(a, b.detach(), rtol=1e-6, atol=1e-6)


def test_one_worker_identity_ef_saef_sgd_agree():
    """K = 1 with identity: EF, SAEF and torch.optim.SGD give the same parameters."""
    grad_fn, x0 = quadratic_problem(1, [(6,)])
    runs = [saef.simulate(grad_fn, x0, workers=1, steps=30, lr=0.1, momentum=0.5, method=m, compressor="identity") for m in ("ef", "saef")]
    p = x0[0].clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.5)
    for _ in range(30):
        p.grad = grad_fn(0, [p.detach()])[0]
        opt.step()
    assert torch.allclose(runs[0][0], runs[1][0], rtol=0, atol=1e-12)
    assert torch.allclose(runs[0][0], p.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["ef", "saef"])
def test_average_every_step_makes_errors_equal(method):
    """With p = 1, right after each step (when the errors are averaged) all worker errors are equal."""
    shapes = [(10,)]
    grad_fn, x0 = quadratic_problem(3, shapes)
    alg = Algorithm(shapes, AlgorithmConfig(method=method, compressor="topk:0.2", average_every=1), InProcessTransport(3))
    x = x0[0].clone()
    state = alg.init_state(x)
    for _ in range(5):
        z = alg.gradient_points(state, x)
        alg.step(state, x, torch.stack([grad_fn(k, [z[k]])[0] for k in range(3)]), 0.1)
        assert torch.count_nonzero(state.worker_error) > 0
        assert torch.equal(state.worker_error[0], state.worker_error[1])
        assert torch.equal(state.worker_error[0], state.worker_error[2])
    assert alg.transport.ledger.per_worker()["bits_averaging"] == 5 * 10 * 64 * 2  # sent and received


# Hand-computed example: 2 workers, x0 = (1, -2, 1/2, 0), grad_k(z) = a_k z + b_k with a = (1, 2),
# b_0 = (-1, -3/2, 0, -5/4), b_1 = (7/4, 3/2, 7/4, 1); lr = 1/2, mu = 1/2; sign, or top-k with k = 2 of 4
# (the data are chosen so that top-k never meets a tie). Every value is a dyadic rational, so float64 holds
# it exactly. First step of SAEF + sign, single-way, by hand:
#   e = 0, z = x0; g_0 = (0, -7/2, 1/2, -5/4), g_1 = (15/4, -5/2, 11/4, 1); m_k = g_k; D_k = g_k / 2
#   C(D_0) = (21/8)/4 * (+, -, +, -),  C(D_1) = 5/4 * (+, -, +, +)   (sign(0) = +)
#   mean = (61/64, -61/64, 61/64, 19/64);  x1 = x0 - mean = (3/64, -67/64, -29/64, -19/64)
# The values after 3 steps below were worked out with exact fractions in a plain-Python loop.
HAND = {
    ("ef", "sign", False): [-243 / 1024, -99 / 1024, -1957 / 1024, 669 / 1024],
    ("ef", "sign", True): [457 / 4096, 2713 / 4096, -8857 / 4096, 4441 / 4096],
    ("ef", "topk:0.5", False): [-7 / 128, 223 / 128, -25 / 16, -121 / 128],
    ("ef", "topk:0.5", True): [-157 / 128, 223 / 128, -39 / 32, 0],
    ("saef", "sign", False): [145 / 1024, 137 / 1024, -1411 / 1024, -207 / 1024],
    ("saef", "sign", True): [339 / 1024, 519 / 1024, -2055 / 1024, 951 / 1024],
    ("saef", "topk:0.5", False): [-41 / 64, 115 / 128, -7 / 8, -5 / 128],
    ("saef", "topk:0.5", True): [-29 / 16, -1 / 32, -39 / 32, 85 / 64],
}
B_HAND = [[-1.0, -1.5, 0.0, -1.25], [1.75, 1.5, 1.75, 1.0]]


@pytest.mark.parametrize("key", sorted(HAND))
def test_hand_computed_three_steps(key):
    """2 workers, 3 steps: the final parameters equal the values worked out by hand (exactly)."""
    method, compressor, double_way = key
    a = [1.0, 2.0]
    b = [torch.tensor(row, dtype=torch.float64) for row in B_HAND]
    x0 = [torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)]
    x = saef.simulate(lambda k, x: [a[k] * x[0] + b[k]], x0, workers=2, steps=3, lr=0.5, momentum=0.5,
                      method=method, compressor=compressor, double_way=double_way)
    assert x[0].tolist() == HAND[key]


def test_first_step_by_hand():
    """The first SAEF + sign single-way step derived in the comment above."""
    b = [torch.tensor(row, dtype=torch.float64) for row in B_HAND]
    x0 = [torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)]
    x = saef.simulate(lambda k, x: [(k + 1) * x[0] + b[k]], x0, workers=2, steps=1, lr=0.5, momentum=0.5, compressor="sign", double_way=False)
    assert x[0].tolist() == [3 / 64, -67 / 64, -29 / 64, -19 / 64]


def test_saef_takes_gradient_ahead_and_ef_at_x():
    """SAEF's gradient point is x - e_k; EF's is x."""
    shapes = [(4,)]
    for method in ("ef", "saef"):
        alg = Algorithm(shapes, AlgorithmConfig(method=method, compressor="topk:0.25"), InProcessTransport(2))
        x = torch.zeros(4)
        state = alg.init_state(x)
        alg.step(state, x, torch.tensor([[4.0, 1.0, 2.0, 3.0], [1.0, 4.0, 3.0, 2.0]]), 1.0)
        z = alg.gradient_points(state, x)
        expected = x - state.worker_error if method == "saef" else x.expand(2, 4)
        assert torch.equal(z, expected)
        assert torch.count_nonzero(state.worker_error) == 6


def test_mismatch_terms_and_auxiliary_iterate():
    """The diagnostics equal their definitions computed from the state by hand."""
    shapes = [(6,)]
    grad_fn, x0 = quadratic_problem(3, shapes)
    alg = Algorithm(shapes, AlgorithmConfig(compressor="topk:0.2"), InProcessTransport(3))
    x = x0[0].clone()
    state = alg.init_state(x)
    for _ in range(4):
        z = alg.gradient_points(state, x)
        alg.step(state, x, torch.stack([grad_fn(k, [z[k]])[0] for k in range(3)]), 0.3)
    e, es = state.worker_error, state.server_error
    total = es + e.mean(0)
    got = alg.mismatch(state)
    assert math.isclose(got["mismatch_ef"], total.square().sum().item(), rel_tol=1e-9)
    assert math.isclose(got["mismatch_saef"], sum((total - e[k]).square().sum().item() for k in range(3)) / 3, rel_tol=1e-9)
    assert torch.allclose(alg.auxiliary_iterate(state, x), x - total)


def test_bit_counters_sum_payloads():
    """Cumulative bits per worker: uplink = sum of the workers' payloads / K, downlink = server payloads."""
    sim = saef.Simulator(torch.nn.Linear(9, 10, bias=True), workers=2, compressor="sign")
    sim.step(torch.randn(4, 9), torch.randint(0, 10, (4,)), 0.1)
    expected = (8 * math.ceil(90 / 8) + 32) + (8 * math.ceil(10 / 8) + 32)
    assert sim.bits == {"bits_up": expected, "bits_down": expected, "bits_averaging": 0}


BAD = [
    (dict(method="adam"), "method"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(average_every=0), "average_every"),
    (dict(compressor="topk:0"), "rho"),
    (dict(compressor="topk:1.01"), "rho"),
    (dict(compressor="topk:nan"), "rho"),
    (dict(compressor="zip"), "unknown compressor"),
]


@pytest.mark.parametrize("kwargs,needle", BAD)
def test_bad_arguments_raise_at_construction(kwargs, needle):
    """Bad hyper-parameters raise ValueError naming the argument, its value and the allowed range."""
    with pytest.raises(ValueError, match=needle):
        AlgorithmConfig(**kwargs)
    with pytest.raises(ValueError, match=needle):
        saef.SAEF([torch.zeros(2, requires_grad=True)], lr=0.1, **kwargs)


def test_bad_simulate_arguments():
    """simulate rejects workers < 1, negative lr and gradients shaped unlike the parameters."""
    grad = lambda k, x: [torch.zeros(3)]
    with pytest.raises(ValueError, match="workers"):
        saef.simulate(grad, [torch.zeros(3)], workers=0, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        saef.simulate(grad, [torch.zeros(3)], workers=1, steps=1, lr=-0.1)
    with pytest.raises(ValueError, match=r"lr"):
        saef.SAEF([torch.zeros(2, requires_grad=True)], lr=-1.0)
    with pytest.raises(ValueError, match="expected"):
        saef.simulate(lambda k, x: [torch.zeros(4)], [torch.zeros(3)], workers=1, steps=1, lr=0.1)


def test_float64_is_kept():
    """simulate computes in the dtype of x0."""
    x = saef.simulate(lambda k, x: [x[0]], [torch.ones(3, dtype=torch.float64)], workers=2, steps=2, lr=0.1, compressor="topk:0.5")
    assert x[0].dtype == torch.float64


def test_compressor_whose_decode_aliases_its_input():
    """A (custom) compressor may return views of what it was given: encode returns D itself and decode
    returns the payload. The update must still be x - C(D), with e = D - C(D) = 0 afterwards."""

    class Aliasing(saef.compress.Identity):
        def decode_layers(self, payloads, layout):
            return payloads[0][0] if len(payloads) == 1 else super().decode_layers(payloads, layout)

    x = saef.simulate(lambda k, x: [torch.ones(3)], [torch.zeros(3)], workers=1, steps=2, lr=0.1, compressor=Aliasing())
    assert torch.allclose(x[0], torch.full((3,), -0.2))


@pytest.mark.parametrize("spec", ["identity", "sign", "topk:0.5"])
def test_in_process_transport_shared_by_two_dtypes(spec):
    """The in-process transport keeps its decode buffer between steps: a float64 run after a float32 run on
    the same transport must give exactly what a fresh transport gives (no float32 rounding, no error)."""
    def one_step(transport, dtype):
        ef = Algorithm([(3,)], AlgorithmConfig(method="saef", compressor=spec, momentum=0.5), transport)
        x = torch.tensor([1.0, -2.0, 3e-9], dtype=dtype)
        state = ef.init_state(x)
        ef.step(state, x, torch.tensor([[1 / 3, 0.1, 1e-9], [1 / 3, 0.2, -1e-9]], dtype=dtype), lr=1.0)
        return x, state.worker_error

    shared = InProcessTransport(2)
    one_step(shared, torch.float32)
    x, e = one_step(shared, torch.float64)
    x_ref, e_ref = one_step(InProcessTransport(2), torch.float64)
    assert x.dtype == torch.float64 and torch.equal(x, x_ref) and torch.equal(e, e_ref)


def test_a_flight_runs_its_phases_in_order_and_equals_step():
    """Algorithm.begin / Flight.serve / Flight.finish / end_step is Algorithm.step bit for bit, and a phase
    asked for out of order (finish before serve, serve twice) is refused with RuntimeError, naming the
    order, before it changes anything."""
    shapes = [(3, 4), (7,)]
    grad_fn, x0 = quadratic_problem(2, shapes)
    cfg = AlgorithmConfig(method="saef", momentum=0.9, compressor="topk:0.3", average_every=2)
    plain, phased = (Algorithm(shapes, cfg, InProcessTransport(2)) for _ in range(2))
    x_plain, x_phased = saef.core.flatten(x0).clone(), saef.core.flatten(x0).clone()
    s_plain, s_phased = plain.init_state(x_plain), phased.init_state(x_phased)
    for t in range(4):
        z = plain.gradient_points(s_plain, x_plain)
        grads = torch.stack([saef.core.flatten(grad_fn(k, saef.core.unflatten(z[k], shapes))) for k in range(2)])
        plain.step(s_plain, x_plain, grads, 0.1)
        flight = phased.begin(s_phased, x_phased, grads.clone(), 0.1)
        with pytest.raises(RuntimeError, match="begin, serve, finish"):
            flight.finish()
        flight.serve()
        with pytest.raises(RuntimeError, match="begin, serve, finish"):
            flight.serve()
        flight.finish()
        phased.end_step(s_phased)
    assert torch.equal(x_plain, x_phased)
    for name, tensor in s_plain.tensors.items():
        assert torch.equal(tensor, s_phased.tensors[name]), name
