"""Model zoo: small MNIST-1D models, the CIFAR ResNets of He et al. (2016), and torchvision's ResNet-50.

Every model except ``resnet50`` is written so that the simulator can train K copies at once: it traces
with ``torch.fx`` and runs on stacked parameters (:mod:`saef.backends.stacked`), and also runs under
``torch.func.functional_call`` + ``torch.func.vmap`` over a leading worker axis. So: no in-place ops on
activations, no ``.item()`` or data-dependent control flow in ``forward``. BatchNorm keeps one copy of
its running statistics per worker.

Parameters are initialised from torch's global RNG: seed it (``torch.manual_seed``) before
:func:`build_model` for identical models across runs and ranks.

| name      | data            | parameters (10 classes, MNIST-1D / CIFAR shapes) |
|-----------|-----------------|--------------------------------------------------|
| mlp       | any             | 15,210                                           |
| mlp5m     | any             | 4,990,090                                        |
| cnn1d     | (C, L)          | 7,460                                            |
| resnet20  | (C, H, W)       | 269,722  (resnet32 464,154; 44 658,586; 56 853,018) |
| resnet50  | (3, H, W)       | 23,528,522 (torchvision, optional extra)         |
| logreg    | any, 2 classes  | the number of features (a9a: 122)                |
| gpt       | bytes (context,)| 437,760 (2 layers, width 128, 4 heads, context 64) |

Example:
    >>> from types import SimpleNamespace
    >>> model = build_model("resnet20", SimpleNamespace(num_classes=10, input_shape=(3, 32, 32)))
    >>> sum(p.numel() for p in model.parameters())
    269722
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

MODELS = ("mlp", "mlp5m", "cnn1d", "resnet20", "resnet32", "resnet44", "resnet56", "resnet50", "logreg", "gpt")

_RESNET_BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}  # depth = 6 n + 2
_DEFAULT_WIDTH = {"mlp": 100, "mlp5m": 2208, "cnn1d": 25, "resnet": 16, "gpt": 128}
# mlp5m: 40 -> 2208 -> 2208 -> 10 has 4,990,090 parameters, the ~5M of a communication-bound model, while
# one step on MNIST-1D still costs little compute.


def build_model(name: str, data: Any, *, width: int | None = None, layers: int = 2, heads: int = 4) -> nn.Module:
    """Build model ``name`` for a dataset.

    Args:
        name: one of :data:`MODELS`.
        data: anything with ``num_classes`` (int) and ``input_shape`` (one sample's shape, channels first),
            e.g. a :class:`saef.zoo.datasets.Data`.
        width: hidden units of ``mlp`` (default 100) and ``mlp5m`` (2208), channels of ``cnn1d`` (25), channels
            of the first stage of the CIFAR ResNets (16; stages use width, 2 width, 4 width), the model width of
            ``gpt`` (128). Not for resnet50.
        layers, heads: ``gpt`` only: transformer blocks and attention heads (heads must divide width); its
            context is the input length, ``data.input_shape[0]``.

    Raises:
        ValueError: unknown name, a width < 1, or a model that does not fit the input shape.
        ImportError: ``resnet50`` without torchvision.

    Example:
        >>> from types import SimpleNamespace
        >>> build_model("mlp", SimpleNamespace(num_classes=10, input_shape=(1, 40)))(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    num_classes, input_shape = int(data.num_classes), tuple(data.input_shape)
    if width is not None and (width < 1 or name == "resnet50"):
        raise ValueError(f"width must be a positive integer and is not accepted by resnet50, got {width} for {name}")
    if name == "logreg":
        if num_classes != 2:
            raise ValueError(f"model logreg is binary logistic regression: it needs 2 classes, not {num_classes}")
        return LogisticRegression(math.prod(input_shape))
    if name in ("mlp", "mlp5m"):
        hidden = width or _DEFAULT_WIDTH[name]
        return MLP(math.prod(input_shape), (hidden, hidden), num_classes)
    if name == "gpt":
        return _gpt(data, input_shape, num_classes, width or _DEFAULT_WIDTH["gpt"], layers, heads)
    if name == "cnn1d":
        if len(input_shape) != 2:
            raise ValueError(f"model cnn1d needs 1-D inputs of shape (channels, length), got input shape {input_shape}")
        return CNN1d(input_shape, num_classes, channels=width or _DEFAULT_WIDTH["cnn1d"])
    if len(input_shape) != 3:
        raise ValueError(f"model {name} needs images of shape (channels, height, width), got input shape {input_shape}")
    if name == "resnet50":
        return _torchvision_resnet50(input_shape, num_classes)
    return CifarResNet(_RESNET_BLOCKS[name], input_shape[0], num_classes, width=width or _DEFAULT_WIDTH["resnet"])


class LogisticRegression(nn.Module):
    """Binary logistic regression with the non-convex regulariser of the EF21 papers:

        f(x) = mean_i log(1 + exp(-b_i a_i^T x)) + lam * sum_j x_j^2 / (1 + x_j^2),   b_i in {-1, +1}

    The output is the two logits (0, a^T x), so that cross-entropy with class 1 for b = +1 is exactly
    log(1 + exp(-b a^T x)); the regulariser is :meth:`penalty`, which the trainers add to the loss (no bias,
    weights start at zero).

    Args:
        in_features: the number of features. lam: the regulariser's weight (0.1 in those papers).
    """

    def __init__(self, in_features: int, lam: float = 0.1) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_features, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.lam = lam

    def forward(self, inputs: Tensor) -> Tensor:
        return F.pad(self.linear(self.flatten(inputs)), (1, 0))

    def penalty(self, params) -> Tensor:
        """lam * sum_j x_j^2 / (1 + x_j^2) for each row of the parameters (W, ...) given in model order: (W,)."""
        w = params[0].reshape(params[0].shape[0], -1)
        return self.lam * (w.square() / (1 + w.square())).sum(dim=1)


class MLP(nn.Module):
    """Flatten, then fully connected layers with ReLU between them.

    Args:
        in_features: size of a flattened input.
        hidden: widths of the hidden layers.
        num_classes: outputs.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        widths = (in_features, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


class CNN1d(nn.Module):
    """The MNIST-1D convolutional baseline: three Conv1d(kernel 5, stride 2, padding 1) + ReLU, then linear.

    No BatchNorm or dropout, so the model is a pure function of its parameters (vmappable, no buffers).
    With 25 channels on (1, 40) inputs the lengths go 40 -> 19 -> 9 -> 4 and it has 7,460 parameters.

    Args:
        input_shape: ``(channels, length)``.
        num_classes: outputs.
        channels: channels of every convolution.
    """

    def __init__(self, input_shape: tuple[int, int], num_classes: int, channels: int = 25) -> None:
        super().__init__()
        in_channels, length = input_shape
        convs: list[nn.Module] = []
        for layer in range(3):
            convs += [nn.Conv1d(in_channels if layer == 0 else channels, channels, 5, stride=2, padding=1), nn.ReLU()]
            length = (length + 2 - 5) // 2 + 1
            if length < 1:
                raise ValueError(f"model cnn1d needs inputs of length >= 11, got input shape {input_shape}")
        self.features = nn.Sequential(*convs)
        self.classifier = nn.Linear(channels * length, num_classes)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.classifier(self.features(inputs).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity shortcut ("option A" of He et al. 2016).

    When the block halves the resolution and widens the channels, the shortcut subsamples the input with
    stride 2 and zero-pads the new channels: no parameters, and a strided slice plus ``F.pad`` is vmappable.
    """

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride = stride
        extra = channels - in_channels
        self.channel_padding = (extra // 2, extra - extra // 2)

    def shortcut(self, inputs: Tensor) -> Tensor:
        if self.stride == 1 and self.channel_padding == (0, 0):
            return inputs
        subsampled = inputs[..., :: self.stride, :: self.stride]
        return F.pad(subsampled, (0, 0, 0, 0, *self.channel_padding))

    def forward(self, inputs: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(inputs)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(inputs))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), depth 6n + 2: a 3x3 conv, three stages of n basic blocks at
    width, 2 width and 4 width channels (the last two start with stride 2), global average pooling, linear.

    Convolutions use Kaiming-normal initialisation (fan-in, ReLU gain), as in the paper.

    Args:
        blocks_per_stage: n (3 -> ResNet-20, 5 -> 32, 7 -> 44, 9 -> 56).
        in_channels: input channels (3 for CIFAR).
        num_classes: outputs.
        width: channels of the first stage (16 in the paper).
    """

    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        channels = width
        for stage in range(3):
            stage_channels = width * 2**stage
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, stage_channels, stride))
                channels = stage_channels
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, inputs: Tensor) -> Tensor:
        features = self.blocks(self.stem(inputs))
        return self.classifier(features.mean(dim=(-2, -1)))


def _torchvision_resnet50(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if input_shape[0] != 3:
        raise ValueError(f"model resnet50 needs 3-channel images, got input shape {input_shape}")
    try:
        from torchvision.models import resnet50
    except ImportError as err:
        raise ImportError("model resnet50 needs torchvision: pip install saef[imagenet]") from err
    return resnet50(weights=None, num_classes=num_classes)


def _gpt(data: Any, input_shape: tuple, num_classes: int, width: int, layers: int, heads: int) -> "GPT":
    if len(input_shape) != 1 or getattr(data, "name", "text") != "text":
        raise ValueError(f"model gpt reads byte sequences (dataset text), got input shape {input_shape}")
    for key, value in (("layers", layers), ("heads", heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"gpt {key} must be a positive integer, got {value!r}")
    if width % heads:
        raise ValueError(f"gpt width {width} must be a multiple of heads {heads}")
    return GPT(vocabulary=num_classes, context=input_shape[0], layers=layers, width=width, heads=heads)


class GPT(nn.Module):
    """A decoder-only transformer over bytes: token and learned position embeddings, pre-LayerNorm blocks of
    causal self-attention (``F.scaled_dot_product_attention``) and a 4x GELU MLP, a final LayerNorm, and
    the output projection tied to the token embedding.

    Input: ``(N, T)`` int64 tokens, T <= context. Output: logits ``(N, vocabulary, T)``, the layout
    ``F.cross_entropy`` takes with ``(N, T)`` targets, so the loss and accuracy of every loop apply per token.
    Weights start as GPT-2's: normal(0, 0.02), the residual projections scaled by 1 / sqrt(2 layers).

    Args:
        vocabulary: tokens (256 for bytes). context: longest input. layers: blocks. width: model width.
        heads: attention heads (dividing width).
    """

    # The simulator's K workers run in a loop: vmap has no batching rule for scaled_dot_product_attention
    # (it loops inside, with a warning) and the stacked interpreter does not trace attention; measured on
    # the default model, K = 4: loop 1.15x one model's step, vmap 1.43x (benchmarks/bench_gpt.py).
    simulate_in_loop = True

    def __init__(self, vocabulary: int = 256, context: int = 64, layers: int = 2, width: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.context = context
        self.token = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        for name, parameter in self.named_parameters():
            if parameter.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attention_out.weight", "mlp_out.weight")) else 0.02
                nn.init.normal_(parameter, std=std)
            elif name.endswith(".bias"):
                nn.init.zeros_(parameter)

    def forward(self, tokens: Tensor) -> Tensor:
        steps = tokens.shape[-1]
        hidden = self.token(tokens) + self.position.weight[:steps]
        for block in self.blocks:
            hidden = block(hidden)
        logits = F.linear(self.norm(hidden), self.token.weight)  # tied: the embedding is the output layer
        return logits.transpose(-1, -2)


class TransformerBlock(nn.Module):
    """``h + attention(LN(h))``, then ``h + MLP(LN(h))``, with causal multi-head self-attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.attention_in = nn.Linear(width, 3 * width)
        self.attention_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, hidden: Tensor) -> Tensor:
        *batch, steps, width = hidden.shape
        q, k, v = self.attention_in(self.norm1(hidden)).chunk(3, dim=-1)
        q, k, v = (t.reshape(*batch, steps, self.heads, width // self.heads).transpose(-2, -3) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(-2, -3).reshape(*batch, steps, width)
        hidden = hidden + self.attention_out(attended)
        return hidden + self.mlp_out(F.gelu(self.mlp_in(self.norm2(hidden))))
