"""The compressor registry: compressors made from spec strings (``"sign"``, ``"topk:0.01"``), and
:func:`register_compressor` for one's own.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from .base import Compressor, Identity
from .sign import ScaledSign
from .topk import TopK

__all__ = ["make_compressor", "register_compressor", "available_compressors"]


_REGISTRY: Dict[str, Callable[..., Compressor]] = {}


def register_compressor(name: str, factory: Callable[..., Compressor], *, overwrite: bool = False) -> None:
    """Make ``factory`` available as ``make_compressor(name)`` / ``make_compressor("name:ARG")``.

    ``factory`` is called with no argument, or with the text after the colon as one string argument.

    Example::

        >>> class Half(saef.compress.Identity):
        ...     name = "half"
        >>> saef.register_compressor("half", Half)
    """
    if not name or ":" in name:
        raise ValueError(f"compressor name must be non-empty and contain no ':', got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"compressor {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def available_compressors() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _parse_rho(arg: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise ValueError(f"topk: rho must be a number in (0, 1], got {arg!r}") from None


register_compressor("identity", Identity)
register_compressor("sign", ScaledSign)
register_compressor("topk", lambda arg=None: TopK(_parse_rho(arg) if arg is not None else 0.01))


def make_compressor(spec) -> Compressor:
    """Build a compressor from a spec string (``"identity"``, ``"sign"``, ``"topk:0.01"``) or pass one
    through. Unknown names raise ``ValueError`` listing the registered ones."""
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"compressor must be a string like 'sign' or 'topk:0.01', got {spec!r}")
    name, sep, arg = spec.partition(":")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown compressor {spec!r}; registered: {', '.join(available_compressors())}")
    if not sep:
        return factory()
    try:
        return factory(arg)
    except TypeError:
        raise ValueError(f"compressor {name!r} takes no argument, got {spec!r}") from None
