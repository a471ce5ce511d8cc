"""PowerSGD (Vogels et al. 2019): a rank-R approximation of each layer seen as a matrix, from one power
iteration warm-started at the previous step's Q.

A layer of shape (n, ...) is the n x m matrix M (m: the product of the other dimensions; a conv weight is
(out, in k k)). With Q (m x R), kept per sender and per layer::

    P = orthonormalised(M Q)   (n x R);   Q <- M^T P   (m x R);   C(M) = P Q^T;   send P and Q

1-D layers, and matrices where R (n + m) >= n m (no saving), are sent as they are. Q starts from a normal
draw of the context's generator (seed, layer, sender) and is part of the algorithm's state (checkpointed).
Without a state (the single-tensor API), Q is drawn fresh on every call. Payload per layer: (n + m) R values,
32 bits each in fp32.

Not Vogels et al.'s all-reduce: there, every worker multiplies by one shared Q, P = mean_k M_k Q is
all-reduced and orthonormalised before Q = mean_k M_k^T P is all-reduced, so the mean is itself rank R.
Here each sender k keeps its own Q_k, computes its own P_k and Q_k and sends both (one message, no round
between P and Q), and the server sums the K products P_k Q_k^T and divides by K: a mean of rank up to K R,
decoded dense. Error feedback repairs each sender's own rank-R error, as for any other compressor.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import Compressor, Context, Layout, Payload, mean_of_rows

__all__ = ["PowerSGD"]


class PowerSGD(Compressor):
    """Rank-R PowerSGD with one power iteration per step (see the module docstring).

    Args:
        rank: R >= 1.
    """

    random = True  # the first Q is drawn
    stateful = True

    def __init__(self, rank: int):
        if isinstance(rank, bool) or not isinstance(rank, int) or not (1 <= rank <= 4096):
            raise ValueError(f"powersgd: the rank R must be an integer in [1, 4096], got {rank!r}")
        self.rank = rank
        self.name = f"powersgd:{rank}"

    def matrix(self, shape: Sequence[int]) -> Optional[Tuple[int, int]]:
        """(n, m) of the matrix view of a layer of ``shape``; None when it is sent as it is."""
        if len(shape) < 2:
            return None
        n = int(shape[0])
        m = math.prod(shape[1:])
        if self.rank * (n + m) >= n * m:
            return None
        return n, m

    def state_sizes(self, layout: Layout) -> List[int]:
        return [0 if self.matrix(s) is None else self.matrix(s)[1] * self.rank for s in layout.shapes]

    def init_state(self, layout: Layout, context: Context) -> None:
        for i, shape in enumerate(layout.shapes):
            if self.matrix(shape) is not None:
                q = context.state[:, context.state_slices[layout.ids[i]]]
                for row, g in zip(q, context.generators(layout.ids[i], q.device)):
                    row.normal_(generator=g)

    # --- one layer of W rows -------------------------------------------------------------------------
    def _encode_matrix(self, rows: Tensor, n: int, m: int, q: Optional[Tensor], generators) -> Payload:
        """rows (W, n m); q: the (W, m R) state to start from and update in place, or None (a fresh draw)."""
        w, r = rows.shape[0], self.rank
        mats = rows.reshape(w, n, m)
        if q is None:
            start = torch.empty(w, m, r, dtype=rows.dtype, device=rows.device)
            for row, g in zip(start, generators if generators is not None else [None] * w):
                row.normal_(generator=g)
        else:
            start = q.view(w, m, r)
        p = torch.linalg.qr(torch.bmm(mats, start)).Q  # (W, n, R), orthonormal columns
        q_new = torch.bmm(mats.transpose(1, 2), p)  # (W, m, R)
        if q is not None:
            # warm start for the next step; a row whose M was zero keeps its Q (a zero Q would stay zero)
            alive = torch.linalg.vector_norm(q_new.reshape(w, -1), dim=1) > 0
            q.view(w, m, r).copy_(torch.where(alive.view(w, 1, 1), q_new, start))
        return p.reshape(w, n * r), q_new.reshape(w, m * r)

    def _decode_matrix(self, payload: Payload, n: int, m: int) -> Tensor:
        p, q = payload
        w, r = p.shape[0], self.rank
        return torch.bmm(p.view(w, n, r), q.view(w, m, r).transpose(1, 2)).reshape(w, n * m)

    # --- layer API ---------------------------------------------------------------------------------
    def encode_layers(self, rows: Tensor, layout: Layout, context: Optional[Context] = None) -> List[Payload]:
        out = []
        for i, (s, shape) in enumerate(zip(layout.slices, layout.shapes)):
            nm = self.matrix(shape)
            if nm is None:
                out.append((rows[:, s],))
                continue
            layer = layout.ids[i]
            has_state = context is not None and context.state is not None
            q = context.state[:, context.state_slices[layer]] if has_state else None
            generators = None if has_state or context is None else context.generators(layer, rows.device)
            out.append(self._encode_matrix(rows[:, s], *nm, q, generators))
        return out

    def decode_layers(self, payloads: Sequence[Payload], layout: Layout, context: Optional[Context] = None) -> Tensor:
        parts = []
        for payload, shape in zip(payloads, layout.shapes):
            nm = self.matrix(shape)
            parts.append(payload[0] if nm is None else self._decode_matrix(payload, *nm))
        return torch.cat(parts, dim=1)

    def decode_mean_layers(self, payloads: Sequence[Payload], layout: Layout, context: Optional[Context] = None) -> Tensor:
        return mean_of_rows(self.decode_layers(payloads, layout))

    # --- row and single-tensor API: a row is a flat vector, so the matrix view needs the tensor's shape --
    def encode_rows(self, rows: Tensor, generators=None) -> Payload:
        return (rows,)  # a flat row has no matrix view: sent as it is

    def decode_rows(self, payload: Payload, d: int, generators=None) -> Tensor:
        return payload[0]

    def encode(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Payload:
        """Of a tensor with two or more dimensions, its matrix view (first dimension against the rest)."""
        nm = self.matrix(v.shape)
        if nm is None:
            return (v.reshape(1, -1),)
        return self._encode_matrix(v.reshape(1, -1), *nm, None, [generator])

    def decode(self, payload: Payload, shape, generator: Optional[torch.Generator] = None) -> Tensor:
        nm = self.matrix(shape)
        dense = payload[0] if nm is None else self._decode_matrix(payload, *nm)
        return dense.reshape(shape)

    def compress(self, v: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.decode(self.encode(v, generator), v.shape)

    def delta(self, d: int) -> float:
        raise ValueError(f"{self.name} has no worst-case delta (one power iteration); it is used as a contractive "
                         "compressor in practice")
