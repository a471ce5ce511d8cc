"""Compressors: tensor -> payload (what goes on the wire) -> tensor, with exact bit counts.

The lowest layer of saef: it imports nothing else of the package. :mod:`.base` holds the interface and the
payload accounting, :mod:`.sign` and :mod:`.topk` the built-in compressors, :mod:`.kernels` (with the
optional compiled :mod:`._native`) the kernels behind them, :mod:`.packing` the bits on the wire,
:mod:`.registry` the names.
"""

from .base import SERVER, Compressor, Context, Identity, Layout, Payload, mean_of_rows, payload_bits
from .chunked import ChunkedTopK
from .kernels import index_bits, largest
from .lowbit import LowBit
from .packing import pack_bits, unpack_bits
from .powersgd import PowerSGD
from .precision import Precision
from .quantize import QSGD, Natural
from .randk import RandK
from .registry import available_compressors, make_compressor, register_compressor
from .sign import ScaledSign
from .topk import TopK

__all__ = [
    "Compressor", "Context", "SERVER", "Identity", "Layout", "Payload", "payload_bits", "mean_of_rows", "ScaledSign", "TopK", "RandK", "QSGD", "Natural", "PowerSGD", "Precision", "LowBit", "ChunkedTopK",
    "make_compressor", "register_compressor", "available_compressors", "pack_bits", "unpack_bits", "index_bits",
    "largest",
]
