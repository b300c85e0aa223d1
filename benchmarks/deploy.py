"""Deploy speed over SSH, against OpenSSH on loopback, measured in one run.

    python benchmarks/deploy.py

Starts its own sshd on 127.0.0.1 (like the tests). Prints: push of a ~15 MB bundle vs `sftp put`
of the same bytes (goal >= 0.8x its throughput), a cached re-push (goal <= 0.5 s), and a whole
profile over SSH vs the local device (the overhead of the link and the stages).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def big_model(path: Path, mb: float = 15.0) -> None:
    n = int(mb * 1e6 / 4 / 1024)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((1024, n))
                                .astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def main() -> None:
    from sshd import Sshd

    work = Path(tempfile.mkdtemp(prefix="edgesmith-deploy-"))
    os.environ["EDGESMITH_CACHE"] = str(work / "cache")
    home = work / "home"
    (home / ".ssh").mkdir(parents=True)
    server = Sshd(work / "sshd")
    server.start()
    try:
        (home / ".ssh" / "known_hosts").write_text(server.known_hosts_line() + "\n")
        os.environ["HOME"] = str(home)
        from edgesmith.devices import Job
        from edgesmith.devices.ssh import SSHDevice
        from edgesmith.model import load
        from edgesmith.measure import measure
        from edgesmith.profiling import prepare

        model_path = work / "big.onnx"
        big_model(model_path)
        bundle = prepare(load(model_path), None)
        size = sum(p.stat().st_size for p in bundle.path.iterdir())

        def dev(remote: str) -> SSHDevice:
            return SSHDevice.from_destination(server.destination, python=sys.executable,
                                              identity=str(server.client_key), remote_dir=remote)

        ours, sftp = [], []
        sftp_cmd = ["sftp", "-q", "-b", "-", "-i", str(server.client_key), "-P", str(server.port),
                    "-o", f"UserKnownHostsFile={home / '.ssh' / 'known_hosts'}",
                    "-o", "BatchMode=yes", f"{server.user}@127.0.0.1"]
        for i in range(3):
            d = dev(str(work / f"remote{i}"))
            d.ensure_runtime()                      # connect + runtime once, outside the timing
            t0 = time.perf_counter()
            d.push(bundle)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run(sftp_cmd, input=f"put {bundle.path / 'model.onnx'} "
                           f"{work / f'sftp{i}.onnx'}\n", text=True, check=True, timeout=300)
            sftp.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            d.push(bundle)
            cached = time.perf_counter() - t0
            d.close()
        mb = size / 1e6
        o, s = statistics.median(ours), statistics.median(sftp)
        print(f"bundle {mb:.1f} MB; medians of 3 (sftp includes its own connect + auth)")
        print(f"edgesmith push (tar over SSH, verified on device, renamed)  {o:.3f} s  "
              f"{mb / o:6.1f} MB/s")
        print(f"OpenSSH sftp put                                           {s:.3f} s  "
              f"{mb / s:6.1f} MB/s")
        print(f"throughput ratio (ours / sftp) {s / o:.2f}   goal >= 0.8")
        print(f"cached re-push {cached:.3f} s   goal <= 0.5 s")

        cnn = ROOT / "examples/models/digits_cnn.onnx"
        small = prepare(load(cnn), ROOT / "examples/models/digits_cnn_eval.npz")
        from edgesmith.devices import get_device
        job = Job(runs=50, warmup=5, threads=1)
        d = dev(str(work / "remote-profile"))
        measure(d, small, job)                     # runtime + bundle on the device already
        rows = {"ssh": [], "local": []}
        for _ in range(3):
            for name, device in (("ssh", d), ("local", get_device("local"))):
                t0 = time.perf_counter()
                r = measure(device, small, job)
                rows[name].append((time.perf_counter() - t0, r.latency_ms["p50"]))
        for name, vals in rows.items():
            print(f"profile via {name:<5}: wall {statistics.median(v[0] for v in vals):.3f} s, "
                  f"p50 {statistics.median(v[1] for v in vals):.4f} ms")
        ratio = statistics.median(v[0] for v in rows["ssh"]) / \
            statistics.median(v[0] for v in rows["local"])
        print(f"profile wall-time ratio (ssh / local) {ratio:.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
