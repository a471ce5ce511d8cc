"""Tests for saef.zoo.models: parameter counts, output shapes, vmap over workers, error messages."""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from saef.zoo.models import MODELS, build_model

MNIST1D = SimpleNamespace(num_classes=10, input_shape=(1, 40))
CIFAR10 = SimpleNamespace(num_classes=10, input_shape=(3, 32, 32))
A9A = SimpleNamespace(num_classes=2, input_shape=(122,))
OWN_MODELS = [name for name in MODELS if name not in ("resnet50", "gpt")]  # those not taken from torchvision (gpt: tests/test_text.py)


def _info_for(name):
    return MNIST1D if name in ("mlp", "mlp5m", "cnn1d") else A9A if name == "logreg" else CIFAR10


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet20_has_the_published_parameter_count():
    """ResNet-20 (option-A shortcuts, 10 classes) has exactly 269,722 parameters, the published 0.27M."""
    assert _count(build_model("resnet20", CIFAR10)) == 269_722


@pytest.mark.parametrize(
    "name, expected",
    [("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018), ("mlp", 15_210), ("mlp5m", 4_990_090), ("cnn1d", 7_460)],
)
def test_parameter_counts(name, expected):
    """Parameter counts match the hand-computed / published values (ResNet-56: 0.85M; mlp5m: ~5M)."""
    assert _count(build_model(name, _info_for(name))) == expected


@pytest.mark.parametrize("name", OWN_MODELS)
def test_forward_shape(name):
    """A forward pass maps a (batch, *input_shape) batch to (batch, num_classes) logits."""
    info = _info_for(name)
    assert build_model(name, info)(torch.randn(3, *info.input_shape)).shape == (3, info.num_classes)


def test_mlp_flattens_images_and_width_is_used():
    """The MLP accepts any input shape (digits images) and its hidden width follows `width`."""
    digits = SimpleNamespace(num_classes=10, input_shape=(1, 8, 8))
    model = build_model("mlp", digits, width=7)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert _count(model) == (64 * 7 + 7) + (7 * 7 + 7) + (7 * 10 + 10)


def test_initialisation_follows_the_global_seed():
    """Two builds after the same torch.manual_seed give identical parameters."""
    torch.manual_seed(0)
    a = build_model("resnet20", CIFAR10)
    torch.manual_seed(0)
    b = build_model("resnet20", CIFAR10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("name", OWN_MODELS)
def test_vmap_over_workers_matches_a_loop(name, train_mode):
    """vmap(functional_call) over 2 workers with stacked parameters and buffers gives each worker's own
    forward (logits and, in training mode, updated BatchNorm running statistics) as a per-worker loop does."""
    torch.manual_seed(0)
    info = _info_for(name)
    if info is CIFAR10:  # smaller images keep the test fast; both downsampling shortcuts are still exercised
        info = SimpleNamespace(num_classes=10, input_shape=(3, 16, 16))
    workers = [build_model(name, info).train(train_mode) for _ in range(2)]
    if train_mode:  # make the buffers differ between workers too
        for worker in workers:
            worker(torch.randn(4, *info.input_shape))
    params, buffers = stack_module_state(workers)
    inputs = torch.randn(2, 4, *info.input_shape)
    template = copy.deepcopy(workers[0]).to("meta")

    def forward(worker_params, worker_buffers, worker_inputs):
        return functional_call(template, (worker_params, worker_buffers), (worker_inputs,))

    batched = vmap(forward)(params, buffers, inputs)
    looped = torch.stack([worker(x) for worker, x in zip(workers, inputs)])
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-5)
    for key, stacked in buffers.items():
        expected = torch.stack([dict(worker.named_buffers())[key] for worker in workers])
        torch.testing.assert_close(stacked, expected, rtol=1e-4, atol=1e-6, msg=f"buffer {key}")


def test_cnn1d_refuses_images():
    """cnn1d on 2-D images raises ValueError naming the model and the input shape."""
    with pytest.raises(ValueError, match=r"cnn1d.*\(1, 8, 8\)"):
        build_model("cnn1d", SimpleNamespace(num_classes=10, input_shape=(1, 8, 8)))


def test_resnet_refuses_1d_inputs():
    """A ResNet on 1-D inputs raises ValueError naming the model and the input shape."""
    with pytest.raises(ValueError, match=r"resnet20.*\(1, 40\)"):
        build_model("resnet20", MNIST1D)


def test_unknown_model_lists_known_names():
    """An unknown name raises ValueError listing every known model."""
    with pytest.raises(ValueError) as info:
        build_model("vgg16", CIFAR10)
    assert all(name in str(info.value) for name in MODELS)


def test_resnet50_without_torchvision_says_how_to_install(monkeypatch):
    """Without torchvision, resnet50 raises ImportError pointing at the imagenet extra."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ImportError, match=r"saef\[imagenet\]"):
        build_model("resnet50", CIFAR10)


def test_resnet50_from_torchvision():
    """With torchvision installed, resnet50 gives (batch, classes) logits and 23,528,522 parameters for 10 classes."""
    pytest.importorskip("torchvision")
    model = build_model("resnet50", CIFAR10)
    assert _count(model) == 23_528_522
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)
