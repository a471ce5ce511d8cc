"""Two hosts over a slow link, for real: two network namespaces joined by a rate-limited veth pair
(benchmarks/_hosts.py), torchrun's c10d rendezvous across them, two ranks on each host. Needs root and
``ip netns``; skipped otherwise. Every process is bounded in time, and the hosts are removed afterwards."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
import _hosts  # noqa: E402

sys.path.insert(0, str(HERE))
from _procs import child_env, wait_all  # noqa: E402

WHY_NOT = _hosts.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=f"two hosts: {WHY_NOT}")]

# 20 steps (two epochs of 10), compared with the simulator as in test_distributed
ARGS = ["--dataset", "synthetic", "--dataset-size", "320", "--model", "mlp", "--batch-size", "32", "--epochs", "2",
        "--workers", "4", "--lr", "0.05", "--compressor", "sign", "--average-every", "3", "--quiet"]
PORT = 29400  # a fresh namespace: every port is free


def env(**extra):
    return child_env(**extra)


def torchrun(hosts, host, out, log):
    """One node of ``torchrun --nnodes 2 --nproc_per_node 2`` on ``host``, rendezvous on host 0's veth address.
    Node 0 hosts the rendezvous store (is_host: the address is not the machine's hostname, so torchrun
    cannot infer it); --local-addr makes the agents (and the ranks' MASTER_ADDR) use the veth addresses."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2", "--node-rank", str(host),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts.addresses[0]}:{PORT}", "--rdzv-id", hosts.names[0],
            "--rdzv-conf", f"is_host={int(host == 0)},join_timeout=40", "--local-addr", hosts.addresses[host],
            "--max-restarts", "0", "-m", "saef", "train", "--backend", "dist", *ARGS, "--timeout", "30", "--output", str(out)]
    return subprocess.Popen(hosts.command(host, argv), env=env(**hosts.gloo_env(host)), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def parameters(run, step, rank):
    checkpoint = torch.load(run / "checkpoints" / f"step-{step:08d}.rank{rank}.pt", weights_only=False)
    return checkpoint["state"]["trainer"]


def test_two_hosts_over_a_slow_link_equal_the_simulator(tmp_path):
    """K = 2 hosts x 2 ranks, launched by torchrun with a c10d rendezvous across a 1 Gbit/s veth pair, end
    each epoch (after 10 and 20 steps) with the parameters of the simulator with K = 4 on every rank
    (allclose rtol 1e-5, atol 1e-6, as test_distributed.py) and the same bit counts; and the traffic
    really took both paths: the veth pair in both directions, and each host's loopback."""
    logs = [open(tmp_path / f"host{h}.log", "w") for h in range(2)]
    try:
        with _hosts.TwoHosts("1gbit") as hosts:
            sim = subprocess.Popen([sys.executable, "-m", "saef", "train", *ARGS, "--output", str(tmp_path / "sim")], env=env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
            nodes = [torchrun(hosts, h, tmp_path / "dist", logs[h]) for h in range(2)]
            codes = wait_all([*nodes, sim], timeout=50)
            sent = [(hosts.sent_bytes(h), hosts.sent_bytes(h, "lo")) for h in range(2)]
    finally:
        for log in logs:
            log.close()
    tails = [(tmp_path / f"host{h}.log").read_text()[-1500:] for h in range(2)]
    assert codes == [0, 0, 0], (codes, tails, sim.stderr.read()[-1500:])
    for step in (10, 20):
        reference = parameters(tmp_path / "sim", step, 0)
        for rank in range(4):
            got = parameters(tmp_path / "dist", step, rank)
            assert torch.allclose(got["x"], reference["x"], rtol=1e-5, atol=1e-6), (step, rank, (got["x"] - reference["x"]).abs().max())
            for key in ("bits_up", "bits_down", "bits_averaging"):
                assert got["ledger"][key] == reference["ledger"][key], (step, rank, key)
    wire = reference["ledger"]["bits_up"] // 8  # one rank's uplink: each path carries more than that
    assert all(veth > wire and lo > wire for veth, lo in sent), (sent, wire)


def test_hosts_are_removed_when_their_process_is_stopped(tmp_path):
    """SIGTERM or SIGINT to a process holding two hosts (with a process running inside one) removes both
    namespaces, and so the veth pair; a process killed with SIGKILL leaves them, and the next run removes
    them first."""
    holder = ("import sys, subprocess, time; sys.path.insert(0, sys.argv[1]); import _hosts\n"
              "with _hosts.TwoHosts('1gbit') as hosts:\n"
              "    child = subprocess.Popen(hosts.command(1, ['sleep', '60']))\n"
              "    print(*hosts.names, flush=True); time.sleep(60)\n")
    exits = {signal.SIGTERM: 143, signal.SIGINT: -signal.SIGINT, signal.SIGKILL: -signal.SIGKILL}
    for stop, code in exits.items():
        proc = subprocess.Popen([sys.executable, "-c", holder, str(HERE.parent / "benchmarks")], stdout=subprocess.PIPE, text=True)
        try:
            names = proc.stdout.readline().split()
            assert len(names) == 2 and set(names) <= set(namespaces()), names
            proc.send_signal(stop)
            assert proc.wait(timeout=20) == code, stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if stop == signal.SIGKILL:
            assert set(names) <= set(namespaces())  # left behind: its process could not clean up
            assert set(names) <= set(_hosts.remove_leftovers())
        assert not set(names) & set(namespaces()), names
        assert not any(name in _hosts.ip("link") for name in names)


def namespaces():
    return [line.split()[0] for line in _hosts.ip("netns", "list").splitlines() if line.strip()]
