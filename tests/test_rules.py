"""The EF21 and direct rules against float64 references written from their definitions, and what every
rule shares: state that round-trips exactly, diagnostics only where they are defined, clear refusals."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import saef
from saef import Algorithm, AlgorithmConfig, InProcessTransport
from saef.core import flatten, unflatten

sys.path.insert(0, str(Path(__file__).parent))
from _problems import quadratic_problem, tiny_batches, tiny_mlp  # noqa: E402

SHAPES = [(3, 4), (7,), (1,)]
K, STEPS, LR, WD = 3, 40, 0.02, 1e-3
GRID = [(c, dw, mu) for c in ("sign", "topk:0.25", "identity") for dw in (False, True) for mu in (0.0, 0.9)]


def per_layer(spec, vectors):
    """C applied to each layer of each flat vector (the compressors act layer-wise)."""
    compressor = saef.make_compressor(spec)
    return [flatten([compressor.compress(part) for part in unflatten(v, SHAPES)]) for v in vectors]


def reference_ef21(grad_fn, x0, compressor, double_way, mu):
    """EF21 / EF21-SGDM with the EF21-P downlink, transcribed from the definition (issue: per layer):

        y = x | w;  v_k <- mu v_k + grad f(y) + wd y;  c_k = C(v_k - g_k);  g_k += c_k;  g += mean_k c_k
        x <- x - lr g;  double-way: s = C_s(x - w);  w += s;  start v_k = g_k = g = 0, w = x_0
    """
    x = flatten(x0).clone()
    w = x.clone()
    v = [torch.zeros_like(x) for _ in range(K)]
    g_k = [torch.zeros_like(x) for _ in range(K)]
    g = torch.zeros_like(x)
    for _ in range(STEPS):
        y = w if double_way else x
        for k in range(K):
            v[k] = mu * v[k] + flatten(grad_fn(k, unflatten(y, SHAPES))) + WD * y
        c = per_layer(compressor, [v[k] - g_k[k] for k in range(K)])
        g_k = [g_k[k] + c[k] for k in range(K)]
        g = g + torch.stack(c).mean(0)
        x = x - LR * g
        if double_way:
            w = w + per_layer(compressor, [x - w])[0]
    return x


def reference_direct(grad_fn, x0, compressor, double_way, mu):
    """Compressed SGD without feedback, transcribed from the definition:

        m_k <- mu m_k + grad f(x) + wd x;  D = mean_k C(lr m_k);  x <- x - C_s(D) | x - D
    """
    x = flatten(x0).clone()
    m = [torch.zeros_like(x) for _ in range(K)]
    for _ in range(STEPS):
        for k in range(K):
            m[k] = mu * m[k] + flatten(grad_fn(k, unflatten(x, SHAPES))) + WD * x
        mean = torch.stack(per_layer(compressor, [LR * m[k] for k in range(K)])).mean(0)
        x = x - (per_layer(compressor, [mean])[0] if double_way else mean)
    return x


REFERENCES = {"ef21": reference_ef21, "direct": reference_direct}


@pytest.mark.parametrize("compressor,double_way,mu", GRID)
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_rule_follows_its_definition(method, compressor, double_way, mu):
    """saef.simulate(method=ef21 | direct) returns, after 40 steps of 3 workers in float64, the parameters
    of the rule's definition written out by hand (allclose 1e-10): every compressor, both ways, mu = 0, 0.9."""
    grad_fn, x0 = quadratic_problem(K, SHAPES)
    got = saef.simulate(grad_fn, x0, workers=K, steps=STEPS, lr=LR, momentum=mu, weight_decay=WD, method=method,
                        compressor=compressor, double_way=double_way)
    assert [tuple(t.shape) for t in got] == SHAPES and got[0].dtype == torch.float64
    want = REFERENCES[method](grad_fn, x0, compressor, double_way, mu)
    assert torch.allclose(flatten(got), want, rtol=0, atol=1e-10), (flatten(got) - want).abs().max()


@pytest.mark.parametrize("double_way", [False, True])
def test_ef21_server_estimate_is_mean_of_worker_estimates(double_way):
    """EF21's invariant: after every step the server's g equals mean_k g_k (allclose 1e-12)."""
    grad_fn, x0 = quadratic_problem(K, SHAPES)
    alg = Algorithm(SHAPES, AlgorithmConfig(method="ef21", compressor="topk:0.25", momentum=0.5,
                                                    double_way=double_way), InProcessTransport(K))
    x = flatten(x0).clone()
    state = alg.init_state(x)
    for _ in range(10):
        z = alg.gradient_points(state, x)
        alg.step(state, x, torch.stack([flatten(grad_fn(k, unflatten(z[k], SHAPES))) for k in range(K)]), LR)
        assert torch.allclose(state.server_estimate, state.worker_estimate.mean(0), rtol=0, atol=1e-12)
    if double_way:  # the workers hold w, the server holds x; they differ by what C_s left out
        assert not torch.equal(alg.point(state, x, "x"), x)


@pytest.mark.parametrize("method", ["ef21", "direct"])
def test_average_every_is_refused_where_there_is_no_error(method):
    """average_every with a rule that keeps no worker error is refused with a message naming it, in
    AlgorithmConfig, simulate and the SAEF optimizer."""
    with pytest.raises(ValueError, match="average_every applies to"):
        AlgorithmConfig(method=method, average_every=2)
    with pytest.raises(ValueError, match="average_every"):
        saef.simulate(lambda k, x: [x[0]], [torch.zeros(2)], workers=2, steps=1, lr=0.1, method=method, average_every=3)
    with pytest.raises(ValueError, match="average_every"):
        saef.SAEF([torch.zeros(2, requires_grad=True)], lr=0.1, method=method, average_every=1)


def test_config_and_settings_are_not_both_taken():
    """A whole config or its settings as keywords, not both; unknown settings are named."""
    config = AlgorithmConfig(method="ef21")
    with pytest.raises(ValueError, match="not both"):
        saef.simulate(lambda k, x: [x[0]], [torch.zeros(2)], workers=1, steps=1, lr=0.1, config=config, momentum=0.5)
    with pytest.raises(TypeError, match="momentm"):
        saef.simulate(lambda k, x: [x[0]], [torch.zeros(2)], workers=1, steps=1, lr=0.1, momentm=0.5)


@pytest.mark.parametrize("method", saef.available_rules())
def test_diagnostics_only_where_defined(method):
    """EF and SAEF define x~ and the mismatch terms; EF21 and direct do not: their mismatch is None and
    asking for x~ is refused."""
    sim = saef.Simulator(tiny_mlp(), workers=2, method=method, compressor="sign", momentum=0.9)
    sim.step(*tiny_batches(1)[0], lr=0.1)
    if method in ("ef", "saef"):
        assert sim.has_diagnostics and set(sim.mismatch()) == {"mismatch_ef", "mismatch_saef"}
        assert sim.parameters_at("auxiliary").shape == sim.x.shape
    else:
        assert not sim.has_diagnostics and sim.mismatch() is None
        with pytest.raises(ValueError, match="no auxiliary iterate"):
            sim.parameters_at("auxiliary")


@pytest.mark.parametrize("double_way", [False, True])
@pytest.mark.parametrize("method", saef.available_rules())
def test_simulator_state_round_trips_exactly(method, double_way):
    """For every rule: 3 steps, state_dict into a fresh simulator, 3 more steps on both: parameters, every
    state tensor and the bit counts are identical."""
    batches = tiny_batches(6)
    settings = dict(workers=3, method=method, compressor="topk:0.3", momentum=0.9, weight_decay=1e-3, double_way=double_way)
    first = saef.Simulator(tiny_mlp(), **settings)
    for inputs, targets in batches[:3]:
        first.step(inputs, targets, lr=0.1)
    second = saef.Simulator(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), **settings)
    second.load_state_dict(first.state_dict())
    for sim in (first, second):
        for inputs, targets in batches[3:]:
            sim.step(inputs, targets, lr=0.1)
    assert torch.equal(first.x, second.x)
    assert first.state.tensors.keys() == second.state.tensors.keys()
    for name, tensor in first.state.tensors.items():
        assert torch.equal(tensor, second.state.tensors[name]), name
    assert first.bits == second.bits and first.state.step == second.state.step == 6


def test_reset_errors_restarts_from_the_model_iterate():
    """--reset-errors after EF21 double-way starts the new run from the server's model x, not from the
    workers' lagging copy w; the per-worker bit counts and the step carry over, the rule's state is fresh."""
    ef21 = saef.Simulator(tiny_mlp(), workers=2, method="ef21", compressor="topk:0.3", momentum=0.9)
    for inputs, targets in tiny_batches(4):
        ef21.step(inputs, targets, lr=0.1)
    saved = ef21.state_dict()
    assert not torch.equal(saved["model"], saved["x"])
    fresh = saef.Simulator(tiny_mlp(), workers=4, method="saef", compressor="sign")
    fresh.load_state_dict(saved, reset_errors=True)
    assert torch.equal(fresh.x, ef21.parameters_at("x")) and fresh.bits == ef21.bits and fresh.state.step == 4
    assert all(torch.count_nonzero(t) == 0 for t in fresh.state.tensors.values())


def test_state_of_another_rule_is_refused():
    """Loading an EF21 state into an SAEF simulator names what differs instead of loading garbage."""
    ef21 = saef.Simulator(tiny_mlp(), workers=2, method="ef21", compressor="sign")
    other = saef.Simulator(tiny_mlp(), workers=2, method="saef", compressor="sign")
    with pytest.raises(ValueError, match="another method"):
        other.load_state_dict(ef21.state_dict())


@pytest.mark.parametrize("method", ["ef", "saef", "ef21", "direct"])
@pytest.mark.parametrize("double_way", [False, True])
def test_warmup_is_dense_sgd_then_the_rule_from_zero_errors(method, double_way):
    """warmup_steps=N: the first N steps are exactly the rule over identity compressors (momentum SGD, 32
    bits per parameter each way), after which EF/SAEF's errors are zero; then the compressed rule continues
    from that state (torch.equal against a two-stage run), and the bits grow as the compressor sends."""
    grad_fn, x0 = quadratic_problem(K, SHAPES)
    n, total = 7, 15
    common = dict(method=method, momentum=0.9, weight_decay=WD, double_way=double_way)
    warm = Algorithm(SHAPES, AlgorithmConfig(compressor="topk:0.25", warmup_steps=n, **common), InProcessTransport(K))
    dense = Algorithm(SHAPES, AlgorithmConfig(compressor="identity", server_compressor="identity", **common), InProcessTransport(K))
    after = Algorithm(SHAPES, AlgorithmConfig(compressor="topk:0.25", **common), InProcessTransport(K))

    def run(algorithm, x, state, steps):
        for _ in range(steps):
            z = algorithm.gradient_points(state, x)
            algorithm.step(state, x, torch.stack([flatten(grad_fn(k, unflatten(z[k], SHAPES))) for k in range(K)]), LR)

    x_w, x_r = flatten(x0).clone(), flatten(x0).clone()
    s_w, s_r = warm.init_state(x_w), dense.init_state(x_r)
    run(warm, x_w, s_w, n)
    run(dense, x_r, s_r, n)
    assert torch.equal(x_w, x_r) and warm.transport.ledger.per_worker()["bits_up"] == n * 32 * x_w.numel() * 2  # float64
    for name in ("worker_error", "server_error"):
        if name in s_w.tensors:
            assert torch.count_nonzero(s_w.tensors[name]) == 0
    s_after = after.init_state(x_r)
    s_after.load_state_dict(s_r.state_dict())
    run(warm, x_w, s_w, total - n)
    run(after, x_r, s_after, total - n)
    assert torch.equal(x_w, x_r)
    for name, tensor in s_w.tensors.items():
        assert torch.equal(tensor, s_after.tensors[name]), name
