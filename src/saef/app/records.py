"""What a run writes to its directory, and how: the run record.

A run directory holds

* ``config.json``      the resolved configuration;
* ``environment.json`` versions, git revision, device, command line;
* ``metrics.csv`` and ``metrics.jsonl``  one row per epoch (see :data:`METRIC_COLUMNS`), appended and
  flushed as each epoch ends, so a crash loses at most the epoch in progress;
* ``steps.csv`` and ``steps.jsonl``  with ``--eval-every N``: a row of the same columns every N steps within
  an epoch (``epoch`` is then fractional: the epochs done, 2.5 halfway through the third);
* ``curves.png``       the figure of the run's curves;
* ``checkpoints/``     see :mod:`saef.app.checkpoint`;
* ``events.jsonl``     resumes (with what changed, and whether errors were reset);
* ``tensorboard/``     with ``--tensorboard``: the metrics and every step's train loss as TensorBoard scalars;
* ``summary.json``     written last: a run directory without it is incomplete.

Every file except the appended metrics is written atomically (temporary file, fsync, rename). The directory
is data (:mod:`saef.files`): no file in it is followed as a symbolic link, appended files must have one
link, and the metrics are read only up to :data:`METRICS_LIMIT` bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..files import LOCK_NAME, append_inside, checked_folder, claim, open_inside, parse_json, read_inside, release, write_atomically

__all__ = ["METRIC_COLUMNS", "RunRecord", "read_metrics", "read_step_metrics", "environment", "format_summary"]

METRICS_LIMIT = 256 << 20  # bytes of metrics.jsonl read: about 100,000 epochs' rows
_APPENDED = ("metrics.jsonl", "metrics.csv", "steps.jsonl", "steps.csv", "events.jsonl")  # written in place, not replaced

METRIC_COLUMNS = (
    "epoch",  # 1-based (in steps.jsonl, fractional: the epochs done)
    "step",  # optimizer steps so far
    "rounds",  # exchanges between the workers so far (with --local-steps one per H steps; else one per step taken)
    "lr",  # learning rate during the epoch
    "phase",  # warmup (dense fp32 exchange, --warmup-steps), compressed, or warmup+compressed (it ended in the epoch)
    "train_loss",  # mean over the epoch's steps of the workers' mean loss
    "test_loss",
    "test_acc",  # top-1 in [0, 1], at x
    "test_loss_aux",
    "test_acc_aux",  # at the auxiliary iterate x~ = x - (e_s + mean_k e_k); empty for sgd
    "test_bpb",  # dataset text: the test (validation) loss in bits per byte, at x (else empty)
    "test_bpb_aux",  # ... and at x~
    "grad_norm_sq",  # ||grad f(x)||^2 of the training objective at x (with --full-batch; else empty)
    "val_loss",  # on the split held out of training (--holdout; else empty), at x
    "val_acc",
    "bits_up",  # cumulative bits one worker sent to the server
    "bits_down",  # cumulative bits one worker received from the server
    "bits_averaging",  # cumulative bits one worker sent and received for error averaging
    "bits_per_round",  # (bits_up + bits_down + bits_averaging) / rounds: one worker's traffic per exchange
    "mismatch_ef",  # epoch mean of ||e_s + mean_k e_k||^2
    "mismatch_saef",  # epoch mean of mean_k ||e_s + mean_j e_j - e_k||^2
    "skipped_steps",  # cumulative steps skipped because a loss or gradient was NaN or Inf
    "epoch_time",  # seconds spent in the epoch (training and evaluation)
    "wall_time",  # seconds since the run started
)


def _csv_cells(row: Dict[str, Any]) -> List[Any]:
    """A metrics row as CSV cells in column order: empty where a value is None (or, in a row written by an
    older version, missing)."""
    return ["" if row.get(c) is None else row[c] for c in METRIC_COLUMNS]


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl``, one per epoch, sorted by epoch (the one metrics reader).

    A resumed run may have written an epoch twice: the later line wins. An unterminated last line that
    does not parse is a write in progress (or cut by a crash) and is skipped with a warning; any other
    malformed line raises ``ValueError`` naming the file and line; a missing file ``FileNotFoundError``."""
    return _read_rows(run_dir, "metrics.jsonl", "epoch")


def read_step_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """The rows of ``run_dir/steps.jsonl`` (``--eval-every``), sorted by step, read as :func:`read_metrics`
    reads its file; none where the run wrote none."""
    try:
        return _read_rows(run_dir, "steps.jsonl", "step")
    except FileNotFoundError:
        return []


def _read_rows(run_dir: Path, name: str, key: str) -> List[Dict[str, Any]]:
    path = Path(run_dir) / name
    try:
        lines = _read_text(Path(run_dir).resolve(), name).split("\n")
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?") from None
    by_key: Dict[int, Dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the writer has not finished this line
                warnings.warn(f"{path}:{number}: skipping unfinished last line", stacklevel=2)
                continue
            raise ValueError(f"{path}:{number} is not valid JSON: {error}") from error
        except RecursionError:
            raise ValueError(f"{path}:{number} is nested too deeply to be a metrics row") from None
        by_key[_key_of(row, key, f"{path}:{number}")] = row
    return [by_key[k] for k in sorted(by_key)]


def _key_of(row: Any, key: str, where: str) -> int:
    """A metrics row's integer ``key`` (its epoch, or a steps row's step); ValueError naming ``where`` if none."""
    if not isinstance(row, dict) or not isinstance(row.get(key), int) or isinstance(row.get(key), bool):
        raise ValueError(f"{where} must be a JSON object with an integer '{key}'")
    return row[key]


def _step_of(line: str, directory: Path) -> int:
    return _key_of(parse_json(line.encode(), directory / "steps.jsonl"), "step", str(directory / "steps.jsonl"))


def _read_text(directory: Path, name: str) -> str:
    """``directory/name`` as text: a regular file, not a link, at most :data:`METRICS_LIMIT` bytes."""
    try:
        return read_inside(directory, name, METRICS_LIMIT).decode()
    except UnicodeDecodeError as error:
        raise ValueError(f"{directory / name} is not UTF-8 text: {error}") from None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def environment(device: str, launches: Optional[List[Optional[str]]] = None) -> Dict[str, Any]:
    """Versions, git revision and device: what is needed to tell how a result was produced; and the
    processes' launchers (:meth:`saef.backends.base.Backend.launches`), by which a restarted job finds
    the run it made."""
    import numpy
    import torch

    from .._version import __version__

    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {
        "saef": __version__,
        "git_revision": revision,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "argv": sys.argv,
        "launches": launches or [],
    }


class RunRecord:
    """Writes one run's directory. Create it only once the configuration is known to be valid.

    ``resume_rows``: reopen an existing run directory for a resumed run, keeping its first ``resume_rows``
    metric rows (those the checkpoint covers) and dropping any later ones, so rows are never duplicated.
    """

    def __init__(self, directory: Path, config: Dict[str, Any], env: Dict[str, Any], resume_rows: Optional[int] = None,
                 event: Optional[Dict[str, Any]] = None):
        self.directory = Path(directory).resolve()
        if resume_rows is None and self.directory.exists() and any(p.name != LOCK_NAME for p in self.directory.iterdir()):
            raise FileExistsError(f"run directory {self.directory} already exists and is not empty; choose another --output")
        claim(self.directory)  # the one writer of the directory from here on, until close()
        self.board = None
        try:
            if resume_rows is not None:
                self._reopen(resume_rows, config, env, event or {})
            else:
                self._create(config, env)
            if config.get("tensorboard"):  # (a resumed run's events after its checkpoint's step are dropped)
                self.board = _Board(self.directory, (event or {}).get("step", 0) + 1 if resume_rows is not None else None)
        except BaseException:
            release(self.directory)
            raise

    def _create(self, config: Dict[str, Any], env: Dict[str, Any]) -> None:
        write_atomically(self.directory / "config.json", _json_bytes(config))
        write_atomically(self.directory / "environment.json", _json_bytes(env))
        header = ",".join(METRIC_COLUMNS) + "\n"
        write_atomically(self.directory / "metrics.csv", header.encode())
        write_atomically(self.directory / "metrics.jsonl", b"")

    def _reopen(self, rows: int, config: Dict[str, Any], env: Dict[str, Any], event: Dict[str, Any]) -> None:
        for name in _APPENDED:  # refused before anything changes: a link, or a file with other hard links
            if os.path.lexists(self.directory / name):
                os.close(open_inside(self.directory, name, os.O_RDONLY, in_place=True))
        (self.directory / "summary.json").unlink(missing_ok=True)  # incomplete again until it finishes (a link: itself)
        lines = _read_text(self.directory, "metrics.jsonl").splitlines(keepends=True)
        if len(lines) < rows:
            raise ValueError(f"{self.directory} holds {len(lines)} metric rows but its checkpoint covers {rows}")
        self._keep("metrics", lines[:rows])
        if os.path.lexists(self.directory / "steps.jsonl"):  # the rows of --eval-every up to the checkpoint's step
            step = event.get("step", 0)
            self._keep("steps", [line for line in self._complete_lines("steps.jsonl") if line.strip()
                                 and _step_of(line, self.directory) <= step])
        write_atomically(self.directory / "config.json", _json_bytes(config))
        append_inside(self.directory, "events.jsonl", json.dumps({"event": "resume", "rows_kept": rows, **event, "environment": env}) + "\n")

    def _complete_lines(self, name: str) -> List[str]:
        """The lines of an appended file, less a last one without its newline: a row cut short by a crash or a
        full disk (written after the newest checkpoint, whose step it would follow)."""
        if not os.path.lexists(self.directory / name):
            return []
        lines = _read_text(self.directory, name).splitlines(keepends=True)
        return lines[:-1] if lines and not lines[-1].endswith("\n") else lines

    def _keep(self, stem: str, lines: List[str]) -> None:
        """``stem.jsonl`` as ``lines``, and ``stem.csv`` rebuilt from them under today's columns (a run begun
        by an older version has fewer: their cells stay empty), so appended rows line up with the header."""
        write_atomically(self.directory / f"{stem}.jsonl", "".join(lines).encode())
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(METRIC_COLUMNS)
        for line in lines:
            writer.writerow(_csv_cells(parse_json(line.encode(), self.directory / f"{stem}.jsonl")))
        write_atomically(self.directory / f"{stem}.csv", table.getvalue().encode())

    def rows(self) -> List[Dict[str, Any]]:
        return read_metrics(self.directory)

    def append(self, row: Dict[str, Any], stem: str = "metrics") -> None:
        """Append a row to both files of ``stem`` -- an epoch's to ``metrics``, a row of ``--eval-every`` to
        ``steps`` (the files begin with their header) -- and push it to disk."""
        missing = set(METRIC_COLUMNS) - set(row)
        if missing:
            raise ValueError(f"metrics row lacks {sorted(missing)}")
        if not os.path.lexists(self.directory / f"{stem}.csv"):  # (the first row of steps: the files begin)
            self._keep(stem, self._complete_lines(f"{stem}.jsonl"))
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow(_csv_cells(row))
        for name, text in ((f"{stem}.csv", line.getvalue()), (f"{stem}.jsonl", json.dumps({c: row[c] for c in METRIC_COLUMNS}) + "\n")):
            append_inside(self.directory, name, text)
        if self.board is not None:
            self.board.row(row)

    def scalar(self, name: str, value: float, step: int) -> None:
        """One value of a step (the step's train loss) to TensorBoard, where the run writes there."""
        if self.board is not None:
            self.board.write(name, value, step)

    def finish(self, summary: Dict[str, Any]) -> None:
        """Mark the run complete."""
        write_atomically(self.directory / "summary.json", _json_bytes(summary))

    def close(self) -> None:
        """Stop being the directory's writer (another process may resume it from now on)."""
        if self.board is not None:
            self.board.close()
            self.board = None
        release(self.directory)


class _Board:
    """``--tensorboard``: the metrics as TensorBoard scalars in ``RUN/tensorboard`` (torch.utils.tensorboard),
    each epoch's row at its step, and every step's train loss."""

    _SKIP = ("epoch", "step", "phase")

    def __init__(self, directory: Path, purge_step: Optional[int]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install saef[tensorboard]") from None
        folder = checked_folder(directory / "tensorboard", create=True)  # (a link out of the run is refused)
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def write(self, name: str, value, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.writer.add_scalar(name, value, step)

    def row(self, row: Dict[str, Any]) -> None:
        for key in METRIC_COLUMNS:
            if key not in self._SKIP:
                self.write(key, row.get(key), row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def format_summary(config, summary: Dict[str, Any]) -> str:
    """The final table printed at the end of a run (``config``: its TrainConfig)."""
    def megabytes(bits):
        return f"{bits / 8e6:.2f} MB"

    lines = [("method", config.description), ("final test accuracy at x", f"{100 * summary['final_test_acc']:.2f}%")]
    if summary["final_test_acc_aux"] is not None:
        lines.append(("final test accuracy at x~", f"{100 * summary['final_test_acc_aux']:.2f}%"))
    for key, where in (("final_test_bpb", "x"), ("final_test_bpb_aux", "x~")):
        if summary.get(key) is not None:
            lines.append((f"final test bits per byte at {where}", f"{summary[key]:.3f}"))
    lines += [
        ("best test accuracy at x", f"{100 * summary['best_test_acc']:.2f}%"),
        ("final train loss", f"{summary['final_train_loss']:.4f}"),
        ("sent per worker (up)", megabytes(summary["bits_up"])),
        ("received per worker (down)", megabytes(summary["bits_down"])),
        ("error averaging per worker", megabytes(summary["bits_averaging"])),
        ("wall time", f"{summary['wall_time']:.1f} s"),
        ("records", summary["run_dir"]),
    ]
    width = max(len(k) for k, _ in lines)
    rule = "-" * (width + 2 + max(len(v) for _, v in lines))
    return "\n".join([rule] + [f"{k.ljust(width)}  {v}" for k, v in lines] + [rule])
