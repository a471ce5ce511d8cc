"""Hyperparameters with one value per layer (the parameter groups of :class:`saef.SAEF`).

A step applies a hyperparameter element-wise on the flat axis. :class:`PerLayer` holds it as runs of equal
values over that axis, so a step does one operation per run -- and exactly the one operation of a single
scalar when every layer agrees (the common case, kept bit-identical to it). :class:`LayerSettings` holds a
local optimizer's named hyperparameters of this kind, once for the whole model.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..compress import Layout

__all__ = ["PerLayer", "LayerSettings", "Scalar"]

Scalar = Union[float, Sequence[float]]  # one value for every layer, or one per layer


class PerLayer:
    """One value per layer of ``layout``, as runs ``(columns, value)`` over the flat axis (a single run
    ``(slice(None), value)`` when all layers agree)."""

    def __init__(self, values: Scalar, layout: Layout, name: str = "value"):
        self.name = name
        if isinstance(values, (int, float)):  # the common case: one value, one run, no loop over layers
            value = self._check(values)
            self.values = (value,) * len(layout)
            self.runs = [(slice(None), value)]
            return
        values = [self._check(v) for v in values]
        if len(values) != len(layout):
            raise ValueError(f"{name} must be one number or one per layer ({len(layout)}), got {len(values)}")
        self.values = tuple(values)
        runs: List[Tuple[int, int, float]] = []
        for v, s in zip(self.values, layout.slices):
            if runs and runs[-1][2] == v and runs[-1][1] == s.start:
                runs[-1] = (runs[-1][0], s.stop, v)
            else:
                runs.append((s.start, s.stop, v))
        if len(runs) <= 1:
            self.runs = [(slice(None), self.values[0] if self.values else 0.0)]
        else:
            self.runs = [(slice(a, b), v) for a, b, v in runs]

    def _check(self, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{self.name} must be a finite number (or one per layer), got {self.name}={value!r}")
        return float(value)

    @property
    def uniform(self) -> bool:
        return len(self.runs) == 1

    def subset(self, layers: Sequence[int], layout: Layout) -> "PerLayer":
        """The values of ``layers``, over ``layout`` (their sub-layout, e.g. the server's owned layers)."""
        if self.uniform:
            return PerLayer(self.runs[0][1], layout, self.name)
        return PerLayer([self.values[i] for i in layers], layout, self.name)

    def pieces(self, columns: slice) -> List[Tuple[slice, float]]:
        """The runs that meet the stretch ``columns`` of the flat axis, as slices relative to it."""
        if self.uniform or columns == slice(None):
            return self.runs
        out = []
        for s, v in self.runs:
            a, b = max(s.start, columns.start), min(s.stop, columns.stop)
            if a < b:
                out.append((slice(a - columns.start, b - columns.start), v))
        return out

    def add(self, target: Tensor, source: Tensor, sign: float = 1.0) -> Tensor:
        """``target += sign * value * source`` in place, run by run over the last axis; returns ``target``."""
        for s, v in self.runs:
            if sign < 0:
                target[..., s].sub_(source[..., s], alpha=v)
            else:
                target[..., s].add_(source[..., s], alpha=v)
        return target

    def multiply(self, source: Tensor, out: Tensor) -> Tensor:
        """``out = value * source``, run by run over the last axis; returns ``out``."""
        if self.uniform:
            return torch.mul(source, self.runs[0][1], out=out)
        for s, v in self.runs:
            torch.mul(source[..., s], v, out=out[..., s])
        return out

    def __repr__(self) -> str:
        if self.uniform:
            return f"PerLayer({self.runs[0][1]!r})"
        return f"PerLayer({list(self.values)!r})"


class LayerSettings:
    """A local optimizer's per-layer hyperparameters by name (momentum, betas, eps, weight decay, ...).

    The whole model's settings are held once (:meth:`put`). The settings of some of its layers (a part of
    the model, e.g. a bucket of an overlapped step) are a view made by :meth:`view`: it holds no values of
    its own and looks each one up in the whole's at every read, so that settings put after the view was
    made (a ``set`` at each step of :class:`saef.SAEF`, for schedulers) reach it.

    Example::

        >>> whole = LayerSettings(Layout([3, 4, 5]))
        >>> whole.put("momentum", 0.9); tail = whole.view([1, 2], Layout([4, 5]))
        >>> whole.put("momentum", [0.9, 0.8, 0.7]); tail["momentum"].values
        (0.8, 0.7)
    """

    def __init__(self, layout: Layout, parent: Optional["LayerSettings"] = None, layers: Sequence[int] = ()):
        self.layout = layout
        self._parent, self._layers = parent, list(layers)
        self._own: Dict[str, PerLayer] = {}
        # A view's subsets, by name: (the whole's value it was cut from, the subset); cut again when that changes.
        self._cut: Dict[str, Tuple[PerLayer, PerLayer]] = {}

    def put(self, name: str, value: Union[Scalar, PerLayer]) -> None:
        """Set ``name`` to ``value`` (one number, one per layer, or a :class:`PerLayer` over this layout)."""
        if self._parent is not None:
            raise ValueError(f"the settings of a part of the layers are read from the whole's; set {name!r} there")
        self._own[name] = value if isinstance(value, PerLayer) else PerLayer(value, self.layout, name)

    def __getitem__(self, name: str) -> PerLayer:
        if self._parent is None:
            return self._own[name]
        whole = self._parent[name]
        cut = self._cut.get(name)
        if cut is None or cut[0] is not whole:  # set anew since the last read
            cut = self._cut[name] = (whole, whole.subset(self._layers, self.layout))
        return cut[1]

    def view(self, layers: Sequence[int], layout: Layout) -> "LayerSettings":
        """The settings of ``layers`` (indices into this layout), over ``layout`` (their sub-layout)."""
        return LayerSettings(layout, self, layers)
