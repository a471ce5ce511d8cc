"""Which rank serves each layer: the greedy assignment every rank computes alike (no message needed)."""

from __future__ import annotations

from typing import List, Optional, Sequence

__all__ = ["assign_layers"]


def assign_layers(sizes: Sequence[int], ranks: int, load: Optional[Sequence[int]] = None,
                  largest_first: bool = True) -> List[int]:
    """Owner rank of each layer: largest layers first, each to the least-loaded rank (ties: lowest rank),
    so every rank serves a balanced share of whole layers. Deterministic, so all ranks agree.

    Args:
        sizes: number of elements of each layer.
        ranks: number of ranks (>= 1).
        load: elements each rank serves already (layers joining a model whose layers keep their owners,
            :meth:`DistributedTransport.add_layers`); default none.
        largest_first: False: the layers in the order given instead (how layers added later have always
            been placed, so that the owners a saved state was made with stay the owners it is loaded with).

    Example::

        >>> assign_layers([10, 40, 30, 20], 2)
        [0, 0, 1, 1]
    """
    load = [0] * ranks if load is None else list(load)
    owner = [0] * len(sizes)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)) if largest_first else range(len(sizes))
    for i in order:
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner
