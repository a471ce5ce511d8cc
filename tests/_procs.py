"""Processes for the tests that start them: a free loopback port, the environment a child needs, ranks
launched as torchrun would launch them, and waits that are always bounded in time.

Every test that starts a process is marked ``slow`` (conftest.py fails one that is not)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SRC = str(HERE.parent / "src")
FAULTS = str(HERE / "_faults.py")  # saef with a fault injected where SAEF_FAULT says


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra):
    """The environment of a child process: this checkout's ``src`` first on the path, one intra-op thread
    (2 cores shared by every rank), and ``extra`` on top."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def rank_env(rank, world, port, **extra):
    """The environment torchrun gives rank ``rank`` of ``world`` with its store on 127.0.0.1:``port``."""
    return child_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port), **extra)


def launch(argv, world, extra_env=None, **popen):
    """Start ``world`` ranks of ``python argv`` on loopback, as torchrun would (RANK, WORLD_SIZE, MASTER_*)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, *argv], env=rank_env(rank, world, port, **(extra_env or {})), **popen)
            for rank in range(world)]


def wait_all(procs, timeout):
    """The exit codes of ``procs``, waiting ``timeout`` seconds in all; what is left is killed (with its
    children, for a process started in a session of its own, such as torchrun)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                if os.getpgid(p.pid) == p.pid:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
                p.wait()


def wait_for(predicate, seconds=60):
    """Whether ``predicate()`` became true within ``seconds`` (polled every 0.2 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False
