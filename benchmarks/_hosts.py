"""Two "hosts" on one machine: two network namespaces joined by a veth pair, the link rate-limited.

    with TwoHosts("100mbit") as hosts:
        subprocess.run(hosts.command(1, ["python", "-c", "..."]), env={**os.environ, **hosts.gloo_env(1)})

Host h is the namespace ``hosts.names[h]``; its end of the veth pair has the same name and the address
``hosts.addresses[h]`` (10.77.0.1 and 10.77.0.2, /24). The addresses exist only inside the namespaces:
nothing is added to the machine's own namespace, and the veth pair is created directly inside them. Each
namespace's ``lo`` is up, so processes on one host reach each other (also through their own veth address,
which the kernel routes over ``lo``) at memory speed, while traffic between the hosts crosses the veth
pair, whose two ends each carry a token bucket (``tc qdisc ... tbf rate R burst 256kb latency 50ms``): the
link is slow in both directions.

Names are ``saefh<pid>a`` and ``saefh<pid>b``, so two runs (and the network benchmark's ``saefbench``)
never collide. Everything is removed on leaving the ``with`` block, also on an exception, SIGINT or
SIGTERM (turned into KeyboardInterrupt and SystemExit(143) while the block runs), and entering it first
removes what a previous run whose process no longer exists left behind. Removing a host kills the
processes still inside it; the veth pair goes with its namespaces. Needs root and iproute2 (ip, tc).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading

PREFIX = "saefh"
ADDRESSES = ("10.77.0.1", "10.77.0.2")  # private (RFC 1918), and only inside the two namespaces
LEFTOVER = re.compile(rf"^{PREFIX}(\d+)[ab]$")


def ip(*argv, check=True):
    """Run ``ip ARGV`` (or ``tc`` via ``ip netns exec``) with a bound wait; its output, or raise."""
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def unavailable() -> str | None:
    """Why two hosts cannot be made here (not root, no ip or tc, ``ip netns`` refused), or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip and tc)"
    try:
        ip("netns", "list")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        return f"ip netns does not work here: {error}"
    return None


def remove_host(name: str) -> None:
    """Kill what still runs inside namespace ``name``, then delete it (its veth end and the peer go too)."""
    for pid in ip("netns", "pids", name, check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    ip("netns", "del", name, check=False)


def remove_leftovers() -> list:
    """Delete the hosts of earlier runs whose process is gone (a crash, a SIGKILL); return their names.
    A live run's hosts are left alone."""
    removed = []
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        match = LEFTOVER.match(name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its run is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        remove_host(name)
        removed.append(name)
    return removed


class TwoHosts:
    """Two namespaces joined by a veth pair limited to ``rate`` (tc's syntax: "100mbit", "1gbit") each way.

    Args:
        rate: the token-bucket rate of each veth end.
        mtu: of both veth ends and both loopbacks (default 9000, as the network benchmark's loopback).
        burst, latency: the token bucket's (defaults "256kb", "50ms", as the network benchmark's).
    """

    def __init__(self, rate: str, mtu: int = 9000, burst: str = "256kb", latency: str = "50ms"):
        self.rate, self.mtu, self.burst, self.latency = rate, mtu, burst, latency
        self.names = (f"{PREFIX}{os.getpid()}a", f"{PREFIX}{os.getpid()}b")  # namespace = its veth end
        self.addresses = ADDRESSES
        self._handlers = {}

    def command(self, host: int, argv) -> list:
        """``argv`` run inside host ``host`` (0 or 1)."""
        return ["ip", "netns", "exec", self.names[host], *argv]

    def gloo_env(self, host: int) -> dict:
        """The environment gloo needs on ``host``: bind to the veth end (not the machine's hostname)."""
        return {"GLOO_SOCKET_IFNAME": self.names[host]}

    def sent_bytes(self, host: int, device: str | None = None) -> int:
        """Bytes sent so far by ``device`` (default: the host's veth end; "lo": its loopback)."""
        device = device or self.names[host]
        stats = json.loads(ip("-n", self.names[host], "-s", "-j", "link", "show", "dev", device))
        return int(stats[0]["stats64"]["tx"]["bytes"])

    def up(self) -> None:
        remove_leftovers()
        self.down()
        a, b = self.names
        for name in self.names:
            ip("netns", "add", name)
        ip("link", "add", a, "netns", a, "type", "veth", "peer", "name", b, "netns", b)
        for name, address in zip(self.names, self.addresses):
            ip("-n", name, "addr", "add", f"{address}/24", "dev", name)
            for device in ("lo", name):
                ip("-n", name, "link", "set", device, "mtu", str(self.mtu), "up")
            ip("netns", "exec", name, "tc", "qdisc", "add", "dev", name, "root", "tbf", "rate", self.rate,
               "burst", self.burst, "latency", self.latency)

    def down(self) -> None:
        """Remove both hosts; SIGINT and SIGTERM wait until this is done."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for name in self.names:
                remove_host(name)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def __enter__(self) -> "TwoHosts":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._handlers[signum] = signal.signal(signum, _stop)
        try:
            self.up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)
            self._handlers.clear()


def _stop(signum, frame):
    """While hosts exist, a signal unwinds the stack (so every ``finally`` and ``__exit__`` runs)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)
