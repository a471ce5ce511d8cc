"""Files written whole or not at all, and a run directory read as data: the helpers every writer and
reader of a run directory uses.

A run directory is data, never a path to somewhere else. Every name taken from it (a manifest's file
names) must be a plain file name (:func:`safe_name`); nothing in it is followed as a symbolic link: files
are opened with ``O_NOFOLLOW`` relative to their folder, itself opened with ``O_NOFOLLOW``
(:func:`open_inside`); files written in place must have one link; and every file read is a regular file
whose size is checked before it is read and parsed (:func:`read_inside`, :func:`parse_json`). The run
directory as the user names it may itself be reached through a link (callers resolve it first). Every
refusal is a :class:`RunDirectoryError`, a ``ValueError`` whose one-line message names the file.

Imports nothing else of saef, so every layer may use it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional, Union

__all__ = ["write_atomically", "claim", "release", "DirectoryBusy", "LOCK_NAME", "RunDirectoryError", "NotRegularFile",
           "open_regular", "safe_name", "open_inside", "read_inside", "remove_inside", "append_inside", "parse_json", "checked_folder"]

LOCK_NAME = ".lock"
_CLAIMED: Dict[Path, int] = {}  # directory -> the descriptor whose lock this process holds


class DirectoryBusy(FileExistsError):
    """Another process is writing the directory."""


class RunDirectoryError(ValueError):
    """A run directory's file is not what saef wrote there: a name that is not a plain file name, a symbolic
    link, something other than a regular file, a file too large, or JSON nested too deeply."""


def safe_name(name: Any, where: Union[str, Path] = "the run directory") -> str:
    """``name`` if it is a plain file name (no folder, no '..', not absolute); else :class:`RunDirectoryError`."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.basename(name) != name):
        raise RunDirectoryError(f"{where} names {name!r}, which is not a plain file name in its folder; nothing was changed")
    return name


def _open_folder(folder: Path) -> int:
    """A descriptor of ``folder``; refused if its last component is a symbolic link or not a folder."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symbolic link" if os.path.islink(folder) else "not a folder"
            raise RunDirectoryError(f"{folder} is {kind}; nothing in a run directory is followed out of it") from None
        raise


def checked_folder(folder: Union[str, Path], *, create: bool = False) -> Path:
    """``folder`` (made if ``create`` and missing), refused if it is a symbolic link or not a folder."""
    folder = Path(folder)
    if create:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            pass
    os.close(_open_folder(folder))
    return folder


class NotRegularFile(ValueError):
    """What was opened is not a regular file; ``kind`` says what it is ("a FIFO", "a device", ...)."""

    def __init__(self, path, kind: str):
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind


def _special_kind(mode: int) -> Optional[str]:
    """None for a regular file; else what the file is, for a message."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or other special file"


def open_regular(path: Union[str, Path], flags: int = os.O_RDONLY, mode: int = 0o644, *, dir_fd: Optional[int] = None,
                 follow: bool = True) -> int:
    """A descriptor of ``path`` (relative to ``dir_fd`` if given; not through a final symbolic link unless
    ``follow``), if what it opens is a regular file; else :class:`NotRegularFile`, the file closed. It is
    opened without blocking, so that a FIFO with no writer cannot hold the caller up, and set back to
    blocking; the type checked is that of the file opened, not of an earlier ``stat``. Errors of
    ``os.open`` (missing file, a link refused) pass through."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW), mode, dir_fd=dir_fd)
    try:
        kind = _special_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotRegularFile(path, kind)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_inside(folder: Union[str, Path], name: str, flags: int, mode: int = 0o644, *, in_place: bool = False) -> int:
    """A descriptor of the regular file ``folder/name``, never through a symbolic link (neither ``name`` nor
    ``folder``'s last component may be one). ``in_place`` (a file written where it is, not replaced):
    refused also when it has other hard links, whose files the writes would change too."""
    folder = Path(folder)
    path = folder / safe_name(name, folder)
    dir_fd = _open_folder(folder)
    try:
        fd = open_regular(name, flags, mode, dir_fd=dir_fd, follow=False)
    except NotRegularFile as error:
        raise RunDirectoryError(f"{path} is not a regular file ({error.kind}); saef reads and writes only files it "
                                "made") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RunDirectoryError(f"{path} is a symbolic link; nothing in a run directory is followed out of it") from None
        if error.errno in (errno.ENXIO, errno.EISDIR):
            raise RunDirectoryError(f"{path} is not a regular file") from None
        raise
    finally:
        os.close(dir_fd)
    links = os.fstat(fd).st_nlink
    if in_place and links > 1:
        os.close(fd)
        raise RunDirectoryError(f"{path} has {links} hard links; writing it would change the other files too")
    return fd


def read_inside(folder: Union[str, Path], name: str, limit: Optional[int]) -> bytes:
    """The bytes of the regular file ``folder/name`` (see :func:`open_inside`), refused before it is read when
    it holds more than ``limit`` bytes (None: no limit). A missing file raises ``FileNotFoundError``."""
    fd = open_inside(folder, name, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if limit is not None and size > limit:
            raise RunDirectoryError(f"{Path(folder) / name} holds {size} bytes, more than the {limit} saef reads "
                                    "from such a file; it is not one saef wrote")
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:  # it grew while being read
        raise RunDirectoryError(f"{Path(folder) / name} holds more than the {limit} bytes saef reads from such a file")
    return data


def append_inside(folder: Union[str, Path], name: str, text: str) -> None:
    """Append ``text`` to ``folder/name`` (created if missing) and push it to disk; never through a link."""
    fd = open_inside(folder, name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, in_place=True)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def remove_inside(folder: Union[str, Path], name: str) -> None:
    """Delete the file ``folder/name`` (a link itself, never what it points to) if it exists."""
    safe_name(name, folder)
    dir_fd = _open_folder(Path(folder))
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)


def parse_json(data: bytes, path: Union[str, Path]) -> Any:
    """``data`` parsed as JSON; anything else -- not UTF-8, not JSON, nested too deeply -- a one-line
    :class:`RunDirectoryError` naming ``path``."""
    try:
        return json.loads(data)
    except RecursionError:
        raise RunDirectoryError(f"{path} is nested too deeply to be a file saef wrote") from None
    except ValueError as error:  # (UnicodeDecodeError is a ValueError)
        raise RunDirectoryError(f"{path} cannot be read as JSON ({error})") from None


def claim(directory: Union[str, Path]) -> None:
    """Make this process the one writer of ``directory`` (created if missing): an exclusive OS lock on
    ``directory/.lock``, which holds this process's pid. The lock dies with the process, so a crash never
    leaves a stale one. Claiming again from the same process is a no-op; another process gets
    :class:`DirectoryBusy` naming the holder's pid."""
    directory = Path(directory).resolve()
    if directory in _CLAIMED:
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = open_inside(directory, LOCK_NAME, os.O_RDWR | os.O_CREAT, in_place=True)
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
