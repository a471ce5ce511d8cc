"""Local steps (saef.core.rounds): every rule of the family against a float64 reference written from its
definition, H = 1 against the per-step rules, inner SGD and AdamW against torch.optim's over rounds, state
that round-trips mid-round, and clear refusals."""

import sys
from pathlib import Path

import pytest
import torch

import saef
from saef import Algorithm, AlgorithmConfig, InProcessTransport
from saef.core import flatten, unflatten

sys.path.insert(0, str(Path(__file__).parent))
from _problems import quadratic_problem  # noqa: E402

SHAPES = [(3, 4), (7,), (1,)]
K, H, ROUNDS, LR = 3, 4, 6, 0.05


def per_layer(spec, vectors):
    """C applied to each layer of each flat vector (the compressors act layer-wise)."""
    compressor = saef.make_compressor(spec)
    return [flatten([compressor.compress(part) for part in unflatten(v, SHAPES)]) for v in vectors]


class ReferenceSGD:
    """torch.optim.SGD's step written out: d = g + wd y; b = mu b + d (b = d first); y -= lr d."""

    def __init__(self, mu, wd):
        self.mu, self.wd, self.b = mu, wd, None

    def step(self, y, g, lr):
        d = g + self.wd * y
        if self.mu:
            self.b = d.clone() if self.b is None else self.mu * self.b + d
            d = self.b
        return y - lr * d


class ReferenceAdamW:
    """torch.optim.AdamW's step written out, with bias correction."""

    def __init__(self, betas, eps, wd):
        (self.b1, self.b2), self.eps, self.wd, self.t, self.m, self.v = betas, eps, wd, 0, 0.0, 0.0

    def step(self, y, g, lr):
        self.t += 1
        y = y * (1 - lr * self.wd)
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        m_hat, v_hat = self.m / (1 - self.b1 ** self.t), self.v / (1 - self.b2 ** self.t)
        return y - lr * m_hat / (v_hat.sqrt() + self.eps)


def reference_rounds(grad_fn, x0, *, method, compressor, double_way, inner, outer_lr, outer_momentum, nesterov,
                     error_decay, average_every, rounds=ROUNDS, local_steps=H):
    """The definitions of the issue, round by round, per worker, in float64 (see saef.core.rounds)."""
    x = flatten(x0).clone()
    e = [torch.zeros_like(x) for _ in range(K)]
    e_s, u = torch.zeros_like(x), torch.zeros_like(x)
    optimizers = [inner() for _ in range(K)]
    for r in range(rounds):
        if average_every is not None and r > 0 and (r + 1) % average_every == 0:
            mean = torch.stack(e).mean(0)
            e = [mean.clone() for _ in range(K)]
        c = []
        for k in range(K):
            start = x - outer_lr * error_decay * e[k] if method == "saef" else x.clone()
            y = start.clone()
            for _ in range(local_steps):
                y = optimizers[k].step(y, flatten(grad_fn(k, unflatten(y, SHAPES))), LR)
            delta = start - y
            if method == "direct":
                c.append(per_layer(compressor, [delta])[0])
            else:
                d_k = error_decay * e[k] + delta
                c.append(per_layer(compressor, [d_k])[0])
                e[k] = d_k - c[-1]
        g = torch.stack(c).mean(0)
        if double_way and method == "direct":  # (no feedback: the server's compression error is dropped too)
            g = per_layer(compressor, [g])[0]
        elif double_way:
            d = e_s + g
            g = per_layer(compressor, [d])[0]
            e_s = d - g
        if outer_momentum:
            u = outer_momentum * u + g
            step = g + outer_momentum * u if nesterov else u
        else:
            step = g
        x = x - outer_lr * step
    return x


CASES = [  # (method, compressor, double_way, inner optimizer, outer_lr, outer momentum, nesterov, error_decay, p)
    ("saef", "topk:0.25", True, "sgd", 1.0, 0.0, False, 1.0, None),
    ("saef", "sign", False, "adamw", 0.7, 0.9, True, 0.95, 2),
    ("ef", "topk:0.25", True, "sgd", 0.7, 0.9, True, 0.95, None),
    ("ef", "sign", True, "adamw", 1.0, 0.5, False, 1.0, 3),
    ("direct", "identity", False, "sgd", 0.7, 0.9, True, 1.0, None),  # DiLoCo
    ("direct", "topk:0.25", True, "adamw", 0.5, 0.0, False, 1.0, None),
]


@pytest.mark.parametrize("method,compressor,double_way,inner,outer_lr,mu,nesterov,decay,p", CASES)
def test_local_steps_follow_their_definition(method, compressor, double_way, inner, outer_lr, mu, nesterov, decay, p):
    """saef.simulate with local_steps = 4 returns, after 6 rounds of 3 workers in float64, the parameters of the
    definitions written out by hand (allclose 1e-10): each rule, both inner optimizers, outer momentum with and
    without Nesterov, error decay and error averaging."""
    grad_fn, x0 = quadratic_problem(K, SHAPES)
    momentum, wd = (0.9, 1e-3) if inner == "sgd" else (0.0, 1e-2)
    settings = dict(method=method, compressor=compressor, double_way=double_way, inner_optimizer=inner, outer_lr=outer_lr,
                    outer_momentum=mu, nesterov=nesterov, error_decay=decay, average_every=p, momentum=momentum,
                    weight_decay=wd)
    got = saef.simulate(grad_fn, x0, workers=K, steps=H * ROUNDS, lr=LR, local_steps=H, **settings)
    make = (lambda: ReferenceSGD(momentum, wd)) if inner == "sgd" else (lambda: ReferenceAdamW((0.9, 0.999), 1e-8, wd))
    want = reference_rounds(grad_fn, x0, method=method, compressor=compressor, double_way=double_way, inner=make,
                            outer_lr=outer_lr, outer_momentum=mu, nesterov=nesterov, error_decay=decay, average_every=p)
    assert torch.allclose(flatten(got), want, rtol=0, atol=1e-10), (flatten(got) - want).abs().max()
    assert not torch.allclose(flatten(got), flatten(x0))  # (it moved)


@pytest.mark.parametrize("method", ["saef", "ef", "direct"])
@pytest.mark.parametrize("compressor,double_way,p", [("topk:0.25", True, 3), ("sign", False, None), ("identity", True, None)])
def test_one_local_step_is_the_per_step_rule(method, compressor, double_way, p):
    """H = 1, inner SGD without momentum, outer_lr 1, no outer momentum: each rule is its per-step form with
    momentum 0 (equal up to float64 rounding: delta_k = z - (z - lr g) is lr g to within an ulp)."""
    if method == "direct" and p is not None:
        p = None
    grad_fn, x0 = quadratic_problem(K, SHAPES)
    settings = dict(workers=K, steps=30, lr=LR, method=method, compressor=compressor, double_way=double_way, average_every=p)
    per_step = saef.simulate(grad_fn, x0, momentum=0.0, **settings)
    rounds = saef.simulate(grad_fn, x0, local_steps=1, **settings)
    assert torch.allclose(flatten(rounds), flatten(per_step), rtol=0, atol=1e-12)


@pytest.mark.parametrize("inner,make", [
    ("sgd", lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-3)),
    ("adamw", lambda params: torch.optim.AdamW(params, lr=LR, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
])
def test_inner_optimizers_are_torch_optims(inner, make):
    """K = 1, identity compressor, outer_lr 1, no outer momentum: rounds of H = 4 inner steps are just the inner
    optimizer's steps, so x after 5 rounds equals torch.optim.SGD's / AdamW's parameters after 20 steps, in
    float32 (allclose 1e-6): their state persists across rounds."""
    grad_fn, x0 = quadratic_problem(1, SHAPES, dtype=torch.float32)
    params = [t.clone().requires_grad_(True) for t in x0]
    optimizer = make(params)
    for _ in range(20):
        for p_, g in zip(params, grad_fn(0, [p_.detach() for p_ in params])):
            p_.grad = g.clone()
        optimizer.step()
    group = optimizer.param_groups[0]
    settings = dict(momentum=0.9, weight_decay=1e-3) if inner == "sgd" else dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)
    got = saef.simulate(grad_fn, x0, workers=1, steps=20, lr=group["lr"], local_steps=4, inner_optimizer=inner,
                        method="direct", compressor="identity", **settings)
    want = flatten([p_.detach() for p_ in params])
    assert torch.allclose(flatten(got), want, rtol=0, atol=1e-6), (flatten(got) - want).abs().max()


def test_state_round_trips_mid_round():
    """A state saved in the middle of a round (2 of 4 inner steps taken) and loaded into a fresh algorithm
    continues bit-identically: the iterates, the inner optimizer's moments, the position in the round and its
    step count are all in the state."""
    grad_fn, x0 = quadratic_problem(K, SHAPES)
    config = AlgorithmConfig(method="saef", compressor="topk:0.25", local_steps=4, inner_optimizer="adamw", outer_lr=0.7,
                             outer_momentum=0.9, nesterov=True, error_decay=0.95, average_every=2)

    def run(algorithm, state, x, steps):
        for _ in range(steps):
            z = algorithm.gradient_points(state, x)
            algorithm.step(state, x, torch.stack([flatten(grad_fn(k, unflatten(z[k], SHAPES))) for k in range(K)]), LR)

    whole = Algorithm(SHAPES, config, InProcessTransport(K))
    x = flatten(x0).clone()
    state = whole.init_state(x)
    run(whole, state, x, 10)
    saved, saved_x = state.state_dict(), x.clone()
    assert saved["round_position"] == 2 and saved["inner_steps"] == 10 and saved["step"] == 2
    run(whole, state, x, 14)
    again = Algorithm(SHAPES, config, InProcessTransport(K))
    y = saved_x.clone()
    other = again.init_state(y)
    other.load_state_dict(saved)
    run(again, other, y, 14)
    assert torch.equal(x, y)
    assert all(torch.equal(state.tensors[n], other.tensors[n]) for n in state.tensors)


@pytest.mark.parametrize("settings,message", [
    (dict(local_steps=0), "local_steps must be an integer in \\[1"),
    (dict(local_steps=2, method="ef21"), "local steps are defined for the rules ef, saef and direct"),
    (dict(local_steps=2, optimizer="adam"), "with local steps the workers' optimizer is inner_optimizer"),
    (dict(local_steps=2, inner_optimizer="lion"), "inner_optimizer must be 'sgd' or 'adamw'"),
    (dict(local_steps=2, outer_lr=0.0), "outer_lr must be > 0"),
    (dict(local_steps=2, nesterov=True), "nesterov=True needs outer_momentum > 0"),
    (dict(local_steps=2, inner_optimizer="adamw", momentum=0.9), "inner_optimizer 'adamw' takes betas"),
    (dict(outer_lr=0.7), "outer_lr=0.7 applies with local steps"),
    (dict(inner_optimizer="adamw"), "inner_optimizer='adamw' applies with local steps"),
    (dict(error_decay=1.5), "error_decay must be in \\(0, 1\\]"),
    (dict(error_decay=0.9, method="direct"), "error_decay applies to the rules that keep a worker error"),
])
def test_bad_local_step_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**{"compressor": "sign", **settings})


def test_local_steps_are_not_cut_into_buckets():
    algorithm = Algorithm(SHAPES, AlgorithmConfig(compressor="sign", local_steps=2), InProcessTransport(2))
    with pytest.raises(ValueError, match="cannot be cut into parts"):
        algorithm.part(range(1))


def test_saef_train_records_rounds_and_counts_bits_per_exchange(tmp_path):
    """saef train --local-steps 4: the records count the rounds (16 steps an epoch: 4 rounds), the bits grow
    by one exchange per round (a quarter of the per-step run's, whose every step exchanges; the bits per round
    are the per-step run's bits per step), and the overlay
    plot draws the upper panels against rounds."""
    from saef.app.cli import main
    from saef.app.plots import runs_figure
    from saef.app.records import read_metrics

    fast = ["train", "--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--epochs", "2", "--quiet"]
    assert main([*fast, "--local-steps", "4", "--output", str(tmp_path / "rounds")]) == 0
    assert main([*fast, "--output", str(tmp_path / "steps")]) == 0
    rounds, steps = read_metrics(tmp_path / "rounds"), read_metrics(tmp_path / "steps")
    assert [r["rounds"] for r in rounds] == [4, 8] and [r["rounds"] for r in steps] == [16, 32]
    assert rounds[1]["bits_up"] == 2 * rounds[0]["bits_up"] > 0
    assert 4 * rounds[1]["bits_up"] == steps[1]["bits_up"] and 4 * rounds[1]["bits_down"] == steps[1]["bits_down"]
    one = rounds[1]  # bits per round: the same exchange either way
    assert one["bits_per_round"] == (one["bits_up"] + one["bits_down"] + one["bits_averaging"]) / 8 == steps[1]["bits_per_round"]
    figure = runs_figure([tmp_path / "rounds", tmp_path / "steps"])
    assert figure.axes[0].get_xlabel().startswith("rounds") and figure.axes[2].get_xlabel().startswith("bits")


def test_the_optimizer_takes_local_steps():
    """saef.SAEF(local_steps=4, inner_optimizer="adamw") with the identity compressor in one process is
    torch.optim.AdamW (allclose 1e-6 after 12 steps: 3 rounds); with top-k and SAEF it equals the simulator
    with one worker, and its state saved mid-round and loaded into a new optimizer continues exactly."""
    from torch import nn
    import torch.nn.functional as F

    from _problems import tiny_mlp

    def batches(n):
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]

    def train(model, opt, data):
        for inputs, targets in data:
            opt.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            opt.step()

    adamw = dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)
    model, reference, counted = tiny_mlp(), tiny_mlp(), tiny_mlp()
    train(model, saef.SAEF(model.parameters(), lr=0.01, local_steps=4, inner_optimizer="adamw", method="direct",
                           compressor="identity", **adamw), batches(12))
    train(reference, torch.optim.AdamW(reference.parameters(), lr=0.01, **adamw), batches(12))
    opt = saef.SAEF(counted.parameters(), lr=0.01, local_steps=4, inner_optimizer="adamw")
    train(counted, opt, batches(13))
    assert opt.rounds == 3  # exchanges so far (the 13th step began the fourth round)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)

    settings = dict(local_steps=4, inner_optimizer="adamw", compressor="topk:0.25", outer_lr=0.7, outer_momentum=0.9,
                    nesterov=True, error_decay=0.95, **adamw)
    model = tiny_mlp()
    opt = saef.SAEF(model.parameters(), lr=0.01, **settings)
    train(model, opt, batches(6))
    saved = opt.state_dict()
    train(model, opt, batches(12)[6:])
    sim = saef.Simulator(tiny_mlp(), workers=1, **settings)
    for inputs, targets in batches(12):
        sim.step(inputs, targets, lr=0.01)
    assert torch.allclose(opt.x, sim.x, rtol=0, atol=1e-6) and opt.bits == sim.bits
    again_model = tiny_mlp()
    again = saef.SAEF(again_model.parameters(), lr=0.01, **settings)
    again.load_state_dict(saved)
    train(again_model, again, batches(12)[6:])
    assert torch.equal(again.x, opt.x)
    assert [torch.equal(a, b) for a, b in zip(again_model.parameters(), model.parameters())] == [True] * 4
    with pytest.raises(ValueError, match="local_steps"):
        saef.SAEF(tiny_mlp().parameters(), lr=0.01, **{**settings, "local_steps": 2}).load_state_dict(saved)
