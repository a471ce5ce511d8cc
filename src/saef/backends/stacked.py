"""K copies of a model evaluated together, without ``vmap``, for models built from common layers.

The simulator needs the outputs of K workers, each at its own parameter point and on its own slice of the
batch. ``torch.func.vmap`` does this for any model, but on small models its per-operation batching costs
more than the arithmetic (a 7,460-parameter 1-D CNN: 10 ms for K = 4 gradients against 5 ms for one model
on the same 128 samples). This module traces the model once with ``torch.fx`` and runs the traced graph on
tensors with a leading worker axis, calling batched kernels directly:

- ``Linear``: one ``baddbmm`` over the K workers;
- ``Conv1d``: im2col (a strided view, with a hand-written backward) and one ``baddbmm`` -- several
  times faster here than a grouped convolution for the small channel counts of 1-D models;
- ``Conv2d``: one grouped convolution with the workers folded into the channels (what ``vmap`` does too);
- ``BatchNorm``: one ``batch_norm`` with the workers folded into the channels, so each worker normalises
  with its own slice's statistics and updates its own running statistics;
- activations, dropout and arithmetic act elementwise and need nothing;
- ``flatten``, ``mean``, ``sum``, ``size``, ``view``/``reshape`` and indexing get their dimensions shifted
  by one.

Anything else (another layer type, data-dependent control flow, a parameter used outside its module)
makes :func:`stack_model` return ``None`` and the simulator falls back to ``vmap``; so do module hooks
(they would not run). Every supported operation gives each worker the values the model itself gives, up
to floating-point rounding (``tests/test_stacked.py`` checks outputs against the model and gradients
against a loop over workers). The model is traced in train mode, the mode the simulator runs it in.
"""

from __future__ import annotations

import operator
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["StackedModel", "stack_model"]

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Identity,
    nn.Dropout,
)
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.relu, torch.tanh, torch.sigmoid,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.dropout, F.pad,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "add", "sub", "mul", "contiguous"}


class Unsupported(Exception):
    """The traced model uses something the stacked interpreter does not batch."""


def _shift(dim):
    """A dimension of one worker's tensor as a dimension of the stacked tensor (negative ones stay)."""
    if isinstance(dim, (tuple, list)):
        return type(dim)(_shift(d) for d in dim)
    if not isinstance(dim, int):
        raise Unsupported(f"dimension {dim!r}")
    return dim + 1 if dim >= 0 else dim


def _aligned(args):
    """Tensor arguments of an elementwise operation, made to broadcast as the workers' own tensors do.

    Every tensor here carries the worker axis first. One worker's ``(N, 3) - (3,)`` broadcasts from the
    right; stacked, ``(K, N, 3) - (K, 3)`` would pair K with N. Lower-rank tensors get singleton axes
    after the worker axis: ``(K, 1, 3)``."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if len(tensors) < 2:
        return args
    rank = max(t.dim() for t in tensors)
    return type(args)(a[(slice(None),) + (None,) * (rank - a.dim())] if isinstance(a, Tensor) and a.dim() < rank else a
                      for a in args)


def _linear(module: nn.Linear, params, x: Tensor) -> Tensor:
    weight = params["weight"]  # (K, out, in)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    if params.get("bias") is None:
        out = torch.bmm(flat, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(params["bias"].unsqueeze(1), flat, weight.transpose(1, 2))
    return out.view(*x.shape[:-1], out.shape[-1])


class _Im2Col1d(torch.autograd.Function):
    """``(K, N, C, L)`` -> ``(K, N L_out, C k)``: the windows of a 1-D convolution as matrix rows.

    The forward is a strided view (``unfold``) and one copy. The backward adds the k window offsets back
    with k strided ``add_`` calls; autograd's own ``unfold_backward`` took ~2x as long on these shapes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, width: int, stride: int) -> Tensor:
        k, n, c, length = x.shape
        ctx.shape, ctx.width, ctx.stride = x.shape, width, stride
        out_length = (length - width) // stride + 1
        return x.unfold(-1, width, stride).permute(0, 1, 3, 2, 4).reshape(k, n * out_length, c * width)

    @staticmethod
    def backward(ctx, grad: Tensor):
        k, n, c, length = ctx.shape
        width, stride = ctx.width, ctx.stride
        out_length = (length - width) // stride + 1
        grad = grad.view(k, n, out_length, c, width)
        grad_x = grad.new_zeros(k, n, length, c)
        span = stride * (out_length - 1) + 1
        for offset in range(width):
            grad_x[:, :, offset : offset + span : stride].add_(grad[..., offset])
        return grad_x.transpose(2, 3), None, None


def _conv1d(module: nn.Conv1d, params, x: Tensor) -> Tensor:
    if module.groups != 1 or module.dilation != (1,) or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return _grouped_conv(module, params, x)
    weight = params["weight"]  # (K, out, in, k)
    k, n = x.shape[:2]
    (pad,), (stride,), (width,) = module.padding, module.stride, module.kernel_size
    padded = F.pad(x, (pad, pad)) if pad else x
    cols = _Im2Col1d.apply(padded, width, stride)  # (K, N L_out, in k)
    length = cols.shape[1] // n
    w = weight.reshape(k, weight.shape[1], -1).transpose(1, 2)  # (K, in k, out)
    bias = params.get("bias")
    out = torch.bmm(cols, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), cols, w)
    return out.view(k, n, length, -1).transpose(2, 3)


def _grouped_conv(module, params, x: Tensor) -> Tensor:
    if module.padding_mode != "zeros":
        raise Unsupported(f"padding_mode={module.padding_mode!r}")
    weight, bias = params["weight"], params.get("bias")
    k, n = x.shape[:2]
    folded = x.transpose(0, 1).reshape(n, k * x.shape[2], *x.shape[3:])
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    out = conv(folded, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
               module.stride, module.padding, module.dilation, module.groups * k)
    return out.view(n, k, -1, *out.shape[2:]).transpose(0, 1)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, params, x: Tensor, buffers) -> Tensor:
    if not module.training:
        raise Unsupported("BatchNorm in eval mode")
    if module.momentum is None:
        raise Unsupported("BatchNorm with momentum=None (cumulative average)")
    k, n = x.shape[:2]
    folded = x.transpose(0, 1).reshape(n, k * x.shape[2], *x.shape[3:])
    mean, var = buffers.get("running_mean"), buffers.get("running_var")
    if mean is not None:
        buffers["num_batches_tracked"].add_(1)
    weight, bias = params.get("weight"), params.get("bias")
    out = F.batch_norm(
        folded,
        None if mean is None else mean.view(-1),
        None if var is None else var.view(-1),
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        True, module.momentum, module.eps,
    )
    return out.view(n, k, *x.shape[2:]).transpose(0, 1)


_LAYERS: Dict[type, Callable] = {nn.Linear: _linear, nn.Conv1d: _conv1d, nn.Conv2d: _grouped_conv}


class StackedModel:
    """Runs a traced model on K workers' inputs ``(K, N, ...)`` with stacked parameters ``(K, ...)``.

    Built by :func:`stack_model`; call it as ``stacked(params, buffers, inputs)`` where ``params`` and
    ``buffers`` map the model's qualified names to tensors with a leading worker axis. Running statistics
    in ``buffers`` are updated in place (each worker's own row), as the model would update its own.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.model = model
        self.graph = graph
        self.modules = dict(model.named_modules())
        self.check()

    def check(self) -> None:
        """Raise :class:`Unsupported` for any node the interpreter cannot batch."""
        from torch.nn.modules import module as module_globals

        hooked = [name for name, m in self.modules.items() if m._forward_hooks or m._forward_pre_hooks
                  or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)]
        if hooked or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
            raise Unsupported(f"module hooks ({', '.join(hooked) or 'global'}) would not run on traced layers")
        for node in self.graph.nodes:
            if node.op == "call_module":
                module = self.modules[node.target]
                if not (isinstance(module, _ELEMENTWISE_MODULES + (nn.Flatten, nn.modules.batchnorm._BatchNorm)) or type(module) in _LAYERS):
                    raise Unsupported(f"module {type(module).__name__}")
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
                    raise Unsupported("BatchNorm with momentum=None")
            elif node.op == "call_function":
                if node.target not in _ELEMENTWISE_FUNCTIONS | {torch.flatten, operator.getitem, torch.mean, torch.sum}:
                    raise Unsupported(f"function {getattr(node.target, '__name__', node.target)}")
            elif node.op == "call_method":
                if node.target not in _ELEMENTWISE_METHODS | {"flatten", "mean", "sum", "size", "view", "reshape"}:
                    raise Unsupported(f"method {node.target}")
            reduction = node.op in ("call_function", "call_method") and node.target in ("mean", "sum", torch.mean, torch.sum)
            if reduction:
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                if dim is None or (isinstance(dim, (tuple, list)) and not dim):
                    raise Unsupported("a reduction over the whole tensor (would mix the workers)")
            if node.target is F.pad and (node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") != "constant"):
                raise Unsupported("F.pad with a mode other than 'constant'")
            if node.op == "get_attr":
                raise Unsupported(f"attribute {node.target} used outside its module")
        if sum(node.op == "placeholder" for node in self.graph.nodes) != 1:
            raise Unsupported("a forward with more than one input")

    def __call__(self, params: Dict[str, Tensor], buffers: Dict[str, Tensor], inputs: Tensor) -> Tensor:
        workers = inputs.shape[0]
        values: Dict[str, object] = {}

        def load(arg):
            return fx.node.map_arg(arg, lambda n: values[n.name])

        for node in self.graph.nodes:
            if node.op == "placeholder":
                out = inputs
            elif node.op == "output":
                return load(node.args[0])
            else:
                args, kwargs = load(node.args), load(node.kwargs)
                if node.op == "call_module":
                    out = self._module(node.target, params, buffers, *args, **kwargs)
                elif node.op == "call_function":
                    out = self._function(node.target, workers, args, kwargs)
                else:
                    out = self._method(node.target, workers, args, kwargs)
            values[node.name] = out
        raise Unsupported("graph without output")

    def _module(self, name: str, params, buffers, x: Tensor) -> Tensor:
        module = self.modules[name]
        prefix = f"{name}." if name else ""
        own = {n: params[prefix + n] for n, _ in module.named_parameters(recurse=False)}
        if type(module) in _LAYERS:
            return _LAYERS[type(module)](module, own, x)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return _batch_norm(module, own, x, {n: buffers[prefix + n] for n, _ in module.named_buffers(recurse=False)})
        if isinstance(module, nn.Flatten):
            return x.flatten(_shift(module.start_dim), _shift(module.end_dim))
        return module(x)  # elementwise

    @staticmethod
    def _function(fn, workers: int, args, kwargs):
        if fn is operator.getitem and isinstance(args[0], Tensor):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, Tensor) for i in index):  # advanced indexing: left to vmap
                raise Unsupported("indexing with a tensor")
            if index and index[0] is Ellipsis:
                return args[0][index]
            return args[0][(slice(None),) + index]
        if fn is torch.flatten:
            return StackedModel._flatten(args, kwargs)
        if fn in (torch.mean, torch.sum):
            return StackedModel._reduce(fn, args, kwargs)
        if fn is F.pad and len(args[1]) > 2 * (args[0].dim() - 1):
            raise Unsupported("padding of the batch dimension")
        return fn(*_aligned(args), **kwargs)

    @staticmethod
    def _flatten(args, kwargs):
        """``flatten(t, start_dim=0, end_dim=-1)`` of one worker: start_dim 0 is the stacked tensor's 1."""
        dims = dict(zip(("start_dim", "end_dim"), args[1:]), **kwargs)
        return torch.flatten(args[0], _shift(dims.get("start_dim", 0)), _shift(dims.get("end_dim", -1)))

    @staticmethod
    def _reduce(fn, args, kwargs):
        tensor, rest = args[0], list(args[1:])
        if rest:
            rest[0] = _shift(rest[0])
        else:
            kwargs = {**kwargs, "dim": _shift(kwargs["dim"])}
        return fn(tensor, *rest, **kwargs)

    @staticmethod
    def _method(name: str, workers: int, args, kwargs):
        tensor, rest = args[0], args[1:]
        if name == "flatten":
            return StackedModel._flatten(args, kwargs)
        if name in ("mean", "sum"):
            return StackedModel._reduce(getattr(torch, name), args, kwargs)
        if name == "size":
            if kwargs or len(rest) > 1:
                raise Unsupported("size with keywords")
            return tensor.size(_shift(rest[0])) if rest else tensor.shape[1:]
        if name in ("view", "reshape"):
            if kwargs:
                raise Unsupported(f"{name} with keywords")
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
            # reshape for view too: the stacked layers may return non-contiguous results where the
            # model's own would be contiguous; the values are the same.
            return tensor.reshape(workers, *shape)
        tensor, *rest = _aligned((tensor, *rest))
        return getattr(tensor, name)(*rest, **kwargs)


def stack_model(model: nn.Module) -> Optional[StackedModel]:
    """Trace ``model`` and return a :class:`StackedModel`, or ``None`` if it uses anything unsupported."""
    training = model.training
    try:
        # Traced in train mode, the mode the simulator runs it in: a forward that reads self.training
        # (e.g. F.dropout(h, p, self.training)) records the value at trace time.
        model.train()
        graph = fx.symbolic_trace(model).graph
        return StackedModel(model, graph)
    except Unsupported:
        return None
    except Exception:  # fx cannot trace it (data-dependent control flow, ...): vmap handles it
        return None
    finally:
        model.train(training)
