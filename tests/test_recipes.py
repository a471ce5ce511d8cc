"""The "How to add ..." recipes of docs/architecture.md, each followed step by step: a feedback rule, a local
optimizer, a dataset and a backend, each registered by the public registry function and then run where the
recipe says it runs. (The recipes for a key and for a compressor are followed by tests/test_schema.py and
tests/test_compressor_protocol.py.)

No registry has a way to unregister, so every test that registers something restores that registry's dict
afterwards (the ``restored`` fixture): other tests see the registries as they were (tests/test_local.py, for
one, asserts that exactly sgd and adam are registered)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import saef
from saef.app import checkpoint
from saef.app.cli import main
from saef.backends import register_backend
from saef.backends import registry as backend_registry
from saef.backends.simulator import Simulator, SimulatorBackend
from saef.core import flatten, unflatten
from saef.core.local import _OPTIMIZERS, register_optimizer
from saef.core.perlayer import LayerSettings
from saef.core.rules import FeedbackRule, register_rule
from saef.core.rules import registry as rule_registry
from saef.zoo.datasets import Data, DatasetSplit, DatasetRequest, register_dataset
from saef.zoo.datasets import registry as dataset_registry

sys.path.insert(0, str(Path(__file__).parent))
from _problems import quadratic_problem  # noqa: E402

SHAPES = [(3, 4), (7,), (1,)]
K, STEPS, LR, WD = 3, 30, 0.02, 1e-3
RUN = ["--model", "mlp", "--batch-size", "32", "--epochs", "1", "--quiet"]


@pytest.fixture
def restored():
    """``restored(registry_dict)``: that dict is put back as it was when the test ends."""
    saved = []

    def keep(registry: dict) -> dict:
        saved.append((registry, dict(registry)))
        return registry

    yield keep
    for registry, contents in saved:
        registry.clear()
        registry.update(contents)


def _per_layer(spec, vectors):
    """C applied to each layer of each flat vector (the compressors act layer-wise)."""
    compressor = saef.make_compressor(spec)
    return torch.stack([flatten([compressor.compress(part) for part in unflatten(v, SHAPES)]) for v in vectors])


# --- a feedback rule ---------------------------------------------------------------------------------
class DecayedErrorFeedback(FeedbackRule):
    """EF whose worker error decays: D_k = e_k + lr m_k; e_k <- gamma (D_k - C(D_k)); worker k sends C(D_k);
    x <- x - C_s(mean_k C(D_k)) (double-way) | x - mean_k C(D_k) (single-way); no server error."""

    name = "decayed-ef"
    decay = 0.5  # gamma

    def init(self, x):
        return {"worker_error": x.new_zeros(self.plan.num_local, x.numel())}  # e_k, fed back (decayed) next step

    def uplink(self, state, x, direction, scale):
        return scale.add(state.worker_error, direction)  # D_k = e_k + lr m_k, in place

    def settle_worker(self, state, payloads, context):
        uplink = self.plan.uplink
        uplink.subtract_decoded(payloads, self.plan.layout, state.worker_error, **uplink.context_args(context))
        state.worker_error.mul_(self.decay)  # e_k <- gamma (D_k - C(D_k))


def reference_decayed_ef(grad_fn, x0, compressor, double_way, mu):
    """The rule's definition written out in float64 (momentum SGD as the local optimizer)."""
    x = flatten(x0).clone()
    m = torch.zeros(K, x.numel(), dtype=x.dtype)
    e = torch.zeros_like(m)
    for _ in range(STEPS):
        grads = torch.stack([flatten(grad_fn(k, unflatten(x, SHAPES))) for k in range(K)])
        m = mu * m + grads + WD * x
        delta = e + LR * m
        sent = _per_layer(compressor, delta)
        e = DecayedErrorFeedback.decay * (delta - sent)
        mean = sent.mean(0)
        x = x - (_per_layer(compressor, [mean])[0] if double_way else mean)
    return x


@pytest.mark.parametrize("compressor,double_way", [("sign", False), ("topk:0.25", True)])
def test_a_registered_rule_follows_its_definition_in_simulate_and_runs_in_the_optimizer(restored, compressor, double_way):
    """Recipe "a feedback rule": a FeedbackRule subclass registered with saef.register_rule runs by its name in
    saef.simulate (3 workers, 30 steps, float64: the parameters of its definition, allclose 1e-10) and in
    saef.SAEF (one process: after one step, x = x_0 - C(lr g) and e = gamma (lr g - C(lr g)), layer by layer)."""
    restored(rule_registry._RULES)
    register_rule(DecayedErrorFeedback)
    assert "decayed-ef" in saef.available_rules()

    grad_fn, x0 = quadratic_problem(K, SHAPES)
    got = saef.simulate(grad_fn, x0, workers=K, steps=STEPS, lr=LR, momentum=0.9, weight_decay=WD,
                        method="decayed-ef", compressor=compressor, double_way=double_way)
    want = reference_decayed_ef(grad_fn, x0, compressor, double_way, 0.9)
    assert torch.allclose(flatten(got), want, rtol=0, atol=1e-10)
    assert not torch.allclose(want, reference_decayed_ef(grad_fn, x0, "identity", double_way, 0.9))  # C matters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x_0 = flatten([p.detach() for p in model.parameters()]).clone()
    opt = saef.SAEF(model.parameters(), lr=0.1, method="decayed-ef", compressor="sign", double_way=False)
    inputs = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    model(inputs).square().mean().backward()
    g = flatten([p.grad for p in model.parameters()])
    opt.step()
    delta = 0.1 * g
    sent = flatten([saef.make_compressor("sign").compress(part) for part in
                    unflatten(delta, [tuple(p.shape) for p in model.parameters()])])
    assert torch.allclose(flatten([p.detach() for p in model.parameters()]), x_0 - sent, rtol=0, atol=1e-7)
    assert torch.allclose(opt.ef_state.worker_error[0], 0.5 * (delta - sent), rtol=0, atol=1e-7)
    assert opt.ef_state.worker_error.abs().sum() > 0


# --- a local optimizer -------------------------------------------------------------------------------
class PlainSGD:
    """SGD without momentum, as a local optimizer of its own: m_k = g_k + wd z_k (no state); the rule
    compresses lr m_k, and x <- x - update."""

    name = "plain-sgd"
    settings = ("weight_decay",)  # read from saef.SAEF's parameter groups, in the order set takes them
    kept_on_reset = ()

    def __init__(self, layout, config, full_precision_until=0, hyper=None):
        self.layout, self.config, self.full_precision_until = layout, config, full_precision_until
        self.hyper = LayerSettings(layout) if hyper is None else hyper
        if hyper is None:
            self.set(config.weight_decay)

    def init(self, x, rows):
        return {}

    def set(self, weight_decay):
        self.hyper.put("weight_decay", weight_decay)

    def part(self, layers, layout):
        return PlainSGD(layout, self.config, self.full_precision_until, self.hyper.view(layers, layout))

    def update(self, state, grads, points):
        rows = grads[0][0].shape[0]
        out = self.layout.memo(("plain-sgd", rows, grads[0][0].dtype), lambda: grads[0][0].new_empty(rows, self.layout.total))
        for g, columns in grads:
            out[:, columns].copy_(g)
        runs = self.hyper["weight_decay"].runs
        if any(wd for _, wd in runs):
            at = points()
            for columns, wd in runs:
                if wd:
                    out[:, columns].add_(at[:, columns], alpha=wd)
        return out

    def scale(self, lr):
        return lr

    def apply(self, state, x, update, lr):
        x -= update

    def shift(self, state, error, columns=slice(None)):
        return error[..., columns]

    def check_new_layers(self, state, reset=False):
        pass


@pytest.mark.parametrize("method", ["saef", "ef"])
def test_a_registered_local_optimizer_runs_in_simulate(restored, method):
    """Recipe "a local optimizer": PlainSGD registered with register_optimizer (and nothing else: EF and
    SAEF take any optimizer) gives, through saef.simulate (sign, double-way, weight decay, 3 workers, 30
    steps), the parameters of the built-in sgd with momentum 0, bit for bit."""
    restored(_OPTIMIZERS)
    register_optimizer(PlainSGD)
    grad_fn, x0 = quadratic_problem(K, SHAPES, dtype=torch.float32)
    settings = dict(workers=K, steps=STEPS, lr=LR, weight_decay=WD, method=method, compressor="sign", average_every=7)
    ours = saef.simulate(grad_fn, x0, optimizer="plain-sgd", **settings)
    builtin = saef.simulate(grad_fn, x0, optimizer="sgd", momentum=0.0, **settings)
    assert all(torch.equal(a, b) for a, b in zip(ours, builtin))
    assert not torch.equal(ours[0], x0[0])


# --- a dataset ---------------------------------------------------------------------------------------
def _tiny(request: DatasetRequest) -> Data:
    """Two Gaussian blobs in 6 dimensions: 96 training and 24 test samples, seeded by the request."""
    _tiny.requests.append(request)
    g = torch.Generator().manual_seed(request.seed)

    def split(n):
        targets = torch.arange(n) % 2
        inputs = (2.0 * targets - 1.0)[:, None] + 0.3 * torch.randn(n, 6, generator=g)
        return DatasetSplit(inputs.unsqueeze(1), targets)

    return Data(split(96), split(24), 2, (1, 6), request.name)


def test_a_registered_dataset_trains_from_the_command_line(restored, tmp_path, capsys):
    """Recipe "a dataset": a loader registered with register_dataset is accepted by `saef train --dataset
    NAME` (run in-process through saef.app.cli.main); the run trains on its 96 samples (3 steps of 32 in
    the epoch), evaluates on its 24, and writes its config, metrics and summary."""
    restored(dataset_registry._SOURCES)
    _tiny.requests = []
    register_dataset("tiny-blobs", _tiny)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "tiny-blobs", *RUN, "--output", str(out)]) == 0
    assert [r.name for r in _tiny.requests] == ["tiny-blobs"]
    assert "(96 train / 24 test)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dataset"] == "tiny-blobs"
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["epoch"] == 1 and row["step"] == 96 // 32 and 0.0 <= row["test_acc"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] == row["test_acc"]


def test_a_registered_dataset_that_reads_a_file_takes_data_file(restored, tmp_path, capsys):
    """Recipe "a dataset", with ``data_file=True``: `--data-file` is accepted for it (and handed to its
    loader), while a dataset registered without it still refuses the flag, naming the readers."""
    restored(dataset_registry._SOURCES)
    _tiny.requests = []
    register_dataset("tiny-file", _tiny, data_file=True)
    register_dataset("tiny-blobs", _tiny)
    given = tmp_path / "blobs.txt"
    given.write_text("unused by the loader\n")
    assert main(["train", "--dataset", "tiny-file", "--data-file", str(given), *RUN, "--output", str(tmp_path / "run")]) == 0
    assert [str(r.data_file) for r in _tiny.requests] == [str(given)]
    assert main(["train", "--dataset", "tiny-blobs", "--data-file", str(given), *RUN, "--output", str(tmp_path / "no")]) == 2
    assert "data_file" in capsys.readouterr().err and not (tmp_path / "no").exists()


# --- a backend ---------------------------------------------------------------------------------------
class CountingBackend(SimulatorBackend):
    """The simulator's backend, counting the trainers it makes (and checking that they are Simulators)."""

    name = "counting-sim"
    trainers = []

    def make_trainer(self, model, config, precision="fp32"):
        trainer = super().make_trainer(model, config, precision)
        CountingBackend.trainers.append(trainer)
        return trainer


def test_a_registered_backend_runs_saef_train_and_equals_the_simulator(restored, tmp_path):
    """Recipe "a backend": a Backend subclass registered with register_backend is used by `saef train
    --backend NAME` (one trainer made, with the run's K = 4 workers), and the run's metrics and final
    checkpoint equal those of `--backend sim` bit for bit."""
    restored(backend_registry._BACKENDS)
    CountingBackend.trainers = []
    register_backend("counting-sim", CountingBackend)
    flags = ["--dataset", "synthetic", *RUN, "--compressor", "sign", "--checkpoint-every", "0"]
    runs = {}
    for backend in ("counting-sim", "sim"):
        out = tmp_path / backend
        assert main(["train", *flags, "--backend", backend, "--output", str(out)]) == 0
        rows = [{k: v for k, v in json.loads(line).items() if k not in ("epoch_time", "wall_time")}
                for line in (out / "metrics.jsonl").read_text().splitlines()]
        trainer = checkpoint.load_latest(out / "checkpoints")["trainer"]
        runs[backend] = rows, trainer
        assert json.loads((out / "config.json").read_text())["backend"] == backend
    assert len(CountingBackend.trainers) == 1
    assert isinstance(CountingBackend.trainers[0], Simulator) and CountingBackend.trainers[0].num_workers == 4
    (rows, trainer), (sim_rows, sim_trainer) = runs["counting-sim"], runs["sim"]
    assert rows == sim_rows and rows[0]["bits_up"] > 0
    assert torch.equal(trainer["x"], sim_trainer["x"])
    assert all(torch.equal(t, sim_trainer["algorithm"]["tensors"][name])
               for name, t in trainer["algorithm"]["tensors"].items())
