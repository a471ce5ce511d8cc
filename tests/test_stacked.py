"""The stacked-layer interpreter (saef.backends.stacked) against a plain loop over workers and against vmap."""

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saef
from saef.zoo.models import build_model
from saef.backends.stacked import stack_model


def model_zoo(name, seed=0):
    torch.manual_seed(seed)
    if name == "cnn1d":
        return build_model("cnn1d", SimpleNamespace(num_classes=10, input_shape=(1, 40)))
    if name == "mlp":
        return build_model("mlp", SimpleNamespace(num_classes=10, input_shape=(1, 40)), width=16)
    if name == "resnet":
        return build_model("resnet20", SimpleNamespace(num_classes=10, input_shape=(3, 8, 8)), width=4)
    raise KeyError(name)


SHAPES = {"cnn1d": (1, 40), "mlp": (1, 40), "resnet": (3, 8, 8)}


def run(name, vectorize, steps=3, workers=3, compressor="topk:0.2"):
    sim = saef.Simulator(model_zoo(name), workers=workers, compressor=compressor, momentum=0.9, vectorize=vectorize)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inputs = torch.randn(6 * workers, *SHAPES[name], generator=g)
        targets = torch.randint(0, 10, (6 * workers,), generator=g)
        sim.step(inputs, targets, lr=0.05)
    return sim


@pytest.mark.parametrize("name", ["cnn1d", "mlp", "resnet"])
def test_stacked_gradients_equal_a_loop_over_workers(name):
    """Three steps with the stacked interpreter give the parameters, per-worker running statistics and bit
    counts of the per-worker loop (which runs the unmodified model), and of vmap."""
    stacked = run(name, True)
    assert stacked.stacked is not None, "the zoo model should be supported by the stacked interpreter"
    for other in (run(name, False), run(name, "vmap")):
        assert torch.allclose(stacked.x, other.x, rtol=1e-5, atol=1e-6)
        for key in stacked.buffers:
            assert torch.allclose(stacked.buffers[key].double(), other.buffers[key].double(), atol=1e-5), key
        assert stacked.bits == other.bits


def test_supported_odd_layers_match_the_model():
    """Grouped/dilated/bias-free convolutions, BatchNorm1d, Conv2d, view, size, mean, sum and indexing give
    each worker exactly the model's own output at its own parameters."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3, padding=0, dilation=2, groups=2, bias=False)
            self.bn = nn.BatchNorm1d(4)
            self.conv2 = nn.Conv1d(4, 6, 3, padding=1)
            self.conv3 = nn.Conv2d(1, 3, 3, padding=1)
            self.head = nn.Linear(6, 5)

        def forward(self, x):
            h = F.gelu(self.bn(self.conv(x)))
            h = torch.tanh(self.conv2(h)).mean(-1)  # (N, 6)
            image = x[:, :1].view(x.size(0), 1, 2, -1)  # (N, 1, 2, 8)
            g = F.relu(self.conv3(image)).flatten(2).sum(dim=2)  # (N, 3)
            return self.head(h) + g.sum(1, keepdim=True)

    torch.manual_seed(0)
    model = Odd()
    stacked = stack_model(model)
    assert stacked is not None
    k = 3
    params = {n: p.detach() + 0.1 * torch.randn(k, *p.shape) for n, p in model.named_parameters()}
    buffers = {n: b.unsqueeze(0).repeat(k, *[1] * b.dim()) for n, b in model.named_buffers()}
    inputs = torch.randn(k, 5, 2, 16)
    out = stacked(params, buffers, inputs)
    for w in range(k):
        reference = Odd()
        reference.load_state_dict({**{n: p[w] for n, p in params.items()}, **{n: b for n, b in model.state_dict().items() if n not in params}})
        expected = reference(inputs[w])
        assert torch.allclose(out[w], expected, atol=1e-5)
        assert torch.allclose(buffers["bn.running_mean"][w], reference.bn.running_mean, atol=1e-6)


def test_unsupported_models_fall_back_to_vmap():
    """A layer the interpreter does not know (here a sort) is not stacked; the
    simulator then uses vmap and still trains."""

    class Sorted(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(40, 10)

        def forward(self, x):
            return self.linear(torch.sort(x.flatten(1), dim=1).values)

    assert stack_model(Sorted()) is None
    sim = saef.Simulator(Sorted(), workers=2, compressor="sign")
    assert sim.stacked is None
    sim.step(torch.randn(4, 1, 40), torch.randint(0, 10, (4,)), lr=0.1)


def test_reduction_over_all_dimensions_is_not_stacked():
    """A mean over every dimension would mix the workers: such a model is left to vmap."""

    class Global(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x) - self.linear(x).mean()

    assert stack_model(Global()) is None


def test_im2col_backward_matches_autograd():
    """The hand-written backward of the 1-D im2col equals the numerical gradient (float64 gradcheck)."""
    from saef.backends.stacked import _Im2Col1d

    x = torch.randn(2, 3, 4, 11, dtype=torch.float64, requires_grad=True)
    for width, stride in ((5, 2), (3, 1), (2, 3)):
        assert torch.autograd.gradcheck(lambda t: _Im2Col1d.apply(t, width, stride), (x,))


def test_flatten_without_start_dim_keeps_workers_apart():
    """``x.flatten()`` of one worker flattens its whole tensor; stacked, each worker's row stays its own."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 6)

        def forward(self, x):
            return self.linear(x).flatten().view(2, -1) + torch.flatten(x).view(2, -1)

    torch.manual_seed(0)
    model = Flat()
    stacked = stack_model(model)
    assert stacked is not None
    params = {n: p.detach() + 0.1 * torch.randn(3, *p.shape) for n, p in model.named_parameters()}
    inputs = torch.randn(3, 2, 6)
    out = stacked(params, {}, inputs)
    for w in range(3):
        reference = Flat()
        reference.load_state_dict({n: p[w] for n, p in params.items()})
        assert torch.allclose(out[w], reference(inputs[w]), atol=1e-6)


def test_runtime_failure_falls_back_to_vmap_with_statistics_intact(monkeypatch):
    """If the stacked run fails after BatchNorm has run (here: the final Linear raises), the simulator
    warns, uses vmap from then on, and ends with exactly the statistics and parameters of a vmap run."""
    import saef.backends.stacked as stacked_module

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 5))

    def broken(module, params, x):
        raise RuntimeError("broken on purpose")

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 1, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
    reference = saef.Simulator(model(), workers=2, compressor="sign", vectorize="vmap")
    for inputs, targets in data:
        reference.step(inputs, targets, lr=0.1)
    monkeypatch.setitem(stacked_module._LAYERS, nn.Linear, broken)
    sim = saef.Simulator(model(), workers=2, compressor="sign")
    with pytest.warns(UserWarning, match="broken on purpose"):
        for inputs, targets in data:
            sim.step(inputs, targets, lr=0.1)
    assert sim.stacked is None
    assert torch.equal(sim.x, reference.x)
    for name in reference.buffers:
        assert torch.equal(sim.buffers[name], reference.buffers[name]), name


def _each_worker_matches(model_class, inputs, k=3):
    """Run the stacked interpreter on k perturbed copies and compare with the model itself, per worker."""
    torch.manual_seed(0)
    model = model_class()
    stacked = stack_model(model)
    assert stacked is not None
    params = {n: p.detach() + 0.1 * torch.randn(k, *p.shape) for n, p in model.named_parameters()}
    out = stacked(params, {}, inputs)
    for w in range(k):
        reference = model_class()
        reference.load_state_dict({n: p[w] for n, p in params.items()})
        assert torch.allclose(out[w], reference(inputs[w]), atol=1e-5)


def test_lower_rank_operands_broadcast_as_in_the_model():
    """``h - h.mean(0)`` and ``h + h[0]`` broadcast a lower-rank tensor from the right; stacked, they must
    not pair the worker axis with the batch axis (K == N here, where a wrong pairing would not raise)."""

    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            return (h - h.mean(0)) + h[0] * 0.5

    _each_worker_matches(Centered, torch.randn(3, 3, 4))


def test_conv1d_output_can_be_viewed():
    """A Conv1d output followed by ``view(size(0), -1)`` (common in 1-D CNNs) runs stacked."""

    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 10, 2)

        def forward(self, x):
            h = self.conv(x)
            return self.fc(h.view(h.size(0), -1))

    _each_worker_matches(Viewed, torch.randn(3, 5, 1, 10))


def test_models_traced_in_eval_mode_still_train_with_dropout():
    """A forward that passes self.training to F.dropout is traced in train mode (the simulator's mode),
    whatever mode the model was in; the model's own mode is restored."""

    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(50, 50)

        def forward(self, x):
            return F.dropout(self.fc(x), 0.5, self.training)

    model = Drop().eval()
    stacked = stack_model(model)
    assert not model.training
    params = {n: p.detach().expand(2, *p.shape) for n, p in model.named_parameters()}
    out = stacked(params, {}, torch.randn(2, 4, 50))
    assert (out == 0).float().mean() > 0.3


def test_models_with_hooks_are_not_stacked():
    """Forward hooks would not run on the traced layers, so such a model is left to vmap."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    model[0].register_forward_hook(lambda module, args, output: output * 2)
    assert stack_model(model) is None


def test_cross_entropy_fast_path_honours_ignore_index():
    """The simulator's one-kernel cross entropy averages over targets that are not -100, as
    F.cross_entropy does, so its losses equal the per-worker loop's."""
    losses = []
    for vectorize in (True, False):
        torch.manual_seed(0)
        sim = saef.Simulator(nn.Sequential(nn.Flatten(), nn.Linear(40, 10)), workers=2, compressor="sign", vectorize=vectorize)
        targets = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
        targets[[0, 1, 5]] = -100
        losses.append(sim.step(torch.randn(8, 1, 40, generator=torch.Generator().manual_seed(1)), targets, lr=0.1))
        assert (sim.stacked is not None) == vectorize
    assert torch.allclose(losses[0], losses[1])


def test_indexing_with_a_tensor_falls_back_to_vmap():
    """A forward that indexes with a tensor is left to vmap, which gives the per-worker loop's result."""

    class Picked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(40, 10)

        def forward(self, x):
            h = self.fc(x.flatten(1))
            return h[torch.arange(h.size(0))]

    runs = []
    for vectorize in ("auto", False):
        torch.manual_seed(0)
        sim = saef.Simulator(Picked(), workers=2, compressor="sign", vectorize=vectorize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sim.step(torch.randn(8, 1, 40, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10, lr=0.1)
        runs.append(sim.x)
    assert torch.allclose(runs[0], runs[1], atol=1e-6)
