"""Compressors: tensor -> payload (what goes on the wire) -> tensor, with exact bit counts.

Every compressor acts on one parameter tensor at a time (layer-wise, as in the paper). Most are
deterministic functions of their input; the others say so with two flags and never hide state in the
object: a *random* one (rand-k, QSGD, natural, PowerSGD's first Q) draws from generators derived from
(seed, step, layer, sender) (:class:`Context`), so every party can redraw what it need not receive, and a
*stateful* one (PowerSGD's warm-start Q, one per sender) keeps its state in the algorithm's named,
checkpointed state, handed to it through the :class:`Context`. The same compressor also works on a
*batch of rows* -- a ``(W, d)`` tensor holding W workers' flattened copies of one layer -- so that the
simulator compresses K workers with one set of kernels. The single-tensor methods are thin wrappers over
the row methods; :class:`Compressor` says which few methods a new compressor must write.

A payload is a tuple of tensors whose leading axis is the row (worker) axis. Its size in bits is the size of
those tensors, nothing nominal: :func:`payload_bits` reads ``numel * element_size``.

The base classes are here, with the :class:`Context` that gives random and stateful compressors their
draws and state; the built-in compressors live in :mod:`saef.compress.sign` (``ScaledSign``),
:mod:`saef.compress.topk` (``TopK``), :mod:`saef.compress.randk` (``RandK``), :mod:`saef.compress.quantize`
(``QSGD``, ``Natural``) and :mod:`saef.compress.powersgd` (``PowerSGD``), with 16-bit values by
:mod:`saef.compress.precision`; the registry is :mod:`saef.compress.registry`.

The server's mean of K rows (:meth:`Compressor.decode_mean_layers`) must give each element the same value
whichever other layers are decoded with it: a sharded server averages a subset of the layers, one process
averages all of them, and the two must agree bit for bit. The built-in compressors add the rows' values in
row order, element by element (:func:`mean_of_rows` for dense rows).

Registered compressors, with the delta of the delta-approximation ``||C(v) - v||^2 <= (1 - delta) ||v||^2``
(Assumption 4 of the paper) for a tensor of ``d`` elements:

==================  ===========================================  ===============================================
name                C(v)                                         payload (bits per tensor, fp32 values)
==================  ===========================================  ===============================================
``identity``        v                    (delta = 1)             values: 32 d
``sign``            (||v||_1 / d) sign(v), sign(0) := +1         signs packed 8 per byte + one scale:
                    (delta = 1 / d)                              8 ceil(d / 8) + 32
``topk:RHO``        the k = max(1, floor(RHO d)) entries of      values in index order + the indices in the
                    largest magnitude  (delta = k / d)           shorter of the Elias-Fano code (k L + k +
                                                                 ((d - 1) >> L) + 1 bits, L = floor(log2(d/k)))
                                                                 and k b bits, b = ceil(log2 d):
                                                                 32 k + 8 ceil(min(EF, k b) / 8)
==================  ===========================================  ===============================================

The others (``randk:RHO[:unbiased]``, ``qsgd:S``, ``natural``, ``powersgd:R``, and any ``SPEC:bf16`` /
``SPEC:fp16``) document their formats in their modules. ``powersgd:R`` keeps a Q per sender and the server
averages the senders' P_k Q_k^T (not Vogels et al.'s shared-Q all-reduce); a 16-bit suffix rounds to
nearest, so it is never unbiased.

Example::

    >>> import torch, saef
    >>> c = saef.make_compressor("topk:0.25")
    >>> v = torch.tensor([0.5, -2.0, 0.1, 1.0])
    >>> c.compress(v)
    tensor([ 0., -2.,  0.,  0.])
    >>> payload = c.encode(v); c.bits(payload)   # one fp32 value + one 2-bit index packed in a byte
    40
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Payload = Tuple[Tensor, ...]

__all__ = ["Layout", "Compressor", "DecodesInPlace", "Context", "SERVER", "Identity", "kept_count", "Payload", "payload_bits", "mean_of_rows"]


def mean_of_rows(rows: Tensor) -> Tensor:
    """The mean of the ``(W, n)`` rows, ``(n,)``: added in row order, then divided by W. Element by element,
    so the value of a column does not depend on which other columns are averaged with it (a sharded server
    and one process get the same bits); ``rows.mean(0)`` gives no such promise."""
    total = rows[0].clone()
    for row in rows[1:]:
        total.add_(row)
    return total.div_(rows.shape[0])


def payload_bits(payload: Payload) -> int:
    """Size in bits of the tensors of ``payload``, all rows together."""
    return sum(t.numel() * t.element_size() * 8 for t in payload)


class Layout:
    """Layers laid end to end on one flat axis: layer i is ``[offsets[i], offsets[i] + sizes[i])``.

    The algorithm keeps all layers of all workers in one ``(W, P)`` tensor; a layout tells compressors
    where each layer is, so that they can compress every layer (still layer-wise) with a few kernels.
    """

    def __init__(self, sizes: Sequence[int], shapes: Optional[Sequence[Sequence[int]]] = None,
                 ids: Optional[Sequence[int]] = None):
        self.sizes = [int(d) for d in sizes]
        if any(d < 0 for d in self.sizes):
            raise ValueError(f"layer sizes must be >= 0, got {self.sizes}")
        # Each layer's tensor shape (PowerSGD views a layer as a matrix) and its index in the whole model
        # (the id a random compressor derives its draws from, the same in a sub-layout of owned layers).
        self.shapes = [tuple(int(n) for n in s) for s in shapes] if shapes is not None else [(d,) for d in self.sizes]
        self.ids = [int(i) for i in ids] if ids is not None else list(range(len(self.sizes)))
        if len(self.shapes) != len(self.sizes) or any(math.prod(s) != d for s, d in zip(self.shapes, self.sizes)):
            raise ValueError(f"layer shapes {self.shapes} do not match the sizes {self.sizes}")
        self.offsets = [0]
        for d in self.sizes:
            self.offsets.append(self.offsets[-1] + d)
        self.total = self.offsets[-1]
        self.slices = [slice(a, b) for a, b in zip(self.offsets, self.offsets[1:])]
        self._cache: Dict[tuple, object] = {}

    def __len__(self) -> int:
        return len(self.sizes)

    def subset(self, layers: Sequence[int]) -> "Layout":
        """The layout of the given layers laid end to end."""
        return Layout([self.sizes[i] for i in layers], [self.shapes[i] for i in layers], [self.ids[i] for i in layers])

    def span(self, layers: Sequence[int]):
        """The slice of the flat axis that ``layers`` cover when they are consecutive (``None`` otherwise,
        or for no layers)."""
        layers = list(layers)
        if not layers or layers != list(range(layers[0], layers[-1] + 1)):
            return None
        return slice(self.offsets[layers[0]], self.offsets[layers[-1] + 1])

    def memo(self, key: tuple, make: Callable[[], object]) -> object:
        """``make()``, computed once per layout and key (index maps and plans are reused every step)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def cached(self, name: str, device: torch.device, make: Callable[[], Tensor]) -> Tensor:
        """A per-layout, per-device index tensor, made once."""
        return self.memo((name, device), lambda: make().to(device))


SERVER = -1  # the sender id of the server's payloads (workers are 0 .. K-1)

_MASK = (1 << 64) - 1


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each part in turn): distinct tuples give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 29
    return h >> 1


class Context:
    """Where the randomness and the state of a step's payloads come from.

    A random compressor draws layer i of sender s at step t from a generator seeded by
    (seed, t, id of layer i, s), so every party -- the sender, the server, the other workers, and the
    simulator playing all of them -- can make the same draws without sending them (rand-k's indices are
    never sent). A stateful compressor (PowerSGD's warm-started Q) reads and updates ``state``, one
    ``(W, S)`` row per sender, when it encodes.

    Args:
        seed: the run's seed. step: the step t.
        senders: the sender id of each payload row: worker ids 0 .. K-1, or :data:`SERVER`.
        state: the compressor's state of those senders, ``(W, S)`` (see :meth:`Compressor.state_sizes`), or None.
        state_slices: where each layer's state lies in ``state``, by layer id.
    """

    def __init__(self, seed: int = 0, step: int = 0, senders: Sequence[int] = (0,), state: Optional[Tensor] = None,
                 state_slices: Optional[Dict[int, slice]] = None):
        self.seed, self.step = int(seed), int(step)
        self.senders = tuple(int(s) for s in senders)
        self.state, self.state_slices = state, state_slices or {}

    def with_senders(self, senders: Sequence[int]) -> "Context":
        """The same step for other senders (a receiver decoding rows of its own choosing), without state."""
        return Context(self.seed, self.step, senders)

    def generators(self, layer_id: int, device) -> List[torch.Generator]:
        """One fresh generator per row, for layer ``layer_id`` (the same draws every time they are made)."""
        device = torch.device(device)
        return [torch.Generator(device=device).manual_seed(_mix(self.seed, self.step, layer_id, s)) for s in self.senders]

    def __repr__(self) -> str:
        return f"Context(seed={self.seed}, step={self.step}, senders={self.senders})"


def replayable(generators: Optional[Sequence[Optional[torch.Generator]]], rows: int, device) -> Tuple[list, list]:
    """Two lists of ``rows`` generators that make the same draws: one for an encoder, one for a decoder that
    must redraw them. Without generators (or with None), the seed is a fresh draw of torch's global one."""
    if generators is None or any(g is None for g in generators):
        seed = int(torch.randint(0, 2**62, (1,)))
        generators = [torch.Generator(device=torch.device(device)).manual_seed(_mix(seed, r)) for r in range(rows)]
    replay = []
    for g in generators:
        twin = torch.Generator(device=g.device)
        twin.set_state(g.get_state())
        replay.append(twin)
    return list(generators), replay


class Compressor:
    """Base class of the compressors: C(v) as a payload (what goes on the wire) and its decoding.

    A new compressor implements two methods, on rows (``(W, d)``, one row per worker, one layer):

    * ``encode_rows(rows) -> Payload`` -- a tuple of tensors, each with W rows; its bits are counted from
      them (:func:`payload_bits`), so the payload is exactly what would be sent;
    * ``decode_rows(payload, d) -> Tensor`` -- the dense ``(W, d)`` values the payload stands for;

    and sets ``name``. It should also give ``delta(d)`` if it is contractive (the delta of Assumption 4,
    which the property tests check; the algorithm never calls it). Everything else has a default built on
    those two, so such a compressor runs in the simulator, the distributed backends and every rule.

    Optional, for speed: ``compress_rows`` (the dense C(v) computed directly; default decode(encode(v))),
    the layer methods ``encode_layers`` / ``decode_layers`` (all layers of a flat ``(W, P)`` tensor at once
    in the same payload format; default a loop over layers), ``decode_mean_layers`` (the server's average of
    W rows' payloads; default the mean of ``decode_layers``, which top-k replaces by adding its sparse
    values), and the buffer-reusing ``decode_layers_into``, ``subtract_decoded`` (the error update
    ``target -= decode``) and ``add_decoded`` (EF21's ``target += decode``); :class:`DecodesInPlace` routes
    those four through one decoder.

    Optional, for randomness and state: ``random = True`` makes the row methods receive ``generators`` (one
    per row, derived from the :class:`Context`); ``stateful = True`` with ``state_sizes`` and ``init_state``
    gives it named per-sender state that its layer methods read and update through ``context.state``
    (PowerSGD). ``unbiased = True`` says E C(v) = v (then it has no delta: it is for ``method="direct"``);
    ``sends_floats = False`` refuses a ``:bf16`` / ``:fp16`` suffix.

    Example (keeps every other entry; a test runs it through the simulator)::

        >>> class EveryOther(Compressor):
        ...     name = "every-other"
        ...     def encode_rows(self, rows):
        ...         return (rows[:, ::2].clone(),)
        ...     def decode_rows(self, payload, d):
        ...         out = payload[0].new_zeros(payload[0].shape[0], d)
        ...         out[:, ::2] = payload[0]
        ...         return out
        >>> EveryOther().compress(torch.tensor([1.0, 2.0, 3.0]))
        tensor([1., 0., 3.])
    """

    name: str = "compressor"
    random: bool = False  # whether it draws randomness (then its row methods take ``generators``)
    stateful: bool = False  # whether it keeps state per sender (:meth:`state_sizes`)
    unbiased: bool = False  # whether E C(v) = v (then it has no delta: it is for method="direct")
    sends_floats: bool = True  # whether its payload holds floating-point values (a :bf16/:fp16 suffix applies)

    # --- row API: V is (W, d), one row per worker -------------------------------------------------
    def encode_rows(self, rows: Tensor) -> Payload:
        raise NotImplementedError

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        raise NotImplementedError

    def compress_rows(self, rows: Tensor, **draws) -> Tensor:
        """C of each row. A random compressor takes ``generators`` (one per row; None: torch's global one),
        used by the encoder; one whose decoder also draws (rand-k) overrides this."""
        return self.decode_rows(self.encode_rows(rows, **draws), rows.shape[1])

    def delta(self, d: int) -> float:
        """The delta of Assumption 4 this compressor guarantees on a tensor of ``d`` elements (an unbiased
        compressor has none: it is refused, naming the rule it is meant for)."""
        if self.unbiased:
            raise ValueError(f"{self.name} is unbiased, not contractive: it has no delta (use it with method='direct')")
        raise NotImplementedError

    def state_sizes(self, layout: Layout) -> List[int]:
        """Elements of state kept per sender for each layer of ``layout`` (all 0: stateless, the default)."""
        return [0] * len(layout)

    def init_state(self, layout: Layout, context: "Context") -> None:
        """Fill ``context.state`` (``(W, sum(state_sizes))``, at the slices ``context.state_slices``) with
        the state at the start. Nothing for a stateless compressor."""

    def payload_templates(self, layout: Layout, dtype: torch.dtype = torch.float32) -> List[Payload]:
        """The shapes and dtypes of one row's payload for each layer (as tensors on the meta device), from
        encoding zeros once: what a receiver needs to cut a byte stream into payloads."""
        zeros = torch.zeros(1, layout.total, dtype=dtype)
        encoded = self.encode_layers(zeros, layout, **self.context_args(Context(0, 0, (SERVER,))))
        return [tuple(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in payload) for payload in encoded]

    def context_args(self, context: Optional["Context"]) -> Dict[str, object]:
        """``{"context": context}`` for a compressor that uses one (random or stateful), else ``{}``: how the
        step calls the layer methods, so that a compressor written without ``context`` keeps working."""
        return {"context": context} if (self.random or self.stateful) else {}

    def _draws(self, layout: Layout, i: int, context: Optional["Context"], device) -> Dict[str, object]:
        """The keyword arguments of the row methods for layer i: the generators of a random compressor."""
        if not self.random:
            return {}
        if context is None:
            raise ValueError(f"{self.name} draws randomness: the layer methods need a context= (seed, step, senders)")
        return {"generators": context.generators(layout.ids[i], device)}

    # --- layer API: rows is (W, P), the layers of ``layout`` end to end ------------------------------
    # ``context`` says where the draws and the state of random and stateful compressors come from (see
    # :class:`Context`); the others ignore it.
    def encode_layers(self, rows: Tensor, layout: Layout, context: Optional[Context] = None) -> List[Payload]:
        """One payload per layer (each with W rows)."""
        return [self.encode_rows(rows[:, s], **self._draws(layout, i, context, rows.device)) for i, s in enumerate(layout.slices)]

    def decode_layers(self, payloads: Sequence[Payload], layout: Layout, context: Optional[Context] = None) -> Tensor:
        """The dense ``(W, P)`` tensor the per-layer payloads stand for."""
        device = payloads[0][0].device if payloads else "cpu"
        return torch.cat([self.decode_rows(p, d, **self._draws(layout, i, context, device))
                          for i, (p, d) in enumerate(zip(payloads, layout.sizes))], dim=1)

    def decode_layers_into(self, payloads: Sequence[Payload], layout: Layout, out: Tensor, context: Optional[Context] = None) -> Tensor:
        """:meth:`decode_layers` written into ``out`` (``(W, P)``), which is returned: lets a caller reuse
        one buffer every step. The default copies; built-in compressors decode in place."""
        return out.copy_(self.decode_layers(payloads, layout, **self.context_args(context)))

    def subtract_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor, context: Optional[Context] = None) -> Tensor:
        """``target -= decode_layers(payloads, layout)`` in place (``(W, P)``; the error update of
        Algorithm 1), returned. Top-k subtracts its kept values only; sign decodes into a reused buffer."""
        return target.sub_(self.decode_layers(payloads, layout, **self.context_args(context)))

    def add_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor, context: Optional[Context] = None) -> Tensor:
        """``target += decode_layers(payloads, layout)`` in place (``(W, P)``), returned."""
        return target.add_(self.decode_layers(payloads, layout, **self.context_args(context)))

    def decode_mean_layers(self, payloads: Sequence[Payload], layout: Layout, context: Optional[Context] = None) -> Tensor:
        """The mean over rows of :meth:`decode_layers`, ``(P,)`` (what the server averages), element by
        element as :func:`mean_of_rows` adds them (see the module docstring)."""
        return mean_of_rows(self.decode_layers(payloads, layout, **self.context_args(context)))

    # --- single-tensor API -------------------------------------------------------------------------
    # A random compressor draws from ``generator`` (a torch.Generator) when one is given, else from torch's
    # global generator, as torch.rand does; deterministic compressors ignore it. To decode a payload whose
    # draws were not sent (rand-k), give decode a generator in the state encode's generator started in.
    def _one(self, generator) -> Dict[str, object]:
        return {"generators": [generator]} if self.random else {}

    def encode(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Payload:
        """The tensors that go on the wire for ``v`` (any shape; treated as a flat vector)."""
        return self.encode_rows(v.reshape(1, -1), **self._one(generator))

    def decode(self, payload: Payload, shape, generator: Optional[torch.Generator] = None) -> Tensor:
        """The dense tensor of ``shape`` that ``payload`` stands for."""
        d = math.prod(shape)
        return self.decode_rows(payload, d, **self._one(generator)).reshape(shape)

    def compress(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """The dense approximation C(v), same shape and dtype as ``v``."""
        return self.compress_rows(v.reshape(1, -1), **self._one(generator)).reshape(v.shape)

    @staticmethod
    def bits(payload: Payload) -> int:
        """Exact size of ``payload`` in bits."""
        return payload_bits(payload)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def kept_count(rho: float, d: int) -> int:
    """Entries a sparsifier keeping the fraction ``rho`` keeps of ``d``: max(1, floor(rho d)), 0 of none.
    The tiny relative slack makes 0.3 * 10 count as 3."""
    if d == 0:
        return 0
    return min(d, max(1, math.floor(rho * d * (1 + 1e-12))))


class DecodesInPlace(Compressor):
    """A compressor with one decoder, :meth:`_decode`, that writes (``mode="write"``), adds or subtracts
    the payloads' values into a buffer; the four buffer-reusing layer methods all go through it (for top-k
    only the kept entries change, so adding or subtracting needs no dense decode)."""

    def _decode(self, payloads: Sequence[Payload], layout: Layout, out: Tensor = None, mode: str = "write") -> Tensor:
        raise NotImplementedError

    def decode_layers(self, payloads: Sequence[Payload], layout: Layout, context=None) -> Tensor:
        return self._decode(payloads, layout)

    def decode_layers_into(self, payloads: Sequence[Payload], layout: Layout, out: Tensor, context=None) -> Tensor:
        return self._decode(payloads, layout, out)

    def subtract_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor, context=None) -> Tensor:
        return self._decode(payloads, layout, target, "subtract")

    def add_decoded(self, payloads: Sequence[Payload], layout: Layout, target: Tensor, context=None) -> Tensor:
        return self._decode(payloads, layout, target, "add")


class Identity(Compressor):
    """No compression: the payload is the values themselves (32 bits per fp32 element)."""

    name = "identity"

    def encode_rows(self, rows: Tensor) -> Payload:
        return (rows,)

    def decode_rows(self, payload: Payload, d: int) -> Tensor:
        return payload[0]

    def compress_rows(self, rows: Tensor) -> Tensor:
        return rows

    def delta(self, d: int) -> float:
        return 1.0
