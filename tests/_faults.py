"""``saef`` with a fault injected where the environment variable SAEF_FAULT asks, for the crash tests.

    SAEF_FAULT=kill-at-step:37 python tests/_faults.py train ...        # SIGKILL after step 37
    SAEF_FAULT=kill-in-checkpoint:40@1 python tests/_faults.py train ... # half a checkpoint file, then SIGKILL (rank 1)

Faults fire on the first attempt only (not after a torchrun restart). torch's pickling object collectives
fail under this script (saef must not use them). The library has no fault code of its
own: this script hooks into the loop through ``saef.app.hooks`` and then runs the ordinary command line.
"""

import os
import signal
import sys

from saef.app import hooks
from saef.app.cli import main


def _wanted(kind: str, step: int, rank: int) -> bool:
    spec = os.environ.get("SAEF_FAULT", "")
    if not spec.startswith(kind + ":") or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    where, _, on_rank = spec[len(kind) + 1 :].partition("@")
    return int(where) == step and (not on_rank or int(on_rank) == rank)


def _die() -> None:
    """As abruptly as a power cut allows: no cleanup, no flushing."""
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_step(step: int, rank: int) -> None:
    if _wanted("kill-at-step", step, rank):
        _die()


def _torn_checkpoint(folder, name: str, data: bytes, step: int, rank: int) -> None:
    if _wanted("kill-in-checkpoint", step, rank):  # a torn write: half the bytes, then death
        with open(folder / f".{name}.torn.tmp", "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
        _die()


def _no_pickles() -> None:
    """The ranks exchange data, never pickles (which would run a peer's code): torch's object collectives
    fail here, so every run through this script checks that saef does without them."""
    import torch.distributed as dist

    def refused(*args, **kwargs):
        raise AssertionError("saef exchanged a pickle between ranks")

    for name in ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"):
        setattr(dist, name, refused)


if __name__ == "__main__":
    _no_pickles()
    hooks.after_step.append(_kill_at_step)
    hooks.before_checkpoint_write.append(_torn_checkpoint)
    sys.exit(main(sys.argv[1:]))
