"""The runs of a study: a :class:`Run` is one ``saef train`` process, named after its settings, with its
own directory; :func:`run_all` runs those not finished yet, a few at a time, and passes SIGINT/SIGTERM on
to them so that stopping a study never leaves runs training behind it.

Example::

    >>> run = Run.make(dataset="mnist1d", model="cnn1d", method="saef", compressor="sign", workers=4,
    ...                momentum=0.9, epochs=1, seed=0)
    >>> run.name
    'mnist1d-cnn1d-saef-sign-K4-DC-pinf-mu0.9-e1-seed0'
    >>> ok = run_all([run], Path("runs"), jobs=1)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..files import DirectoryBusy, claim, release

__all__ = ["Run", "is_done", "run_all", "read_rows"]


@dataclass(frozen=True)
class Run:
    """One training run: its settings (``saef train`` config keys) and a readable unique name."""

    settings: tuple  # sorted (key, value) pairs

    @classmethod
    def make(cls, **settings) -> "Run":
        settings.setdefault("average_every", None)  # so that equal runs compare equal
        return cls(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items())))

    @property
    def config(self) -> Dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.settings}

    @property
    def name(self) -> str:
        c = self.config
        dataset = c["dataset"] if not c.get("data_file") else f"{c['dataset']}_{Path(str(c['data_file'])).name}"
        parts = [dataset, c["model"], c["method"], str(c.get("compressor") or "identity").replace(":", ""),
                 f"K{c['workers']}", "DC" if c.get("double_way", True) else "SC", f"p{c.get('average_every') or 'inf'}",
                 f"mu{c['momentum']}" if c.get("optimizer", "sgd") == "sgd" else c["optimizer"], f"e{c['epochs']}"]
        if c.get("local_steps"):  # rounds: H, the inner optimizer, the outer step, the error's decay
            parts += [f"H{c['local_steps']}{c.get('inner_optimizer', 'sgd')}", f"olr{c.get('outer_lr', 1.0):g}"
                      + (f"m{c['outer_momentum']:g}{'n' if c.get('nesterov') else ''}" if c.get("outer_momentum") else ""),
                      f"b{c.get('error_decay', 1.0):g}"]
        if c.get("holdout") or c.get("full_batch"):  # the studies with an lr grid name the lr (the older runs do not)
            parts += [f"lr{c['lr']:g}", f"h{c['holdout']}" if c.get("holdout") else "fb"]
        return "-".join(parts + [f"seed{c['seed']}"])


def is_done(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists()


def _command(run: Run, run_dir: Path, data_dir: Optional[str]) -> List[str]:
    argv = [sys.executable, "-m", "saef", "train", "--quiet", "--output", str(run_dir)]
    for key, value in run.config.items():
        flag = "--" + key.replace("_", "-")
        if key == "double_way":
            argv.append("--double-way" if value else "--single-way")
        elif key == "average_every":
            argv += [flag, "never" if value is None else str(value)]
        elif key == "lr_milestones":
            argv += [flag, ",".join(str(m) for m in value)]
        elif isinstance(value, bool):  # an on/off switch
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    if data_dir:
        argv += ["--data-dir", data_dir]
    return argv


class _Children:
    """The ``saef train`` processes of a reproduce run. SIGINT and SIGTERM sent to ``saef reproduce`` go on
    to every child; reproduce then starts no more runs and waits for the children (killing those still
    alive a minute later): stopping reproduce never leaves runs training behind it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: set = set()
        self.stopping = None  # the signal that asked us to stop

    def run(self, argv: List[str], **popen) -> int:
        with self.lock:
            if self.stopping:
                return -1
            process = subprocess.Popen(argv, **popen)
            self.running.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.running.discard(process)

    def _signal_children(self, signum: int) -> None:
        for child in list(self.running):
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    @contextlib.contextmanager
    def forwarding_signals(self):
        """While inside, SIGINT/SIGTERM only note the signal and pass it on to the children; the main loop
        sees :attr:`stopping` and calls :meth:`stop` (a handler that took locks could deadlock)."""
        self.stopping = None
        if threading.current_thread() is not threading.main_thread():  # (signals reach the main thread only)
            yield
            return

        def note(signum, frame):
            self.stopping = signum
            self._signal_children(signum)

        previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self, pool) -> None:
        """Start nothing more, wait for the children (a minute in all), then exit 128 + the signal."""
        pool.shutdown(wait=False, cancel_futures=True)
        self._signal_children(self.stopping)  # (one may have started just as the signal came)
        deadline = time.monotonic() + 60
        for child in list(self.running):
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        raise SystemExit(128 + self.stopping)


_CHILDREN = _Children()


def run_all(runs: Sequence[Run], runs_dir: Path, jobs: int = 1, data_dir: Optional[str] = None, log=print) -> Dict[Run, bool]:
    """Run every run that is not finished yet, ``jobs`` at a time; returns which runs succeeded."""
    runs = list({run.name: run for run in runs}.values())  # experiments share runs (same name, same run)
    todo = [r for r in runs if not is_done(runs_dir / r.name)]
    log(f"saef reproduce: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run with {jobs} job(s)")
    ok = {r: True for r in runs if r not in todo}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs))))
    start = time.monotonic()

    def one(run: Run) -> bool:
        run_dir = runs_dir / run.name
        if run_dir.exists():  # an unfinished earlier attempt: start it again from scratch, unless it is alive
            try:
                claim(run_dir)
            except DirectoryBusy as busy:
                log(f"saef reproduce: skipping {run.name}: {busy}")
                return False
            shutil.rmtree(run_dir)
            release(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = runs_dir / f"{run.name}.log"
        with open(log_path, "w") as handle:
            code = _CHILDREN.run(_command(run, run_dir, data_dir), stdout=handle, stderr=subprocess.STDOUT, env=env)
        return code == 0 and is_done(run_dir)

    with ThreadPoolExecutor(max_workers=jobs) as pool, _CHILDREN.forwarding_signals():
        pending = {pool.submit(one, run): run for run in todo}
        finished = 0
        while pending:
            done, _ = wait(pending, timeout=1, return_when=FIRST_COMPLETED)
            if _CHILDREN.stopping:
                _CHILDREN.stop(pool)
            for future in done:
                run = pending.pop(future)
                ok[run] = future.result()
                finished += 1
                status = "done" if ok[run] else f"FAILED (see {runs_dir / (run.name + '.log')})"
                elapsed = time.monotonic() - start
                eta = elapsed / finished * (len(todo) - finished)
                log(f"[{finished}/{len(todo)}] {status}: {run.name}  ({elapsed / 60:.1f} min elapsed, ~{eta / 60:.1f} min left)")
    return ok


def read_rows(run_dir: Path) -> List[dict]:
    """The per-epoch records of a finished run."""
    from ..app.records import read_metrics

    return read_metrics(run_dir)
