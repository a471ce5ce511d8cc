"""Files written whole or not at all: the one atomic-write helper every writer of saef uses.

Imports nothing else of saef, so every layer may use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["write_atomically"]


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
