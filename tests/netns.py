"""A test host in its own network namespace, reached over a veth pair on 10.200.x.x.

Before any namespace exists, `unreachable 10.200.0.0/16` is routed (metric 4000), so if the veth
goes down no packet can leave through the default route. Only addresses inside namespaces made
here are contacted. Teardown removes the namespace, the veth, the route (if added here) and
every process started in the namespace.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from sshd import Sshd

GUARD = ["10.200.0.0/16", "metric", "4000"]


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check,
                          timeout=timeout)


def need(tool: str, package: str) -> None:
    """A fault made with a system tool: skip with the reason where it is missing (a developer
    machine), fail under CI=true (.ci/run installs it)."""
    from conftest import require
    require(shutil.which(tool) is not None,
            f"{tool} missing: .ci/run installs it (apt-get install {package})")


def available() -> bool:
    probe = f"esprobe{os.getpid()}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
        return True
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return False


def free_index(start: int, taken: set[int] = frozenset()) -> int:
    """A subnet index 10..249 from `start` on that no interface here uses yet (another test
    session's namespace on 10.200.<k> would take this one's packets)."""
    import re

    used = {int(k) for k in re.findall(r"10\.200\.(\d+)\.", sh("ip", "-o", "-4", "addr",
                                                                 "show").stdout)} | set(taken)
    return next(10 + (start - 10 + i) % 240 for i in range(240)
                if 10 + (start - 10 + i) % 240 not in used)


class NetnsHost:
    """sshd inside `ip netns` at 10.200.<k>.2; the host side of the veth is 10.200.<k>.1."""

    def __init__(self, workdir: Path, index: int, root: Path | None = None):
        self.k = index
        self.ns = f"es{os.getpid() % 10000}n{index}"
        self.host_if, self.ns_if = f"esh{os.getpid() % 10000}{index}", f"esd{os.getpid() % 10000}{index}"
        self.address = f"10.200.{index}.2"
        self.sshd = Sshd(workdir, root)   # root: the sshd of a chrooted rootfs (emulated_pi)
        self.added_guard = False

    def start(self, wait_s: float = 15) -> None:
        if "unreachable 10.200.0.0/16" not in sh("ip", "route", "show").stdout:
            sh("ip", "route", "add", "unreachable", *GUARD)
            self.added_guard = True
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"10.200.{self.k}.1/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        for cmd in (["ip", "addr", "add", f"{self.address}/24", "dev", self.ns_if],
                    ["ip", "link", "set", self.ns_if, "up"], ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", self.ns, *cmd)
        config = self.sshd.config.read_text().replace("ListenAddress 127.0.0.1",
                                                      f"ListenAddress {self.address}")
        self.sshd.config.write_text(config)
        self.sshd.launch(["ip", "netns", "exec", self.ns])
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self.sshd.proc.poll() is None:
            try:
                socket.create_connection((self.address, self.sshd.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        log = (self.sshd.dir / "log").read_text()[-300:]
        raise RuntimeError(f"sshd in {self.ns} did not come up: {log}")

    def nft(self, *rule: str) -> None:
        need("nft", "nftables")
        sh("ip", "netns", "exec", self.ns, "nft", *rule)

    def drop_ssh(self) -> None:
        """The link goes dark: every packet to sshd is dropped (no RST, like a pulled cable)."""
        self.nft("add", "table", "inet", "esfault")
        self.nft("add", "chain", "inet", "esfault", "in",
                 "{ type filter hook input priority 0 ; }")
        self.nft("add", "rule", "inet", "esfault", "in", "tcp", "dport", str(self.sshd.port),
                 "drop")

    def restore(self) -> None:
        sh("ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", "esfault",
           check=False)

    def slow_link(self, rate: str = "2mbit") -> None:
        need("tc", "iproute2")
        sh("tc", "qdisc", "add", "dev", self.host_if, "root", "tbf", "rate", rate, "burst",
           "32kbit", "latency", "400ms")

    def fast_link(self) -> None:
        sh("tc", "qdisc", "del", "dev", self.host_if, "root", check=False)

    @property
    def destination(self) -> str:
        return f"{self.sshd.user}@{self.address}:{self.sshd.port}"

    def known_hosts_line(self) -> str:
        key = self.sshd.host_key_pub.split()
        return f"[{self.address}]:{self.sshd.port} {key[0]} {key[1]}"

    def stop(self) -> None:
        self.sshd.stop()
        pids = sh("ip", "netns", "pids", self.ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.host_if, check=False)
        if self.added_guard:
            sh("ip", "route", "del", "unreachable", *GUARD, check=False)
