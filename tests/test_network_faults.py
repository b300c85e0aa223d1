"""Network faults on a real link: a test host in its own network namespace (veth, 10.200.x.x),
faults made with nftables (dropped packets) and tc (a slow link)."""
from __future__ import annotations

import sys
import time

import netns
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
    netns.need("nft", "nftables")
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
    assert err.value.stage == "upload", err.value     # the stall is what is said first, not
    assert "lost" in err.value.message.split(";")[0], err.value.message    # the reconnect's
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
    netns.need("nft", "nftables")     # here: inside the fault's timer thread a skip is lost
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


def test_a_run_orphaned_by_a_dark_link_frees_the_device_lock(netns_home, netns_host, models):
    """Before: the host gave up on a dark link, the orphaned run kept the device lock until
    its max time and the next run waited 95 s. The run's lease (the host's heartbeat on its
    stdin) ends it once the heartbeat is silent for the stall bound plus a margin."""
    from edgesmith.devices.ssh import LEASE_MARGIN_S

    netns.need("nft", "nftables")
    cnn = prepare(load(models / "digits_cnn.onnx"), None)
    with netns_host.sshd.new_sessions():         # whatever is left is killed on the way out
        dev = device(netns_host, stall_timeout_s=3)
        path = dev.push(cnn)
        try:
            result, _ = run_with_fault(dev, path, netns_host.drop_ssh, timeout_s=90)
        finally:
            netns_host.restore()
        assert "lost" in result.error, result.error
        t0 = time.monotonic()
        after = device(netns_host).run(path, Job(runs=5, warmup=1, lock_timeout_s=50,
                                                 evaluate=False))
        waited = time.monotonic() - t0
    assert after.ok, after.error
    # the lease runs from the last heartbeat (the drop), the host gave up 3-9 s after it
    assert after.stages_ms["lock_wait"] / 1e3 < 3 + LEASE_MARGIN_S + 4, (after.stages_ms, waited)


def test_an_upload_cut_by_a_dark_link_leaves_no_temp_folder(netns_home, netns_host,
                                                              tmp_path):
    """Before: the device never saw the host go, its tar waited on the dead link and the
    temp folder stayed until a later push swept it an hour on. The tar runs under the
    upload's deadline on the device, and its folder goes with it."""
    import threading

    from conftest import ROOT

    netns.need("nft", "nftables")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deploy import big_model

    big_model(tmp_path / "big.onnx", mb=12)
    big = prepare(load(tmp_path / "big.onnx"), None)
    uploading = tmp_path / "remote" / "bundles"
    with netns_host.sshd.new_sessions():
        dev = device(netns_host, stall_timeout_s=3, upload_timeout_s=6)
        dev.ensure_runtime()
        netns_host.slow_link("8mbit")          # ~12 s of upload: the link goes dark within it
        failed = []
        push = threading.Thread(target=lambda: failed.append(_push_error(dev, big)))
        t0 = time.monotonic()
        try:
            push.start()
            while time.monotonic() - t0 < 30 and not any(
                    p.name.startswith(".tmp-") for p in uploading.glob("*")):
                time.sleep(0.1)
            time.sleep(1)
            netns_host.drop_ssh()
            push.join(30)
            assert failed and failed[0], failed       # the host gave up on the link
            while time.monotonic() - t0 < 40 and list(uploading.glob(".tmp-*")):
                time.sleep(0.5)
            left = list(uploading.glob(".tmp-*"))
        finally:
            netns_host.restore()
            netns_host.fast_link()
    assert not left, f"{left} still there {time.monotonic() - t0:.0f}s after the push began"


def _push_error(dev, bundle) -> str:
    try:
        dev.push(bundle)
    except StageError as exc:
        return exc.message
    return ""


def test_ctrl_c_during_a_slow_upload_stops_it_within_seconds(netns_home, netns_host, tmp_path):
    """`edgesmith profile` of a 12 MB model over an 8 Mbit/s link (~12 s of upload), Ctrl-C 3 s
    into the upload: the command ends within seconds (not when the upload would have finished)
    and nothing the runtime would load is left under the bundle's name."""
    import signal
    import subprocess

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deploy import big_model

    big_model(tmp_path / "big.onnx", mb=12)
    dev = device(netns_host)
    dev.ensure_runtime()                  # the runtime's own upload is not what is timed
    netns_host.slow_link("8mbit")
    uploading = tmp_path / "remote" / "bundles"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgesmith", "profile", str(tmp_path / "big.onnx"),
             "--device", netns_host.destination, "--identity", str(netns_host.sshd.client_key),
             "--python", sys.executable], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                p.name.startswith(".tmp-") for p in uploading.glob("*")):
            time.sleep(0.1)                 # the upload has begun: its temp folder is there
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        netns_host.fast_link()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert took < 3, f"Ctrl-C took {took:.1f}s to stop the upload"
    assert not [p for p in uploading.glob("*") if not p.name.startswith(".tmp-")]


def test_a_deploy_orphaned_by_a_dark_link_frees_the_device_lock(netns_home, netns_host, tmp_path):
    """A deploy's check times the model under the device's benchmark lock. Before, a deploy
    whose host had given up on a dark link kept checking, and holding the lock, for up to its
    30 s of timing. It is on the same lease as a run now: silent heartbeat, it ends."""
    import threading

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from test_cli import add_one_body
    from edgesmith.deploy import deploy
    from edgesmith.devices.ssh import LEASE_MARGIN_S
    from edgesmith.model import load

    netns.need("nft", "nftables")
    slow = tmp_path / "slow.onnx"      # about 1.4 s a run: the check times to its 30 s bound
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=add_one_body())], "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(1_500_000, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, slow)
    bundle = prepare(load(slow), None)
    with netns_host.sshd.new_sessions():
        dev = device(netns_host, stall_timeout_s=3)
        threading.Timer(6.0, netns_host.drop_ssh).start()   # inside the check's timing
        try:
            rows = deploy(bundle.path, "slow", [dev], timeout_s=120)
        finally:
            netns_host.restore()
        assert not rows[0].ok and "lost" in " ".join(rows[0].reasons), rows[0]
        path = device(netns_host).push(bundle)
        after = device(netns_host).run(path, Job(runs=1, warmup=0, lock_timeout_s=50,
                                                 evaluate=False))
    assert after.ok, after.error
    assert after.stages_ms["lock_wait"] / 1e3 < 3 + LEASE_MARGIN_S + 4, after.stages_ms
