"""Deploy and operate, with real parts: bundles of the digits CNN installed in a store on the
device, checked there before activation, served by an application process that follows deploys
and rollbacks between calls, over the local device and a real OpenSSH sshd on 127.0.0.1.

Versions are the CNN with its last bias shifted by k/1000: same predictions (the check passes),
outputs that say which version answered. A broken version shifts one class's bias by 100: every
prediction becomes that class, and the check on the device must refuse it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import ROOT, run_cli, ssh_device
from edgesmith import bundle as bundles
from device_runtime import store as device_store
from edgesmith.data import input_stats, load_eval_set, reference_outputs
from edgesmith.deploy import deploy, rollback, status
from edgesmith.devices import get_device
from edgesmith.model import from_proto, load

EVAL = "digits_cnn_eval.npz"


def variant(models, shift: float, one_class: float = 0.0):
    """The CNN with its last bias + `shift` (and class 3's + `one_class`)."""
    base = load(models / "digits_cnn.onnx")
    proto = onnx.ModelProto()
    proto.CopyFrom(base.proto)
    for init in proto.graph.initializer:
        if init.name == "head.4.bias":
            bias = numpy_helper.to_array(init).copy() + np.float32(shift)
            bias[3] += np.float32(one_class)
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    return base, from_proto(proto, base)


def bundle_of(models, shift: float, one_class: float = 0.0, **accept):
    """A bundle as optimize writes it: the original's reference outputs on the eval samples and
    the budget ("accept") the device checks it against."""
    base, model = variant(models, shift, one_class)
    data = load_eval_set(models / EVAL, base)
    data.refs = reference_outputs(base, data, 32)
    baseline = {"top1": float(np.mean(data.refs["logits"].argmax(1) == data.labels))}
    meta = {"accept": {"max_accuracy_drop": 0.01, "baseline": baseline, "class_scores": True,
                       "input_stats": input_stats([data.inputs]), **accept}}
    return bundles.build(model, eval_data=data, eval_batch=32, meta=meta)


APP = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import device_runtime
    name, store, stop_file, seconds, scale = sys.argv[1:6]
    x = np.load(sys.argv[6])["input"][:1] * float(scale)
    served = device_runtime.serve(name, store, poll_s=0.05, flush_s=0.5)
    calls, failures, seen, slow, t_end = 0, [], [], [], time.monotonic() + float(seconds)
    import os
    while time.monotonic() < t_end and not os.path.exists(stop_file):
        t0 = time.perf_counter()
        try:
            out = served.run({"input": x})["logits"]
        except Exception as exc:
            failures.append(repr(exc))
            continue
        dt = time.perf_counter() - t0
        calls += 1
        if not seen or seen[-1][0] != served.last_version:
            seen.append([served.last_version, float(out[0, 0])])
        slow.append(dt)
    served.close()
    slow.sort()
    print(json.dumps({"calls": calls, "failures": failures, "seen": seen,
                      "max_ms": slow[-1] * 1e3, "p99_ms": slow[int(0.99 * len(slow))] * 1e3}))
""")


def start_app(tmp_path, models, store, name="digits", seconds=60, scale=1.0):
    script = tmp_path / "app.py"
    script.write_text(APP)
    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, str(script), name, str(store), str(stop),
                             str(seconds), str(scale), str(models / EVAL)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return proc, stop


def finish_app(proc, stop) -> dict:
    stop.write_text("")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def wait_for(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_running_app_follows_five_deploys_and_a_rollback_with_no_failed_call(
        models, tmp_path):
    store = tmp_path / "store"
    local = get_device("local")
    first = bundle_of(models, 0.0)
    [row] = deploy(first.path, "digits", [local], store=str(store))
    assert row.ok and row.activated and row.version == 1, row
    base_out = variant(models, 0.0)[1]
    proc, stop = start_app(tmp_path, models, store)
    try:
        wait_for(lambda: (store / "digits" / "telemetry").is_dir())
        for k in range(1, 5):                  # versions 2..5, each shifting the logits by k/1000
            [row] = deploy(bundle_of(models, k / 1000).path, "digits", [local], store=str(store))
            assert row.ok and row.activated and row.version == k + 1, row
            assert wait_for(lambda: device_store.pointer("digits", store)["version"] == k + 1)
            time.sleep(0.5)
        [back] = rollback("digits", [local], store=str(store))
        assert back.ok and back.active == 4, back
        time.sleep(0.8)
    finally:
        app = finish_app(proc, stop)
    assert app["failures"] == [] and app["calls"] > 100, app
    versions = [v for v, _ in app["seen"]]
    assert versions[0] == 1 and 5 in versions and versions[-1] == 4, app["seen"]
    # the outputs came from the version the app said served them: logit 0 moves by k/1000
    x = np.load(models / EVAL)["input"][:1]
    import onnxruntime as ort
    ref = ort.InferenceSession(base_out.serialized()).run(None, {"input": x})[0][0, 0]
    for version, logit in app["seen"]:
        assert abs(logit - (ref + (version - 1) / 1000)) < 2e-4, (version, logit, ref)
    # what the app saw comes back in status: calls per version, field p50 beside the check's
    [(_, reply)] = status("digits", [local], store=str(store))
    rows = reply["models"]["digits"]["versions"]
    assert sum((r["field"] or {}).get("calls", 0) for r in rows.values()) == app["calls"]
    assert rows["4"]["field"]["p50_ms"] > 0 and rows["4"]["check"]["passed"]


def test_a_version_that_fails_its_check_on_the_device_is_never_activated(models, tmp_path):
    store = tmp_path / "store"
    local = get_device("local")
    assert deploy(bundle_of(models, 0.0).path, "digits", [local], store=str(store))[0].activated
    [row] = deploy(bundle_of(models, 0.0, one_class=100.0).path, "digits", [local],
                   store=str(store))
    assert not row.ok and not row.activated and row.active == 1, row
    assert any("accuracy drop" in r and "over the budget" in r for r in row.reasons), row.reasons
    assert device_store.pointer("digits", store)["version"] == 1
    # a version that never passed cannot be rolled back to either
    [back] = rollback("digits", [local], to=2, store=str(store))
    assert not back.ok and "never passed its check" in back.reasons[0], back
    # the CLI says the same in one line per device and exits 1
    proc = run_cli("deploy", bundle_of(models, 0.0, one_class=100.0).path, "--name", "digits",
                   "--store", store)
    assert proc.returncode == 1 and "over the budget" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_latency_over_the_tolerance_on_the_same_cpu_is_refused(models, tmp_path):
    from device_runtime import facts

    cpu = facts.collect(with_providers=False).get("cpu")
    slow = slow_model(tmp_path)         # far above the timer slack a 20 us model is given
    slow_enough = bundles.build(slow, meta={"accept": {"latency_ms": 1e-6, "cpu": cpu}})
    [row] = deploy(slow_enough.path, "mlp", [get_device("local")], store=str(tmp_path / "s"))
    assert not row.activated and "measured when it was chosen" in row.reasons[0], row
    assert row.figures["p50_ms"] > 0.1, row           # the model is as slow as meant
    other_cpu = bundles.build(slow, meta={"accept": {"latency_ms": 1e-6, "cpu": "another CPU"}})
    [row] = deploy(other_cpu.path, "mlp", [get_device("local")], store=str(tmp_path / "s"))
    assert row.activated and "not compared" in row.figures["latency_note"], row


def slow_model(tmp_path):
    """Eight 1024-wide Gemm layers: about 8 M multiply-adds, well over 0.1 ms on any CPU."""
    from onnx import TensorProto, helper

    rng, nodes, inits = np.random.default_rng(0), [], []
    for i in range(8):
        inits += [numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32)
                                          * 0.03, f"w{i}"),
                  numpy_helper.from_array(np.zeros(1024, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [f"x{i}", f"w{i}", f"b{i}"], [f"x{i + 1}"]))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info(
        "x0", TensorProto.FLOAT, [1, 1024])], [helper.make_tensor_value_info(
            "x8", TensorProto.FLOAT, [1, 1024])], inits)
    path = tmp_path / "slow.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return load(path)


def test_field_inputs_unlike_the_calibration_data_show_as_drift(models, tmp_path):
    store = tmp_path / "store"
    for name, scale in (("calm", 1.0), ("drifted", 40.0)):
        deploy(bundle_of(models, 0.0).path, name, [get_device("local")], store=str(store))
        proc, _ = start_app(tmp_path, models, store, name=name, seconds=2, scale=scale)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and json.loads(out)["calls"] > 0, err[-2000:]
    calm, drifted = (run_cli("status", name, "--store", store) for name in ("calm", "drifted"))
    assert calm.returncode == 0 and "calls" in calm.stdout and "DRIFT" not in calm.stdout, \
        calm.stdout + calm.stderr
    assert drifted.returncode == 0 and "DRIFT: input" in drifted.stdout, drifted.stdout


def test_names_with_path_or_shell_syntax_are_refused(models, tmp_path):
    bundle, store = bundle_of(models, 0.0), tmp_path / "store"
    store.mkdir()
    for name in ("../x", "a/b", "a b", "$(touch pwned)", "", ".hidden", "x" * 65):
        proc = run_cli("deploy", bundle.path, "--name", name, "--store", store)
        assert proc.returncode == 1 and "model name" in proc.stderr, (name, proc.stderr)
    assert not (ROOT / "pwned").exists() and list(store.iterdir()) == []


def test_two_deploys_to_one_name_at_once_are_serialized(models, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    bundles, store = [bundle_of(models, k / 1000) for k in (1, 2)], tmp_path / "store"
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda b: deploy(b.path, "digits", [get_device("local")],
                                              store=str(store))[0], bundles))
    assert all(r.ok and r.activated for r in rows), rows
    assert sorted(r.version for r in rows) == [1, 2]
    pointer = device_store.pointer("digits", store)
    assert {pointer["version"], pointer["previous"]} == {1, 2}


@pytest.mark.ssh
def test_deploy_status_and_rollback_over_ssh(ssh_home, sshd_server, models, tmp_path):
    store = tmp_path / "remote-store"
    dev = ssh_device(sshd_server)
    for k in range(3):
        [row] = deploy(bundle_of(models, k / 1000).path, "digits", [dev], store=str(store),
                       keep=1)
        assert row.ok and row.activated and row.version == k + 1, row
    # keep=1: versions 3 (active) and 2 (previous) stay, 1 goes
    assert sorted(device_store.versions("digits", store)) == [2, 3]
    [again] = deploy(bundle_of(models, 2 / 1000).path, "digits", [dev], store=str(store))
    assert again.ok and not again.activated and "already active" in again.note, again
    [back] = rollback("digits", [dev], store=str(store))
    assert back.ok and back.active == 2
    [(name, reply)] = status(None, [dev], store=str(store))
    assert reply["models"]["digits"]["pointer"]["version"] == 2


@pytest.mark.ssh
def test_a_failed_canary_stops_the_rollout(ssh_home, sshd_server, models, tmp_path):
    """devices.toml lists the canary second (`canary = true`): it goes first, cannot be
    reached (a real refused connection), and the local device is never deployed to."""
    store = tmp_path / "store"
    inventory = tmp_path / "devices.toml"
    inventory.write_text(f"""
[[device]]
name = "here"
destination = "local"

[[device]]
name = "gone"
destination = "nobody@127.0.0.1:1"
identity = "{sshd_server.client_key}"
canary = true
""")
    proc = run_cli("deploy", bundle_of(models, 0.0).path, "--name", "digits", "--fleet",
                   inventory, "--store", store, "--json", tmp_path / "rows.json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["device"] for r in rows] == ["gone", "local"] and rows[0]["canary"], rows
    assert not rows[1]["ok"] and "canary gone failed" in rows[1]["reasons"][0], rows
    assert not (store / "digits").exists()


def test_the_example_app_serves_the_deployed_model_and_stops_on_sigterm(models, tmp_path):
    import signal

    store = tmp_path / "store"
    deploy(bundle_of(models, 0.0).path, "digits", [get_device("local")], store=str(store))
    app = subprocess.Popen([sys.executable, str(ROOT / "examples" / "app" / "serve_digits.py"),
                            "--name", "digits", "--store", str(store), "--samples",
                            str(models / EVAL), "--interval", "0.001"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert wait_for(lambda: (store / "digits" / "active.json").is_file())
        time.sleep(1.5)
        deploy(bundle_of(models, 0.001).path, "digits", [get_device("local")], store=str(store))
        time.sleep(1.5)
    finally:
        app.send_signal(signal.SIGTERM)
        out, err = app.communicate(timeout=30)
    assert app.returncode == 0, err[-2000:]
    assert "serving digits version 1" in out and "serving digits version 2" in out, out
    [(_, reply)] = status("digits", [get_device("local")], store=str(store))
    calls = sum((v["field"] or {}).get("calls", 0)
                for v in reply["models"]["digits"]["versions"].values())
    assert calls == int(out.strip().splitlines()[-1].split()[2]), (calls, out[-300:])


@pytest.mark.ssh
def test_captured_field_inputs_come_back_as_calibration_data(ssh_home, sshd_server, models,
                                                           tmp_path):
    from edgesmith.data import calibration_batches

    store = tmp_path / "store"
    dev = ssh_device(sshd_server)
    [row] = deploy(bundle_of(models, 0.0).path, "digits", [dev], store=str(store), capture=25)
    assert row.activated, row
    proc, stop = start_app(tmp_path, models, store, seconds=2, scale=3.0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and json.loads(out)["calls"] > 25, err[-2000:]
    field = tmp_path / "field.npz"
    proc = run_cli("pull-samples", "digits", "--device", sshd_server.destination, "--identity",
                   sshd_server.client_key, "--python", sys.executable, "--store", store,
                   "-o", field)
    assert proc.returncode == 0 and "25 field sample(s)" in proc.stdout, proc.stdout + proc.stderr
    x = np.load(field, allow_pickle=False)["input"]
    assert x.shape == (25, 1, 8, 8)
    np.testing.assert_allclose(x, np.load(models / EVAL)["input"][:1].repeat(25, 0) * 3.0)
    batches = list(calibration_batches(field, load(models / "digits_cnn.onnx"), 8))
    assert sum(len(b["input"]) for b in batches) == 25
    again = run_cli("pull-samples", "digits", "--store", store, "-o", field)
    assert again.returncode == 1 and "exists" in again.stderr, again.stderr


def test_an_app_can_serve_several_names_and_pin_a_version(models, tmp_path):
    import device_runtime

    store = tmp_path / "store"
    for k in (0, 1):
        deploy(bundle_of(models, k / 1000).path, "digits", [get_device("local")],
               store=str(store))
    x = np.load(models / EVAL)["input"][:1]
    active = device_runtime.serve("digits", store, telemetry=False)
    pinned = device_runtime.serve("digits", store, pin=1, telemetry=False)   # a second call
    a, b = (s.run({"input": x})["logits"] for s in (active, pinned))
    assert active.last_version == 2 and pinned.last_version == 1
    np.testing.assert_allclose(a - b, 0.001, atol=2e-5)
    with pytest.raises(device_runtime.errors.RuntimeFailure, match="no active version"):
        device_runtime.serve("other", store)


def test_a_deploy_killed_during_its_check_leaves_the_old_version_and_a_rerun_finishes(
        models, tmp_path):
    """SIGKILL of the device side mid-check (a real kill, the host dying with its session):
    the new version is installed but not active; the same deploy again checks and activates."""
    import signal

    store = tmp_path / "store"
    local = get_device("local")
    deploy(bundle_of(models, 0.0).path, "digits", [local], store=str(store))
    second = bundle_of(models, 0.001)
    proc = subprocess.Popen([sys.executable, "-m", "device_runtime", "deploy", str(second.path),
                             "--name", "digits", "--store", str(store)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while "measuring" not in line and proc.poll() is None:   # the check is timing the model
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert device_store.pointer("digits", store)["version"] == 1
    assert "check" not in device_store.versions("digits", store)[2]
    served = __import__("device_runtime").serve("digits", store, telemetry=False)
    assert served.last_version == 1
    [row] = deploy(second.path, "digits", [local], store=str(store))
    assert row.ok and row.activated and row.version == 2 and not row.reasons, row


def test_a_full_store_disk_fails_the_install_in_one_line_and_keeps_serving(models, tmp_path):
    from conftest import small_disk

    with small_disk(tmp_path / "small-disk", "600k", "the store's disk") as disk:
        local = get_device("local")
        assert deploy(bundle_of(models, 0.0).path, "digits", [local], store=str(disk))[0].ok
        [row] = deploy(bundle_of(models, 0.001).path, "digits", [local], store=str(disk))
        assert not row.ok and "cannot install version 2" in row.reasons[0], row
        assert "No space left" in row.reasons[0] and "\n" not in row.reasons[0]
        assert device_store.pointer("digits", disk)["version"] == 1
        assert sorted(p.name for p in (disk / "digits" / "versions").iterdir()) == ["1"]


@pytest.mark.ssh
@pytest.mark.netns
def test_a_fleet_of_eight_namespace_devices_stops_at_a_failed_canary_then_rolls_out(
        models, tmp_path, monkeypatch, sshd_server):
    """(`sshd_server`: the loopback sshd's setup, which namespace sshds need too.)
    Eight sshd hosts, each in its own network namespace with its own remote dir (so its own
    store). The canary's disk is a 320 KB tmpfs: its push fails, and no other device is
    touched. With a healthy canary the same deploy reaches all eight, four at a time."""
    import os

    import netns
    from conftest import client_home, require, small_disk

    require(netns.available(), "cannot create network namespaces here (needs root, iproute2)")
    hosts = [netns.NetnsHost(tmp_path / f"ns{i}", 10 + (os.getpid() + 1 + i) % 240)
             for i in range(8)]
    with small_disk(tmp_path / "small-disk", "320k", "the canary's disk") as small:
        try:
            for host in hosts:
                (tmp_path / f"ns{host.k}").mkdir(exist_ok=True)
                host.start()
            client_home(tmp_path, monkeypatch, "\n".join(h.known_hosts_line() for h in hosts))
            remote = [tmp_path / f"remote{i}" for i in range(8)]
            fleet = [ssh_device(h, h.sshd.client_key, remote_dir=str(d))
                     for h, d in zip(hosts, remote)]
            bad_canary = ssh_device(hosts[0], hosts[0].sshd.client_key, remote_dir=str(small))
            bundle = bundle_of(models, 0.0)
            rows = deploy(bundle.path, "digits", [bad_canary, *fleet[1:]], canary=1, parallel=4)
            assert not rows[0].ok and rows[0].canary and "no space left" in rows[0].reasons[0], \
                rows[0]
            assert all(not r.ok and "canary" in r.reasons[0] for r in rows[1:]), rows
            assert not any((d / "models").exists() for d in remote)
            t0 = time.monotonic()
            rows = deploy(bundle.path, "digits", fleet, canary=1, parallel=4)
            assert all(r.ok and r.activated and r.version == 1 for r in rows), rows
            assert all(device_store.pointer("digits", d / "models")["version"] == 1 for d in remote)
            again = deploy(bundle.path, "digits", fleet, parallel=8)       # re-run: nothing to do
            assert all(r.ok and not r.activated and "already active" in r.note for r in again)
            print(f"8 devices: {time.monotonic() - t0:.1f} s")
        finally:
            for host in hosts:
                host.stop()


@pytest.mark.ssh
@pytest.mark.netns
def test_a_link_dark_during_the_check_leaves_one_whole_version_and_a_rerun_finishes(
        netns_home, netns_host, models):
    """The link to the device goes dark (packets dropped, nothing closed) while the device checks
    version 2, so the host cannot tell the device anything: the host reports the lost link within
    the stall bound; the device serves version 1 or 2, each whole (verified); the same deploy
    again ends with version 2 active."""
    import netns
    from device_runtime.bundle import verify

    netns.need("nft", "nftables")

    def dev():
        return ssh_device(netns_host, netns_host.sshd.client_key, stall_timeout_s=3,
                          connect_timeout_s=4)

    assert deploy(bundle_of(models, 0.0).path, "digits", [dev()])[0].activated
    second = bundle_of(models, 0.001)
    store = f"{dev().root()}/models"

    def go_dark(text: str) -> None:
        if "checking" in text:
            netns_host.drop_ssh()

    with netns_host.sshd.new_sessions():      # the device side left running is killed on exit
        t0 = time.monotonic()
        try:
            [row] = deploy(second.path, "digits", [dev()], say=go_dark)
        finally:
            netns_host.restore()
        took = time.monotonic() - t0
    assert not row.ok and "lost" in row.reasons[0] and "\n" not in row.reasons[0], row
    assert took < 30, took
    print(f"lost after {took:.1f} s: {row.reasons[0]}; device serves {device_store.pointer('digits', store)['version']}")
    active = device_store.pointer("digits", store)["version"]
    assert active in (1, 2)
    verify(device_store.version_dir("digits", active, store))
    [again] = deploy(second.path, "digits", [dev()])
    assert again.ok and again.version == 2 and (again.activated or "already active" in again.note)
    assert device_store.pointer("digits", store)["version"] == 2


def test_an_app_killed_during_a_swap_restarts_on_the_active_version(models, tmp_path):
    """SIGKILL of the application while it loads the new version beside the old: the store is
    only read by the app, so nothing is half-done; the restarted app serves the active version."""
    import signal

    store = tmp_path / "store"
    local = get_device("local")
    deploy(bundle_of(models, 0.0).path, "digits", [local], store=str(store))
    proc, stop = start_app(tmp_path, models, store)
    try:
        assert wait_for(lambda: (store / "digits" / "telemetry").is_dir())
        deploy(bundle_of(models, 0.001).path, "digits", [local], store=str(store))
        time.sleep(0.06)                       # the app's poll (50 ms) sees the move: loading
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert device_store.pointer("digits", store)["version"] == 2
    proc, _ = start_app(tmp_path, models, store, seconds=2)
    app = json.loads(proc.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert app["failures"] == [] and app["seen"][0][0] == 2, app
