"""Checkpoints that lose nothing: written atomically, verified by a checksum, loaded with weights_only.

A run directory's checkpoints live in ``RUN_DIR/checkpoints/``:

* ``step-00000123.rank0.pt`` ...  one file per rank (one file in the simulator), each written to a temporary
  file, fsync-ed and renamed, so a crash mid-write leaves the previous checkpoints intact;
* ``manifest.json``  the complete checkpoints, newest last, with every file's SHA-256. It is rewritten
  (atomically) only after all files of a checkpoint are on disk, so a checkpoint that is listed is whole.

Loading takes the newest listed checkpoint whose files all match their checksums, and falls back to an
older one, with a warning, when a file is truncated or corrupted.

The folder is data, never a path to somewhere else (:mod:`saef.files`): the manifest's file names must be
plain names of files in it, neither the folder nor a file in it is followed as a symbolic link, and the
manifest is read only up to :data:`MANIFEST_LIMIT` bytes.

What a checkpoint holds is decided by the training loop (:mod:`saef.app.loop`): parameters, every worker's
momentum and error, the server error (per owner rank), BatchNorm buffers, step, epoch and the epoch's
accumulators, the data-order generator and every RNG (torch, numpy, python), and the bit counters. Only
tensors, numbers, strings, lists and dicts are stored, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..files import checked_folder, parse_json, read_inside, remove_inside, safe_name, write_atomically
from . import hooks

__all__ = ["CheckpointError", "save", "load_latest", "capture_rng", "restore_rng", "FORMAT_VERSION"]

FORMAT_VERSION = 3  # 2: the algorithm's state as named tensors, and the bit ledger; 3: averaging bits counted both ways
MANIFEST = "manifest.json"
MANIFEST_LIMIT = 64 << 20  # bytes: 65536 kept checkpoints of a few hundred ranks


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one from another version or configuration."""


def _file_name(step: int, rank: int) -> str:
    return f"step-{step:08d}.rank{rank}.pt"


def _read_manifest(folder: Path) -> List[Dict[str, Any]]:
    path = folder / MANIFEST
    try:
        entries = parse_json(read_inside(folder, MANIFEST, MANIFEST_LIMIT), path)
    except FileNotFoundError:
        if not os.path.lexists(folder):
            return []
        checked_folder(folder)  # a manifest missing from a link to a folder elsewhere: refused too
        return []
    except OSError as error:
        raise CheckpointError(f"{path} is not a valid checkpoint manifest ({error})") from None
    if not isinstance(entries, list) or not all(_valid_entry(e) for e in entries):
        raise CheckpointError(f"{path} is not a valid checkpoint manifest (expected a list of "
                              "{step, world, files} entries)")
    for entry in entries:  # the names it lists are deleted when they fall out of the list: plain names only
        for name in entry["files"]:
            safe_name(name, path)
    return entries


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("step"), int) and isinstance(entry.get("world"), int)
            and isinstance(entry.get("files"), dict)
            and all(isinstance(k, str) and isinstance(v, (str, type(None))) for k, v in entry["files"].items()))


def save(folder: Path, step: int, state: Dict[str, Any], *, rank: int = 0, world: int = 1, keep: int = 3,
         barrier=None) -> str:
    """Write this rank's ``state`` for ``step``; rank 0 then lists the checkpoint in the manifest.

    ``barrier`` (distributed runs) is called between writing the files and listing them, so that the
    manifest names only checkpoints whose every rank file is on disk. Returns this rank's file's SHA-256.
    """
    folder = checked_folder(folder, create=True)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, "step": step, "rank": rank, "world": world, "state": state}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    hooks.call(hooks.before_checkpoint_write, folder, _file_name(step, rank), data, step, rank)
    write_atomically(folder / _file_name(step, rank), data)
    digests = [None] * world
    if barrier is not None:
        digests = barrier(digest)  # all ranks' digests, once all have written
    else:
        digests[rank] = digest
    if rank == 0:
        entries = [e for e in _read_manifest(folder) if e["step"] != step]
        entries.append({"step": step, "world": world, "files": {_file_name(step, r): d for r, d in enumerate(digests)}})
        stale, entries = entries[:-keep], entries[-keep:]
        write_atomically(folder / MANIFEST, (json.dumps(entries, indent=1) + "\n").encode())
        for entry in stale:  # only after the manifest no longer lists them
            for name in entry["files"]:
                remove_inside(folder, name)
    return digest


def load_latest(folder: Path, *, rank: int = 0, world: Optional[int] = 1, agree=None) -> Optional[Dict[str, Any]]:
    """This rank's state from the newest complete, uncorrupted checkpoint; None when there is none.
    ``world=None`` accepts a checkpoint written by any number of processes (for --reset-errors).

    ``agree`` (distributed runs: every rank's value, as :meth:`saef.backends.base.Backend.gather` gives it)
    makes the ranks load the same step: each finds the steps whose file it holds intact, and all take the
    newest step every rank holds; when there is none, every rank raises :class:`CheckpointError`.
    """
    folder = Path(folder)
    try:
        listed, intact, problems, newest = _scan(folder, rank, world)
        failure = None
    except CheckpointError as error:  # still take part in the agreement below, so no rank is left waiting
        listed, intact, problems, newest, failure = 0, [], [], None, error
    mine = {"listed": listed, "intact": intact}
    everyone = agree(mine) if agree is not None else [mine]
    if failure is not None:
        raise failure
    step = _agreed_step(folder, everyone, problems)
    if step is None:
        return None
    name = _file_name(step, rank)
    data = newest if step == intact[0] else read_inside(folder, name, None)  # (the newest's bytes, read once)
    try:
        saved = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:  # unpickling refused or failed
        raise CheckpointError(f"{folder / name} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(saved, dict) or not {"format_version", "step", "state"} <= set(saved) or saved["step"] != step:
        raise CheckpointError(f"{folder / name} is not the saef checkpoint of step {step} (no format_version, step and state)")
    if saved.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{name} has checkpoint format {saved.get('format_version')}, this saef reads {FORMAT_VERSION}")
    newer = [text for at, text in problems if at > step]
    if newer or max(intact) > step:
        why = "; ".join(newer) if newer else "another rank cannot load them"
        warnings.warn(f"skipped newer checkpoints: {why}; resuming from step {step}, the newest every rank can load")
    return saved["state"]


def _scan(folder: Path, rank: int, world: Optional[int]):
    """How many checkpoints the manifest lists, the steps (newest first) whose file for ``rank`` matches its
    checksum, what is wrong with the others, and the bytes of the newest intact file (the one usually loaded)."""
    entries = _read_manifest(folder)
    intact, problems, newest = [], [], None
    for entry in reversed(entries):
        if world is not None and entry["world"] != world:
            raise CheckpointError(
                f"the checkpoint at step {entry['step']} was written by {entry['world']} processes, this run has {world} "
                "(resuming with another number of processes needs --reset-errors)"
            )
        name = _file_name(entry["step"], rank)
        try:
            data = read_inside(folder, name, None)  # as large as the model: its checksum is the check
        except FileNotFoundError:
            problems.append((entry["step"], f"{name} is missing"))
            continue
        except (OSError, ValueError) as error:  # a link, not a regular file, unreadable: not a checkpoint to load
            problems.append((entry["step"], f"{name} cannot be read ({error})"))
            continue
        if hashlib.sha256(data).hexdigest() != entry["files"].get(name):
            problems.append((entry["step"], f"{name} does not match its checksum (truncated or corrupted)"))
            continue
        intact.append(entry["step"])
        newest = data if newest is None else newest
    return len(entries), intact, problems, newest


def _agreed_step(folder: Path, everyone: List[Dict[str, Any]], problems: List[Tuple[int, str]]) -> Optional[int]:
    """The newest step in every rank's intact list; None when no rank's manifest lists a checkpoint."""
    common = set(everyone[0]["intact"]).intersection(*(set(e["intact"]) for e in everyone[1:]))
    if common:
        return max(common)
    if not any(e["listed"] for e in everyone):
        return None
    if len(everyone) > 1 and not all(e["listed"] for e in everyone):
        blind = [r for r, e in enumerate(everyone) if not e["listed"]]
        raise CheckpointError(f"rank {blind[0]} finds no checkpoint in {folder} while rank "
                              f"{next(r for r, e in enumerate(everyone) if e['listed'])} does: every rank must see the same run "
                              "directory (give --output a path on storage that every host shares)")
    if len(everyone) == 1:
        raise CheckpointError(f"no usable checkpoint in {folder}: {'; '.join(text for _, text in problems)}")
    held = "; ".join(f"rank {r}: {', '.join(map(str, e['intact'])) or 'none'}" for r, e in enumerate(everyone))
    raise CheckpointError(f"no checkpoint in {folder} that every rank can load (intact steps by rank: {held})"
                          + (f"; here: {'; '.join(text for _, text in problems)}" if problems else ""))


def capture_rng() -> Dict[str, Any]:
    """torch, numpy and python RNG states as tensors and plain lists (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss_py},
    }


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
