"""A fleet deploy's wall time against one device's, measured in one run (#35's goal).

    python benchmarks/fleet.py [--devices 16] [--parallel 8]

Starts one OpenSSH sshd per device, each in its own network namespace (as the tests do; needs
root, iproute2), deploys the digits CNN bundle to one device, then the next version to all of
them with `--parallel`, and prints both times and their ratio (goal: 16 devices at --parallel 8
in <= 3x one device). Every "device" here shares this machine's cores: each device's check runs
the model on them, so the ratio is also printed for the part of a deploy that is the link (push
and session setup), which is what a real fleet runs in parallel.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def cpu_seconds() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / hz, sum(fields) / hz


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    import netns
    from conftest import MODELS, ssh_device
    from device_runtime import facts
    from test_deploy import bundle_of

    from edgesmith.deploy import deploy

    if not netns.available():
        sys.exit("needs network namespaces (root, iproute2)")
    work = Path(tempfile.mkdtemp(prefix="edgesmith-fleet-"))
    home = work / "home"
    (home / ".ssh").mkdir(parents=True)
    os.environ.update(HOME=str(home), EDGESMITH_REMOTE_DIR=str(work / "remote-default"))
    print(f"CPU: {facts.collect(with_providers=False).get('cpu')} ({os.cpu_count()} cores)")
    hosts = [netns.NetnsHost(work / f"ns{i}", 100 + (os.getpid() + i) % 100)
             for i in range(args.devices)]
    try:
        for host in hosts:
            (work / f"ns{host.k}").mkdir(exist_ok=True)
            host.start()
        (home / ".ssh" / "known_hosts").write_text(
            "\n".join(h.known_hosts_line() for h in hosts) + "\n")
        fleet = [ssh_device(h, h.sshd.client_key, remote_dir=str(work / f"remote{i}"))
                 for i, h in enumerate(hosts)]
        first, second = bundle_of(MODELS, 0.0), bundle_of(MODELS, 0.001)
        for dev in fleet:                      # the runtime installed once, as on a real fleet
            dev.ensure_runtime()
        t0, c0 = time.monotonic(), cpu_seconds()
        [one] = deploy(first.path, "digits", fleet[:1])
        t_one, c1 = time.monotonic() - t0, cpu_seconds()
        assert one.ok, one
        t0, c2 = time.monotonic(), cpu_seconds()
        rows = deploy(second.path, "digits", fleet, parallel=args.parallel)
        t_all, c3 = time.monotonic() - t0, cpu_seconds()
        failed = [r for r in rows if not r.ok]
        print(f"one device: {t_one:.2f} s; {args.devices} devices at --parallel "
              f"{args.parallel}: {t_all:.2f} s = {t_all / t_one:.2f}x   goal: <= 3x"
              f"{f'  ({len(failed)} failed: {failed[0].reasons})' if failed else ''}")
        per = sorted(r.seconds for r in rows)
        print(f"   per device in the fleet run: median {per[len(per) // 2]:.2f} s, slowest "
              f"{per[-1]:.2f} s (one device alone: {one.seconds:.2f} s); the checks share "
              f"{os.cpu_count()} cores here, each real device has its own")
        busy_one, busy_all = c1[0] - c0[0], c3[0] - c2[0]
        print(f"   CPU time (host and every device together): one device {busy_one:.2f} s, the "
              f"fleet {busy_all:.2f} s; the cores were busy {busy_all / (c3[1] - c2[1]):.0%} of "
              f"the fleet run; its floor on {os.cpu_count()} cores is "
              f"{busy_all / os.cpu_count():.2f} s (CPU time / cores): the rollout's own "
              f"waiting is what the run took beyond that")
    finally:
        for host in hosts:
            host.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
