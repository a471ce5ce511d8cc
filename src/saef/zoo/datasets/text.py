"""``text``: byte-level language modelling on a corpus that every machine has, the Python standard
library's own ``.py`` files (or a text file the user names as ``data_file``).

:func:`read_corpus` reads the running interpreter's standard library (``sysconfig``'s ``stdlib`` folder,
``site-packages`` left out) in sorted path order up to a fixed number of bytes, or any text file the user
names; :func:`byte_windows` cuts bytes into next-byte prediction samples. Nothing is downloaded. The corpus
differs between Python versions, so a run records its SHA-256 (and the environment its Python version).

Example::

    >>> corpus, where = read_corpus(size=100_000)
    >>> inputs, targets = byte_windows(corpus, context=64)   # (N, 64) each; targets are inputs shifted by one
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from .base import Data, DatasetSplit, open_regular
from .registry import DatasetRequest, register_dataset

__all__ = ["CORPUS_BYTES", "TEXT_MAX_BYTES", "read_corpus", "byte_windows", "split_corpus"]

CORPUS_BYTES = 2_000_000  # the default corpus: the first 2 MB of the standard library's .py files
TEXT_MAX_BYTES = 1 << 26  # the largest corpus (64 MiB; its windows take 16 bytes a byte, 1 GiB): larger is refused
VALIDATION_FRACTION = 0.1  # the last 10 % of the corpus is the validation (test) split


def _stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library is not at {root}; give a text file with --data-file")
    files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    return root, files


def read_corpus(data_file: Optional[Path] = None, size: Optional[int] = None) -> Tuple[bytes, str]:
    """The corpus's bytes (at most ``size``; the standard library's default :data:`CORPUS_BYTES`) and a
    description of where they came from. A named file must be a regular file: its first ``size`` bytes are
    read, or all of it; either way at most :data:`TEXT_MAX_BYTES` (a larger corpus is refused)."""
    if size is not None and size < 1:
        raise ValueError(f"the text corpus size must be a positive number of bytes, got {size}")
    if size is not None and size > TEXT_MAX_BYTES:
        raise ValueError(f"the text corpus size {size} is more than the largest read, {TEXT_MAX_BYTES:,} bytes")
    if data_file is not None:
        return _read_text_file(Path(data_file), TEXT_MAX_BYTES if size is None else size, size is None), str(data_file)
    limit = CORPUS_BYTES if size is None else size
    root, files = _stdlib_files()
    parts, total, used = [], 0, 0
    for path in files:
        if total >= limit:
            break
        try:
            chunk = path.read_bytes()
        except OSError:  # an unreadable file is left out (the corpus's hash records what was read)
            continue
        parts.append(chunk)
        total += len(chunk)
        used += 1
    corpus = b"".join(parts)[:limit]
    if len(corpus) < limit and size is not None:
        raise ValueError(f"the standard library at {root} holds {len(corpus)} bytes of .py files, fewer than {limit}")
    return corpus, f"{used} .py files of {root}"


def _read_text_file(path: Path, limit: int, whole: bool) -> bytes:
    """The first ``limit`` bytes of the regular file ``path``; if ``whole``, a longer file is refused."""
    try:
        with open_regular(path, "text file") as handle:
            corpus = handle.read(limit + 1)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise FileNotFoundError(f"text file {path} cannot be read: {error.strerror or error}") from None
    if whole and len(corpus) > limit:
        raise ValueError(f"text file {path} is larger than the largest corpus read, {limit:,} bytes "
                         "(give --dataset-size to read its first bytes)")
    return corpus[:limit]


def byte_windows(corpus: bytes, context: int) -> Tuple[Tensor, Tensor]:
    """Non-overlapping windows of ``context + 1`` bytes: inputs are the first ``context`` bytes of each,
    targets the last ``context`` (the next byte at every position); int64 ``(N, context)`` each."""
    n = len(corpus) // (context + 1)
    if n < 1:
        raise ValueError(f"{len(corpus)} bytes hold no window of context + 1 = {context + 1} bytes")
    windows = torch.frombuffer(bytearray(corpus[: n * (context + 1)]), dtype=torch.uint8).reshape(n, context + 1).long()
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def split_corpus(corpus: bytes) -> Tuple[bytes, bytes]:
    """Contiguous train and validation parts: the first 90 % and the last 10 % of the bytes."""
    cut = len(corpus) - int(len(corpus) * VALIDATION_FRACTION)
    return corpus[:cut], corpus[cut:]


def _load(request: DatasetRequest) -> Data:
    return _load_text(request.data_file, request.size, request.context)


def _load_text(data_file: Path | None, size: int | None, context: int) -> Data:
    """Byte-level language modelling (:func:`read_corpus`): train on the first 90 % of the corpus, validate
    (the test split) on the last 10 %, both cut into windows of ``context`` next-byte predictions."""
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive integer, got {context!r}")
    corpus, _ = read_corpus(data_file, size)
    train, val = split_corpus(corpus)
    try:
        splits = [DatasetSplit(*byte_windows(part, context)) for part in (train, val)]
    except ValueError as error:
        raise ValueError(f"the text corpus ({len(corpus)} bytes) is too short for context {context}: {error}") from None
    digest = hashlib.sha256(corpus).hexdigest()
    return Data(splits[0], splits[1], 256, (context,), "text", digest=digest, tokens=True)


register_dataset("text", _load, data_file=True)
