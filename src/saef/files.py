"""Files written whole or not at all: the one atomic-write helper every writer of saef uses.

Imports nothing else of saef, so every layer may use it.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Union

__all__ = ["write_atomically", "claim", "release", "DirectoryBusy", "LOCK_NAME"]

LOCK_NAME = ".lock"
_CLAIMED: Dict[Path, int] = {}  # directory -> the descriptor whose lock this process holds


class DirectoryBusy(FileExistsError):
    """Another process is writing the directory."""


def claim(directory: Union[str, Path]) -> None:
    """Make this process the one writer of ``directory`` (created if missing): an exclusive OS lock on
    ``directory/.lock``, which holds this process's pid. The lock dies with the process, so a crash never
    leaves a stale one. Claiming again from the same process is a no-op; another process gets
    :class:`DirectoryBusy` naming the holder's pid."""
    directory = Path(directory).resolve()
    if directory in _CLAIMED:
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DirectoryBusy(f"{directory} is being written by process {holder}; wait for it to finish or stop it") from None
    except OSError as error:  # a file system without locks (some network mounts): say so, and go on unguarded
        os.close(fd)
        warnings.warn(f"cannot lock {directory / LOCK_NAME} ({error.strerror}): nothing stops a second writer of {directory}")
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        os.close(fd)
        raise
    _CLAIMED[directory] = fd


def release(directory: Union[str, Path]) -> None:
    """Give up the claim on ``directory`` (if this process holds it)."""
    fd = _CLAIMED.pop(Path(directory).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


def write_atomically(path: Union[str, Path], data: Union[bytes, Callable[[BinaryIO], None]], *, make_parent: bool = False) -> Path:
    """Write ``data`` (bytes, or a function that writes to a binary handle) to ``path`` so that a reader --
    a concurrent one, or one after a crash -- sees the old file or the new one, never a part of it.

    The bytes go to a temporary file in the same directory, are fsync-ed, made readable (0644) and renamed
    over ``path``; on any failure the temporary file is removed and the old file is left as it was."""
    path = Path(path)
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; saef's files are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
