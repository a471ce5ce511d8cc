"""The process groups the distributed transport adds beside the job's own: one per direction, made once
per process group and kept for its life, with its timeout."""

from __future__ import annotations

import datetime
import warnings
from typing import Dict

import torch
import torch.distributed as dist

__all__ = ["direction_groups", "forget_direction_groups"]

_DIRECTION_GROUPS: Dict[object, Dict[str, object]] = {}  # per base group: its uplink and downlink groups


def direction_groups(group=None, device="cpu") -> Dict[str, object]:
    """A process group for the uplink and one for the downlink, of ``group``'s ranks (None: the world),
    made the first time a rank asks (every rank of ``group`` must, at the same point) and kept for the
    process group's life, so that workers made again (resumed, or one per test) do not add groups. Their
    timeout is ``group``'s. Each has run one collective before this returns: a backend that connects a
    group at its first collective (NCCL) must not do so inside a hook while another rank waits in a
    collective of another group."""
    base = group or dist.group.WORLD
    if base not in _DIRECTION_GROUPS:
        ranks = dist.get_process_group_ranks(base)
        timeout = _timeout_of(base, device)
        made = {direction: dist.new_group(ranks, timeout=timeout, use_local_synchronization=True)
                for direction in ("uplink", "downlink")}
        for made_group in made.values():
            dist.all_reduce(torch.zeros(1, device=device), group=made_group)
        _DIRECTION_GROUPS[base] = made
    return _DIRECTION_GROUPS[base]


def forget_direction_groups() -> None:
    """Drop this module's references to the direction groups, before the process groups are destroyed:
    each group is then freed when it is destroyed, while every other part of torch.distributed is still in
    place, not at the interpreter's exit, where a gloo group freed late can abort the process ("terminate
    called without an active exception") after a run that had ended well."""
    _DIRECTION_GROUPS.clear()


def _timeout_of(group, device) -> "datetime.timedelta | None":
    """The timeout ``group`` bounds its collectives with, so that groups made beside it bound theirs
    alike; None (torch's default, with a warning) where this version of torch does not tell."""
    try:
        return group._get_backend(torch.device(device)).options._timeout
    except (AttributeError, RuntimeError):
        warnings.warn("this torch does not tell a process group's timeout: the overlapped step's groups get "
                      "torch's default timeout, not --timeout", stacklevel=3)
        return None
