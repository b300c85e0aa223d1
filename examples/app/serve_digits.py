"""An edge application serving a model deployed with `edgesmith deploy OUT --name digits`.

It asks the device runtime for the model by name, not by path: a later `edgesmith deploy` or
`edgesmith rollback` is picked up between two calls, with no restart and no failed call, and
`edgesmith status digits` shows what it saw (calls, latency, input drift). Here the inputs are
the digits eval set in a loop; a real application reads its camera or sensor instead.

    PYTHONPATH=DIR_WITH_device_runtime python3 serve_digits.py --name digits --samples eval.npz
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

import numpy as np

import device_runtime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="digits", help="the name it was deployed under")
    parser.add_argument("--store", help="the model store (default ~/.edgesmith/models)")
    parser.add_argument("--samples", required=True, help=".npz with an `input` array")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between calls")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this (0: never)")
    args = parser.parse_args()

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))     # systemd's stop
    inputs = np.load(args.samples)["input"]
    served = device_runtime.serve(args.name, args.store)
    deadline = time.monotonic() + args.seconds if args.seconds else float("inf")
    calls, last = 0, None
    try:
        while not stop and time.monotonic() < deadline:
            x = inputs[calls % len(inputs)][None]
            scores = next(iter(served.run({"input": x}).values()))
            calls += 1
            if served.last_version != last:
                last = served.last_version
                print(f"serving {args.name} version {last}", flush=True)
            if calls % 100 == 0:
                print(f"{calls} calls; last prediction {int(scores.argmax())}", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        served.close()          # the field figures reach `edgesmith status` now
    print(f"stopped after {calls} calls", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
