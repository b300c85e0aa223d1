"""Network faults on a real link: a test host in its own network namespace (veth, 10.200.x.x),
faults made with nftables (dropped packets) and tc (a slow link)."""
from __future__ import annotations

import sys
import time

import pytest

from conftest import run_with_fault
from device_runtime.bundle import verify
from edgesmith.devices import Job
from edgesmith.devices.ssh import SSHDevice
from edgesmith.errors import StageError
from edgesmith.model import load
from edgesmith.measure import measure
from edgesmith.profiling import prepare

pytestmark = [pytest.mark.ssh, pytest.mark.netns]


def device(host, **options) -> SSHDevice:
    options.setdefault("python", sys.executable)
    options.setdefault("connect_timeout_s", 4)
    return SSHDevice.from_destination(host.destination, identity=str(host.sshd.client_key),
                                      **options)


@pytest.fixture
def big(models):
    return prepare(load(models / "digits_mnv2.onnx"), models / "digits_mnv2_eval.npz")


def test_profile_across_the_namespace_link(netns_home, netns_host, models):
    cnn = prepare(load(models / "digits_cnn.onnx"), models / "digits_cnn_eval.npz")
    result = measure(device(netns_host), cnn, Job(runs=10))
    assert result.ok, result.error
    assert result.accuracy["agreement"] == 1.0


def test_link_dropped_mid_upload_then_recovers(netns_home, netns_host, big, tmp_path):
    dev = device(netns_host, stall_timeout_s=3)
    dev.ensure_runtime()
    dev.on_upload_progress = lambda done, total: netns_host.drop_ssh() if done < total else None
    t0 = time.monotonic()
    try:
        with pytest.raises(StageError) as err:
            dev.push(big)
    finally:
        netns_host.restore()
    assert time.monotonic() - t0 < 30
    assert err.value.stage in ("upload", "connect")
    assert "lost" in err.value.message or "timed out" in err.value.message
    remote = tmp_path / "remote" / "bundles"
    assert not (remote / big.id).exists()            # nothing half-written under the real name
    result = measure(device(netns_host), big, Job(runs=5))
    assert result.ok, result.error
    verify(remote / big.id)


def test_unreachable_device_names_the_connect_stage(netns_home, netns_host, models):
    cnn = prepare(load(models / "digits_cnn.onnx"), None)
    gone = SSHDevice.from_destination(f"root@10.200.{netns_host.k}.77:22", connect_timeout_s=3)
    t0 = time.monotonic()
    result = measure(gone, cnn, Job(runs=5))
    assert result.stage == "connect" and time.monotonic() - t0 < 20
    assert "cannot reach" in result.error or "timed out" in result.error


def test_slow_link_over_the_upload_timeout_fails_clearly_then_fast_link_works(
        netns_home, netns_host, big, models):
    netns_host.slow_link("2mbit")                    # ~4.6 MB bundle: ~20 s at 2 Mbit/s
    try:
        dev = device(netns_host, upload_timeout_s=3)
        dev.ensure_runtime()
        with pytest.raises(StageError, match="did not finish in 3s.*raise the upload timeout"):
            dev.push(big)
        small = prepare(load(models / "digits_cnn.onnx"), None)     # 0.4 MB: slow but fine
        assert measure(device(netns_host, upload_timeout_s=60), small, Job(runs=5)).ok
    finally:
        netns_host.fast_link()
    assert measure(device(netns_host), big, Job(runs=5)).ok


def test_link_dark_mid_run_is_lost_within_the_stall_bound(netns_home, netns_host, models):
    """Packets dropped 2 s into a long run: reported as a lost connection within the stall
    bound, not after the run's whole timeout with "raise the timeout"."""
    cnn = prepare(load(models / "digits_cnn.onnx"), None)
    with netns_host.sshd.new_sessions():         # the orphaned run is killed on the way out
        dev = device(netns_host, stall_timeout_s=3)
        try:
            result, elapsed = run_with_fault(dev, dev.push(cnn), netns_host.drop_ssh)
        finally:
            netns_host.restore()
    assert "lost" in result.error and "raise the timeout" not in result.error, result.error
    assert elapsed < 12
    assert measure(device(netns_host), cnn, Job(runs=5)).ok
