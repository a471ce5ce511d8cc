"""The step overlapped with backward (saef.core.overlap) in one process, against the plain step: buckets,
bit-identical results, buckets sent before backward ends, and a NaN that changes nothing. Across gloo
processes: tests/test_distributed.py."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saef import Algorithm, AlgorithmConfig, InProcessTransport
from saef.core import NonFiniteStep, Pending, flatten
from saef.core.overlap import OverlappedStep, make_buckets

CASES = [
    dict(method="saef", compressor="sign", average_every=2, momentum=0.9, weight_decay=1e-3),
    dict(method="ef", compressor="topk:0.2", double_way=False, momentum=0.9),
    dict(method="ef21", compressor="topk:0.2", momentum=0.9),
    dict(method="direct", compressor="randk:0.3", momentum=0.5),  # random draws derive from layer ids
    dict(method="saef", compressor="powersgd:2", momentum=0.9),  # compressor state per sender
    dict(method="saef", compressor="sign", optimizer="adam", betas=(0.9, 0.99), eps=1e-3, warmup_steps=3),
    dict(method="ef", compressor="identity", double_way=False, momentum=0.9),
]


def test_buckets_cover_the_layers_last_first_within_the_cap():
    """Hand-computed: layers of 4-byte elements cut from the last one back at 40 bytes; a layer over the cap
    is a bucket of its own; every layer once, each bucket ascending and consecutive."""
    sizes = [3, 20, 2, 5, 1, 4]
    assert make_buckets(sizes, 40) == [range(3, 6), range(2, 3), range(1, 2), range(0, 1)]
    assert make_buckets(sizes, 1 << 20) == [range(0, 6)]
    assert make_buckets(sizes, 1) == [range(i, i + 1) for i in reversed(range(6))]
    with pytest.raises(ValueError, match="bucket_bytes"):
        make_buckets(sizes, 0)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


class Runner:
    """One worker's loop (W = 1, in-process transport), stepped plainly or overlapped."""

    def __init__(self, settings, bucket_bytes=None, make=model, transport=None):
        self.model = make()
        self.params = list(self.model.parameters())
        config = AlgorithmConfig(seed=3, **settings)
        self.algorithm = Algorithm([p.shape for p in self.params], config, transport or InProcessTransport(1))
        self.x = flatten([p.detach() for p in self.params]).clone()
        self.state = self.algorithm.init_state(self.x)
        self.overlapped = OverlappedStep(self.algorithm, self.params, bucket_bytes, lambda ok: ok) if bucket_bytes else None

    def loss(self, t):
        g = torch.Generator().manual_seed(t)
        self.algorithm.write_gradient_points(self.state, self.x, [p.data for p in self.params])
        for p in self.params:
            p.grad = None
        return F.cross_entropy(self.model(torch.randn(8, 5, generator=g)), torch.randint(0, 3, (8,), generator=g))

    def step(self, t, lr=0.05):
        loss = self.loss(t)
        if self.overlapped is None:
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]  # as a rank takes them
            self.algorithm.step(self.state, self.x, grads, lr)
        else:
            self.overlapped.run(self.state, self.x, lr, loss.backward)


class Arriving(InProcessTransport):
    """An in-process transport whose directions run apart and whose uplinks "arrive" when a seeded draw
    says so (each time one is asked, with probability ``chance``; for good once it has), so that second
    stages run at moments that differ from step to step, as over a network. ``waits`` records, for every
    uplink waited for before it was ready, whether backward had ended (``backward_done``)."""

    directions_apart = True

    def __init__(self, seed, chance=0.5):
        super().__init__(1)
        self.draw, self.chance = random.Random(seed), chance
        self.backward_done, self.waits, self.served_during_backward = True, [], 0

    def begin_uplink(self, *args, **kwargs):
        mean = super().begin_uplink(*args, **kwargs)
        arrived = []

        def ready():
            if not arrived and self.draw.random() < self.chance:
                arrived.append(True)
            return bool(arrived)

        def wait():
            if not arrived:
                self.waits.append(self.backward_done)
            elif not self.backward_done:
                self.served_during_backward += 1
            return mean.wait()

        return Pending(wait, ready)


@pytest.mark.parametrize("settings", CASES, ids=lambda s: f"{s['method']}-{s['compressor']}-{s.get('optimizer', 'sgd')}")
@pytest.mark.parametrize("bucket_bytes", [1, 200])
def test_overlapped_equals_plain_bit_for_bit(settings, bucket_bytes):
    """12 steps overlapped (one bucket per layer, or a few layers each) end on the plain step's parameters,
    state tensors and bits, bit for bit."""
    plain, overlapped = Runner(settings), Runner(settings, bucket_bytes)
    assert len(overlapped.overlapped.buckets) > 1
    for t in range(12):
        plain.step(t, lr=0.05 * 0.9**t)
        overlapped.step(t, lr=0.05 * 0.9**t)
    assert torch.equal(plain.x, overlapped.x)
    assert plain.state.step == overlapped.state.step == 12
    for name, tensor in plain.state.tensors.items():
        assert torch.equal(tensor, overlapped.state.tensors[name]), name
    assert plain.algorithm.transport.ledger.counts == overlapped.algorithm.transport.ledger.counts


@pytest.mark.parametrize("settings", CASES[:6], ids=lambda s: f"{s['method']}-{s['compressor']}-{s.get('optimizer', 'sgd')}")
def test_second_stages_as_uplinks_arrive_equal_plain_and_never_wait_during_backward(settings):
    """Over a transport whose directions run apart, each bucket's second stage runs when its uplink has
    arrived, at moments drawn at random: 12 steps still end on the plain step's parameters, state and
    bits, bit for bit; some second stages ran during backward, and no uplink was waited for before
    backward had ended."""
    plain = Runner(settings)
    transport = Arriving(seed=5)
    overlapped = Runner(settings, bucket_bytes=1, transport=transport)

    def backward(loss):
        transport.backward_done = False
        loss.backward()
        transport.backward_done = True

    for t in range(12):
        plain.step(t, lr=0.05 * 0.9**t)
        overlapped.overlapped.run(overlapped.state, overlapped.x, 0.05 * 0.9**t, lambda: backward(overlapped.loss(t)))
    assert torch.equal(plain.x, overlapped.x)
    for name, tensor in plain.state.tensors.items():
        assert torch.equal(tensor, overlapped.state.tensors[name]), name
    assert plain.algorithm.transport.ledger.counts == overlapped.algorithm.transport.ledger.counts
    assert transport.served_during_backward > 0 and transport.waits and all(transport.waits)


def test_without_directions_apart_the_second_stages_keep_fixed_moments():
    """Over a transport whose directions share a channel, bucket b - 1's second stage runs when bucket b
    starts, whether or not its uplink says it has arrived (the same moment on every rank); the last bucket
    starts after backward, so the second stages of the last two run then."""
    transport = Arriving(seed=0, chance=0.0)
    transport.directions_apart = False
    runner = Runner(CASES[0], bucket_bytes=1, transport=transport)
    loss = runner.loss(0)

    def backward():
        transport.backward_done = False
        loss.backward()
        transport.backward_done = True

    runner.overlapped.run(runner.state, runner.x, 0.05, backward)
    assert transport.waits == [False] * (len(runner.overlapped.buckets) - 2) + [True, True]


class Recording(InProcessTransport):
    """An in-process transport that writes down, in order, the collectives a rank would start: "up" and
    "down" (its directions share one channel)."""

    directions_apart = False

    def __init__(self):
        super().__init__(1)
        self.events = []

    def begin_uplink(self, *args, **kwargs):
        self.events.append("up")
        return super().begin_uplink(*args, **kwargs)

    def begin_downlink(self, *args, **kwargs):
        self.events.append("down")
        return super().begin_downlink(*args, **kwargs)


class Tail(nn.Module):
    """The model's last parameter, which the loss uses (``used``) or not: without a gradient, its hook
    never fires, so no bucket can start before backward has ended."""

    def __init__(self, used):
        super().__init__()
        self.weight, self.used = nn.Parameter(torch.zeros(3)), used

    def forward(self, x):
        return x + self.weight if self.used else x


@pytest.mark.parametrize("used", [True, False])
def test_over_one_channel_collectives_start_in_one_order_however_hooks_fire(used):
    """Over a transport whose directions share a channel, the collectives start in one fixed order --
    up, up, down, ..., the vote, the last bucket's up, then the last downs -- whether the buckets start
    during backward (every parameter gets a gradient) or all after it (the last parameter gets none)."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3), Tail(used))

    transport = Recording()
    runner = Runner(CASES[0], make=make, transport=transport)
    runner.overlapped = OverlappedStep(runner.algorithm, runner.params, 1, lambda ok: transport.events.append("vote") or ok)
    n = len(runner.overlapped.buckets)
    runner.step(0)
    assert n == 5
    assert transport.events == ["up"] + ["up", "down"] * (n - 2) + ["vote", "up", "down", "down"]


def test_an_error_in_backward_puts_the_stepped_buckets_back():
    """An exception raised in backward after some buckets were stepped (here by a hook on the first
    layer's gradient): it reaches the caller, and x, every state tensor and the bits are as before."""
    runner = Runner(CASES[0], bucket_bytes=1)
    runner.step(0)
    before = (runner.x.clone(), runner.state.state_dict(), dict(runner.algorithm.transport.ledger.counts))

    def fail(grad):
        raise RuntimeError("a failure inside backward")

    hook = runner.params[0].register_hook(fail)
    with pytest.raises(RuntimeError, match="inside backward"):
        runner.step(1)
    hook.remove()
    assert runner.algorithm.transport.ledger.counts["bits_up"] == before[2]["bits_up"]
    assert torch.equal(runner.x, before[0]) and runner.state.step == before[1]["step"]
    for name, tensor in runner.state.tensors.items():
        assert torch.equal(tensor, before[1]["tensors"][name]), name
    runner.step(1)
    assert runner.state.step == 2


def test_buckets_go_out_while_backward_runs():
    """When backward reaches the first layer's gradient, the buckets of the later layers have already been
    handed to the transport (their uplink bits are counted), and the step is not yet taken."""
    runner = Runner(CASES[0], bucket_bytes=1)
    seen = []
    runner.params[0].register_hook(lambda g: seen.append((runner.algorithm.transport.ledger.counts["bits_up"], runner.state.step)))
    runner.step(0)
    (bits_then, step_then), = seen
    assert 0 < bits_then < runner.algorithm.transport.ledger.counts["bits_up"]
    assert step_then == 0 and runner.state.step == 1


def nan_step_changes_nothing(layer):
    """Three steps, then a step whose gradient of parameter ``layer`` turns NaN: NonFiniteStep, and x,
    every state tensor and the bits are as before that step. Returns the runner."""
    runner = Runner(CASES[0], bucket_bytes=1)
    for t in range(3):
        runner.step(t)
    before = (runner.x.clone(), runner.state.state_dict(), dict(runner.algorithm.transport.ledger.counts))
    hook = runner.params[layer].register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(NonFiniteStep, match="on this rank"):
        runner.step(3)
    hook.remove()
    assert torch.equal(runner.x, before[0]) and runner.state.step == before[1]["step"]
    for name, tensor in runner.state.tensors.items():
        assert torch.equal(tensor, before[1]["tensors"][name]), name
    assert runner.algorithm.transport.ledger.counts == before[2]
    return runner


def test_a_nan_in_the_last_bucket_changes_nothing():
    """A NaN in the first layer's gradient (the last bucket), after the other buckets have settled their
    state: nothing changes, and the next step runs."""
    runner = nan_step_changes_nothing(0)
    runner.step(3)
    assert runner.state.step == 4


def test_a_nan_in_a_middle_bucket_changes_nothing_and_the_last_bucket_is_not_copied():
    """A NaN in a bucket before the last (the second layer's weight), after the buckets of the later layers
    have settled their state: nothing changes (their copies are put back). The last bucket is stepped
    only once the step is known to be kept, so no copy of its state is ever made."""
    runner = nan_step_changes_nothing(2)
    buckets = runner.overlapped.buckets
    assert buckets[-1] == range(0, 1)
    assert {b for b, _ in runner.overlapped._copies} == set(range(len(buckets) - 1))


def test_a_parameter_backward_does_not_reach_sends_zeros():
    """A parameter the loss does not use (no gradient, its hook never fires): its bucket goes out after
    backward with a zero gradient, as the plain step takes it, and the buckets after it follow in order."""
    def with_unused():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
        m.register_parameter("unused", nn.Parameter(torch.ones(4)))
        return m

    plain, overlapped = Runner(CASES[1], make=with_unused), Runner(CASES[1], bucket_bytes=1, make=with_unused)
    assert overlapped.params[0].shape == (4,)  # the module's own parameter comes first: the last bucket
    for t in range(3):
        plain.step(t)
        overlapped.step(t)
    assert torch.equal(plain.x, overlapped.x)
    assert torch.equal(plain.state.worker_momentum, overlapped.state.worker_momentum)


@pytest.mark.parametrize("settings, later", [
    (CASES[0], dict(momentum=[0.5, 0.9, 0.0, 0.7, 0.9, 0.3], weight_decay=[0.0, 1e-2, 0.0, 1e-3, 0.0, 0.0])),
    (CASES[0], dict(momentum=0.8, weight_decay=2e-3)),
    (CASES[5], dict(betas=[(0.8, 0.9)] * 3 + [(0.9, 0.95)] * 3, eps=1e-4, weight_decay=[0.0, 1e-2] * 3)),
], ids=["sgd-per-layer", "sgd-uniform", "adam-per-layer"])
def test_a_set_after_the_buckets_were_made_reaches_them(settings, later):
    """The buckets' optimizers read their per-layer settings from the one optimizer at every step: after
    ``optimizer.set`` (as saef.SAEF does each step for its parameter groups), overlapped steps still end on
    the plain step's parameters and state, bit for bit (they would not with settings copied at the start)."""
    plain, overlapped = Runner(settings), Runner(settings, bucket_bytes=1)
    names = type(plain.algorithm.optimizer).settings
    for t in range(8):
        if t == 3:
            for runner in (plain, overlapped):
                runner.algorithm.optimizer.set(*(later[name] for name in names))
        plain.step(t, lr=0.05)
        overlapped.step(t, lr=0.05)
    assert not torch.equal(plain.x, Runner(settings).x)
    assert torch.equal(plain.x, overlapped.x)
    for name, tensor in plain.state.tensors.items():
        assert torch.equal(tensor, overlapped.state.tensors[name]), name
