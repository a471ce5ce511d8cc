"""Test-wide settings and the rule on processes.

One intra-op thread keeps small kernels fast on a 2-core machine where pytest and torch would otherwise
compete for the cores (timing, not results, depends on it).

A test that starts a Python process (a rank, torchrun, the command line in a child) is marked ``slow``, so
that ``python3 -m pytest -m "not slow"`` answers in about a minute while one works; an unmarked test that
tries is failed with a message saying so. The helpers for such tests are in _procs.py."""

import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)

_PYTHON = os.path.realpath(sys.executable)


@pytest.fixture(autouse=True)
def _processes_only_in_slow_tests(request, monkeypatch):
    """Fails a test that starts a Python process unless it is marked slow (the marker is what keeps the
    quick subset quick, so it must not drift)."""
    if request.node.get_closest_marker("slow") is not None:
        return
    real = subprocess.Popen

    class Guarded(real):
        def __init__(self, args, *rest, **kwargs):
            first = args if isinstance(args, (str, bytes, os.PathLike)) else next(iter(args), "")
            if isinstance(first, (str, os.PathLike)) and os.path.realpath(str(first).split(" ")[0]) == _PYTHON:
                pytest.fail(f"{request.node.nodeid} starts a Python process: mark it @pytest.mark.slow", pytrace=False)
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Guarded)
