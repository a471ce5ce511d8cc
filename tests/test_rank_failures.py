"""Ranks that fail together: ranks that disagree on their settings, a rendezvous that finds nobody (or
something that never answers), and a failure on rank 0 alone -- each stops every rank at once, with one line
saying why. Every process these tests start is bounded in time."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from _procs import free_port, rank_env, wait_all

FAST = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--quiet"]


def ranks_with(per_rank_flags, out, timeout=60):
    """Start one `saef train --backend dist` per entry of ``per_rank_flags`` (its own extra flags)."""
    port, world = free_port(), len(per_rank_flags)
    procs = [subprocess.Popen([sys.executable, "-m", "saef", "train", "--backend", "dist", *FAST, "--epochs", "1",
                               "--timeout", "20", "--output", str(out), *flags], env=rank_env(r, world, port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r, flags in enumerate(per_rank_flags)]
    codes = wait_all(procs, timeout)
    return codes, [p.stderr.read() for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("flags,key", [(["--seed", "1"], "seed"), (["--compressor", "sign"], "compressor")])
def test_ranks_that_disagree_all_stop_with_one_line(tmp_path, flags, key):
    """Two ranks started with different settings (a seed: would run silently; a compressor: would abort
    inside gloo) both stop before training, exit 2, and say in one line which key differs on which ranks."""
    codes, errs = ranks_with([[], flags], tmp_path / "run")
    assert codes == [2, 2], errs
    for err in errs:
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"saef: error: the ranks disagree on {key}: rank 0 has") and "rank 1 has" in last, err


class SilentServer:
    """Something that is not a saef rank on the rendezvous port: it accepts connections and never answers."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        for c in self.connections:
            c.close()
        self.socket.close()


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["silent server", "nobody"])
def test_rendezvous_is_bounded_by_the_timeout(tmp_path, peer):
    """A rank whose rendezvous finds a server that never answers, or no rank 0 at all, stops within
    --timeout (3 s here, plus start-up) with exit 1 and a line saying the rendezvous did not complete."""
    server = SilentServer() if peer == "silent server" else None
    port = server.port if server else free_port()
    try:
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "saef", "train", "--backend", "dist", *FAST, "--epochs", "1",
                                 "--timeout", "3", "--output", str(tmp_path / "run")], env=rank_env(1, 2, port),
                                capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if server:
            server.close()
    assert result.returncode == 1, result.stderr
    assert "rank 1: the rendezvous at 127.0.0.1" in result.stderr and "within --timeout 3 s" in result.stderr
    assert elapsed < 3 + 12, elapsed  # start-up (imports, data) plus the timeout


@pytest.mark.slow
def test_a_failure_on_rank_0_alone_stops_every_rank_at_once(tmp_path):
    """Rank 0 alone opens the run directory; when it cannot (here it exists and is not empty) every rank
    stops at once with exit 2 -- rank 0 with its own message, the others naming rank 0's -- instead of
    the others waiting out --timeout at the next collective."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    start = time.monotonic()
    codes, errs = ranks_with([["--timeout", "120"], ["--timeout", "120"]], out, timeout=150)
    assert codes == [2, 2], errs
    assert "already exists and is not empty" in errs[0]
    assert "rank 0 failed: FileExistsError" in errs[1] and time.monotonic() - start < 90  # not the 120 s timeout
