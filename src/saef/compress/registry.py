"""The compressor registry: compressors made from spec strings (``"sign"``, ``"topk:0.01"``,
``"topk:0.01:chunk=4096"`` (top-k per chunk, :mod:`.chunked`), ``"dcttopk:0.1:chunk=64"`` (top-k of each
chunk's DCT coefficients), ``"randk:0.01:unbiased"``, ``"qsgd:4"``,
``"natural"``, ``"powersgd:2"``; any that sends floats also as ``"SPEC:bf16"`` or ``"SPEC:fp16"``, or with
b-bit values and a scale per chunk, ``"SPEC:int8"``, ``"SPEC:int4"``, ``"SPEC:int2"`` (``...sr``: stochastic
rounding; :mod:`.lowbit`)), and :func:`register_compressor` for one's own.

Two of them are not what their names may suggest: ``powersgd:R`` keeps its warm-start Q per sender, each
sender sends its own P and Q, and the server averages the products P_k Q_k^T (not Vogels et al.'s
all-reduce of one shared P and Q; :mod:`.powersgd`); and a ``:bf16`` / ``:fp16`` suffix rounds to nearest,
so on an unbiased compressor (``qsgd:S``, ``randk:RHO:unbiased``) the result is biased and reports
``unbiased = False`` (:mod:`.precision`).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from .base import Compressor, Identity
from .chunked import ChunkedTopK, DCTTopK
from .lowbit import LOW_BITS, LowBit
from .powersgd import PowerSGD
from .precision import WIRE_DTYPES, Precision
from .quantize import QSGD, Natural
from .randk import RandK
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


def _parse_rho(arg: str, name: str = "topk") -> float:
    try:
        return float(arg)
    except ValueError:
        raise ValueError(f"{name}: rho must be a number in (0, 1], got {arg!r}") from None


def _parse_count(arg: str, name: str, what: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise ValueError(f"{name}: {what} must be an integer, got {arg!r}") from None


def _randk(arg: str = None) -> RandK:
    if arg is None:
        raise ValueError("randk needs the fraction kept: randk:RHO or randk:RHO:unbiased")
    rho, _, form = arg.partition(":")
    if form not in ("", "unbiased"):
        raise ValueError(f"randk: the form after RHO may only be 'unbiased', got {form!r}")
    return RandK(_parse_rho(rho, "randk"), unbiased=form == "unbiased")


def _with_argument(name: str, make, what: str):
    def factory(arg: str = None):
        if arg is None:
            raise ValueError(f"{name} needs {what}: {name}:N")
        return make(_parse_count(arg, name, what))
    return factory


register_compressor("identity", Identity)
register_compressor("sign", ScaledSign)
def _topk(arg: str = None) -> Compressor:
    if arg is None:
        return TopK(0.01)
    rho, _, form = arg.partition(":")
    if not form:
        return TopK(_parse_rho(rho))
    key, _, value = form.partition("=")
    if key != "chunk" or not value:
        raise ValueError(f"topk: the form after RHO may only be chunk=N (top-k per chunk of N entries), got {form!r}")
    return ChunkedTopK(_parse_rho(rho), _parse_count(value, "topk", "the chunk size N"))


register_compressor("topk", _topk)


def _dcttopk(arg: str = None) -> Compressor:
    if arg is None:
        raise ValueError("dcttopk needs the fraction kept: dcttopk:RHO or dcttopk:RHO:chunk=N")
    rho, _, form = arg.partition(":")
    key, _, value = form.partition("=")
    if form and (key != "chunk" or not value):
        raise ValueError(f"dcttopk: the form after RHO may only be chunk=N (the DCT's length), got {form!r}")
    return DCTTopK(_parse_rho(rho, "dcttopk"), _parse_count(value, "dcttopk", "the chunk size N") if form else 64)


register_compressor("dcttopk", _dcttopk)
register_compressor("randk", _randk)
register_compressor("qsgd", _with_argument("qsgd", QSGD, "the number of levels S"))
register_compressor("natural", Natural)
register_compressor("powersgd", _with_argument("powersgd", PowerSGD, "the rank R"))


def make_compressor(spec) -> Compressor:
    """Build a compressor from a spec string (``"identity"``, ``"sign"``, ``"topk:0.01"``) or pass one
    through. Unknown names raise ``ValueError`` listing the registered ones."""
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"compressor must be a string like 'sign' or 'topk:0.01', got {spec!r}")
    base, sep, wire = spec.rpartition(":")
    if sep and wire in WIRE_DTYPES:  # a value-precision suffix: the compressor, its floats sent in 16 bits
        return Precision(make_compressor(base), wire)
    if sep and wire in LOW_BITS:  # ... or as b-bit integers with a scale per chunk
        return LowBit(make_compressor(base), wire)
    name, sep, arg = spec.partition(":")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown compressor {spec!r}; registered: {', '.join(available_compressors())}")
    if not sep:
        return factory()
    try:
        return factory(arg)
    except TypeError:
        raise ValueError(f"compressor {name!r} takes no argument, got {spec!r} (value precision: a :bf16, :fp16, :int8, "
                         ":int4 or :int2 suffix)") from None
