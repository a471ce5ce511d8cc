"""The local optimizer ``adam`` (compressed-momentum Adam; 1-bit Adam with ef, SAEF-Adam with saef) against
references written here in plain torch, one worker and one step at a time, from the rule as stated in
:class:`saef.core.local.Adam`."""

import math
import warnings

import pytest
import torch

import saef

SHAPES = [(3,), (2, 4)]  # two layers: the compressors act on each separately
K = 3


def gradient(k, t, point):
    """Worker k's gradient at ``point`` (a list shaped like SHAPES) in step t: a_k * z - b_k plus noise,
    with one coordinate whose gradient is always zero (v stays 0 there)."""
    g = torch.Generator().manual_seed(100 * t + k)
    out = []
    for z in point:
        a = torch.rand(z.shape, generator=g, dtype=torch.float64) + 0.5
        b = torch.randn(z.shape, generator=g, dtype=torch.float64)
        out.append(a * z - b + 0.1 * torch.randn(z.shape, generator=g, dtype=torch.float64))
    out[1].view(-1)[0] = 0.0
    return out


def start():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def scaled_sign(v):
    """(||v||_1 / d) sign(v), sign(0) = +1, on one layer."""
    return v.abs().sum() / v.numel() * torch.where(v >= 0, 1.0, -1.0).to(v.dtype)


def identity(v):
    return v.clone()


def reference(method, compress, double_way, average_every, warmup, steps, lr, betas=(0.9, 0.99), eps=1e-3, wd=0.01,
              workers=K):
    """The rule of the issue, layer by layer and worker by worker: full-precision Adam (without bias
    correction) for ``warmup`` steps (all of them when ``warmup`` is None), then v frozen and the momentum
    compressed with error feedback; SAEF's point is x - lr_{t-1} e_k / (sqrt(v) + eps). ``betas`` and
    ``lr(t)`` may give one value per layer."""
    K = workers
    layers = range(len(SHAPES))
    b1 = [b[0] for b in betas] if isinstance(betas, list) else [betas[0]] * len(SHAPES)
    b2 = [b[1] for b in betas] if isinstance(betas, list) else [betas[1]] * len(SHAPES)
    x = start()
    m = [torch.zeros_like(p) for p in x]
    v = [torch.zeros_like(p) for p in x]
    last_lr = [0.0] * len(SHAPES)
    e = [[torch.zeros_like(p) for p in x] for _ in range(K)]
    e_s = [torch.zeros_like(p) for p in x]
    for t in range(steps):
        rate = lr(t) if isinstance(lr(t), list) else [lr(t)] * len(SHAPES)
        if average_every is not None and (t + 1) % average_every == 0:
            mean = [sum(e[k][i] for k in range(K)) / K for i in range(len(x))]
            e = [[t_.clone() for t_ in mean] for _ in range(K)]
        if warmup is None or t < warmup:
            grads = [gradient(k, t, x) for k in range(K)]
            for i in range(len(x)):
                g = sum(grads[k][i] for k in range(K)) / K
                m[i] = b1[i] * m[i] + (1 - b1[i]) * g
                v[i] = b2[i] * v[i] + (1 - b2[i]) * g * g
        else:
            sent = []
            for k in range(K):
                if method == "saef":
                    z = [x[i] - last_lr[i] * e[k][i] / (v[i].sqrt() + eps) for i in layers]
                else:
                    z = x
                g = gradient(k, t, z)
                row = []
                for i in range(len(x)):
                    m_k = b1[i] * m[i] + (1 - b1[i]) * g[i]
                    d_k = m_k + (e[k][i] if method != "direct" else 0)
                    c = compress(d_k)
                    if method != "direct":
                        e[k][i] = d_k - c
                    row.append(c)
                sent.append(row)
            for i in range(len(x)):
                mean = sum(sent[k][i] for k in range(K)) / K
                if double_way:
                    d = mean + (e_s[i] if method != "direct" else 0)
                    c = compress(d)
                    if method != "direct":
                        e_s[i] = d - c
                    m[i] = c
                else:
                    m[i] = mean
        for i in range(len(x)):
            x[i] = x[i] - rate[i] * (m[i] / (v[i].sqrt() + eps) + wd * x[i])
        last_lr = rate
    return x


def simulate(method, compressor, double_way, average_every, warmup, steps, lr):
    """saef.simulate with the test's gradients (which depend on the step: counted through the calls)."""
    calls = {"n": 0}

    def grad_fn(k, z):
        t = calls["n"] // K
        calls["n"] += 1
        return gradient(k, t, z)

    return saef.simulate(grad_fn, start(), workers=K, steps=steps, lr=lr, method=method, optimizer="adam",
                         betas=(0.9, 0.99), eps=1e-3, weight_decay=0.01, compressor=compressor,
                         double_way=double_way, average_every=average_every, warmup_steps=warmup)


def schedule(t):
    return 0.05 if t < 6 else 0.02  # a decay inside the compressed phase


@pytest.mark.parametrize("method", ["ef", "saef", "direct"])
@pytest.mark.parametrize("double_way", [False, True])
@pytest.mark.parametrize("warmup", [0, 3])
def test_identity_compressor_is_plain_adam(method, double_way, warmup):
    """With the identity compressor, every rule with optimizer adam is plain Adam without bias correction
    and with decoupled weight decay (v updated every step, whatever the warm-up), to float64 rounding."""
    got = simulate(method, "identity", double_way, None, warmup, 12, schedule)
    want = reference(method, identity, double_way, None, None, 12, schedule)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (a - b).abs().max()


@pytest.mark.parametrize("method,double_way,average_every", [
    ("ef", True, None), ("ef", False, None), ("saef", True, None), ("saef", True, 3), ("saef", False, 2),
    ("direct", True, None),
])
def test_compressed_adam_follows_the_stated_rule(method, double_way, average_every):
    """Scaled sign after a 3-step warm-up, with an lr decay after it: the parameters after 12 steps equal the
    reference (worker errors, server error, error averaging every p steps counted from step 0, frozen v,
    SAEF's point x - lr e_k / (sqrt(v) + eps)) to float64 rounding."""
    got = simulate(method, "sign", double_way, average_every, 3, 12, schedule)
    want = reference(method, scaled_sign, double_way, average_every, 3, 12, schedule)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()


def test_the_reference_tells_the_rules_apart():
    """The rule test can fail: SAEF's point, error averaging and the frozen v each change the result."""
    base = reference("ef", scaled_sign, True, None, 3, 12, schedule)
    for other in (reference("saef", scaled_sign, True, None, 3, 12, schedule),
                  reference("ef", scaled_sign, True, 2, 3, 12, schedule),
                  reference("ef", scaled_sign, True, None, 5, 12, schedule)):
        assert not torch.allclose(base[1], other[1], rtol=1e-6)


def test_v_freezes_and_errors_start_at_zero_when_the_warmup_ends():
    """Through the warm-up the errors stay exactly zero and v moves; from the first compressed step on, v
    does not change."""
    config = saef.AlgorithmConfig(method="saef", optimizer="adam", compressor="topk:0.3", warmup_steps=4)
    algorithm = saef.Algorithm(SHAPES, config, saef.InProcessTransport(K))
    x = torch.cat([p.reshape(-1) for p in start()])
    state = algorithm.init_state(x)
    history = []
    for t in range(8):
        z = algorithm.gradient_points(state, x)
        shapes = [math.prod(s) for s in SHAPES]
        grads = torch.stack([torch.cat([g.reshape(-1) for g in gradient(k, t, list(z[k].split(shapes)))]) for k in range(K)])
        algorithm.step(state, x, grads, lr=0.01)
        history.append((state.second_moment.clone(), state.worker_error.abs().max().item()))
    assert all(err == 0 for _, err in history[:4])
    assert history[4][1] > 0
    assert not torch.equal(history[2][0], history[3][0])
    assert all(torch.equal(history[3][0], v) for v, _ in history[4:])


@pytest.mark.parametrize("settings,message", [
    (dict(optimizer="adam", method="ef21"), "method 'ef21' is defined with the optimizers sgd"),
    (dict(optimizer="adam", momentum=0.9), "momentum=0.9 is momentum SGD's"),
    (dict(optimizer="adam", betas=(0.9, 1.0)), "betas must be two numbers in [0, 1)"),
    (dict(optimizer="adam", betas=(0.9,)), "betas must be two numbers"),
    (dict(optimizer="adam", eps=0.0), "eps must be a finite number > 0"),
    (dict(betas=(0.9, 0.99)), "betas=(0.9, 0.99) is Adam's"),
    (dict(eps=1e-8), "eps=1e-08 is Adam's"),
    (dict(optimizer="lamb"), "optimizer must be one of sgd, adam"),
])
def test_bad_adam_settings_are_refused(settings, message):
    """Each bad setting raises ValueError naming it."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        saef.AlgorithmConfig(**settings)


def test_adam_defaults_and_the_warning_without_warmup():
    """Adam's defaults are (0.9, 0.999) and 1e-8; compressing without a warm-up (v never leaves zero) warns,
    nothing compressed does not."""
    with pytest.warns(UserWarning, match="never updates v"):
        config = saef.AlgorithmConfig(optimizer="adam")
    assert (config.betas, config.eps) == ((0.9, 0.999), 1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saef.AlgorithmConfig(optimizer="adam", compressor="identity")
        saef.AlgorithmConfig(optimizer="adam", compressor="sign", warmup_steps=10)


def test_facade_with_parameter_groups_follows_the_rule():
    """saef.SAEF(optimizer="adam") in a user's loop, one worker, two parameter groups with their own lr and
    betas (SAEF, sign, warm-up 3, a StepLR on top): the parameters equal the reference with per-layer values."""
    params = [torch.nn.Parameter(p.clone()) for p in start()]
    opt = saef.SAEF([{"params": [params[0]], "betas": (0.8, 0.95)}, {"params": [params[1]], "lr": 0.02}], lr=0.05,
                    optimizer="adam", betas=(0.9, 0.99), eps=1e-3, weight_decay=0.01, compressor="sign", warmup_steps=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=6, gamma=0.5)
    for t in range(12):
        opt.zero_grad()
        for p, g in zip(params, gradient(0, t, [p.detach() for p in params])):
            p.grad = g
        opt.step()
        sched.step()
    opt.write_x()
    want = reference("saef", scaled_sign, True, None, 3, 12, lambda t: [0.05 * 0.5 ** (t // 6), 0.02 * 0.5 ** (t // 6)],
                     betas=[(0.8, 0.95), (0.9, 0.99)], workers=1)
    for p, w in zip(params, want):
        assert torch.allclose(p.detach(), w, rtol=1e-10, atol=1e-12), (p.detach() - w).abs().max()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _steps(sim, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        sim.step(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g), lr=1e-3)


def test_a_reset_keeps_v_and_a_reset_without_v_after_the_warmup_is_refused():
    """reset_errors zeroes Adam's momentum and the errors but keeps v (only full-precision steps update it);
    a reset that has no v to keep (a momentum-SGD state) after the warm-up is refused, naming the step."""
    sim = saef.Simulator(_model(), workers=2, optimizer="adam", compressor="sign", warmup_steps=3, eps=1e-3)
    _steps(sim, 6)
    saved = sim.state_dict()
    again = saef.Simulator(_model(), workers=2, optimizer="adam", compressor="topk:0.5", warmup_steps=3, eps=1e-3)
    again.load_state_dict(saved, reset_errors=True)
    assert torch.equal(again.state.second_moment, sim.state.second_moment) and bool(again.state.second_moment.any())
    assert not again.state.momentum.any() and not again.state.worker_error.any() and again.state.step == 6
    sgd = saef.Simulator(_model(), workers=2, compressor="sign", momentum=0.9)
    _steps(sgd, 6)
    with pytest.raises(ValueError, match="cannot start a reset of the errors that has no v to keep at step 6"):
        again.load_state_dict(sgd.state_dict(), reset_errors=True)
    longer = saef.Simulator(_model(), workers=2, optimizer="adam", compressor="sign", warmup_steps=10, eps=1e-3)
    longer.load_state_dict(sgd.state_dict(), reset_errors=True)  # its warm-up is not over: v will be filled
    _steps(longer, 5)
    assert bool(longer.state.second_moment.any())


def test_facade_adds_groups_during_the_warmup_only():
    """add_param_group with Adam works while the warm-up runs; afterwards it is refused (the new layers' v
    would stay 0)."""
    model = _model()
    opt = saef.SAEF(model[0].parameters(), lr=1e-3, optimizer="adam", compressor="sign", warmup_steps=2)
    x = torch.randn(8, 4)
    for step in range(3):
        if step == 1:
            opt.add_param_group({"params": model[2].parameters()})
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="cannot start new layers at step 3"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 2
