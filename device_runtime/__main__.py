"""python3 -m device_runtime {run,facts,verify,deploy,rollback,status}: one JSON object on
stdout.

Progress goes to stderr; an expected failure is a Result with `error` and `stage` and exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import RuntimeFailure
from .result import Result
from .store import device_lock


def session_overrides(args) -> dict:
    """The runtime config a timing command's options set over the bundle's own."""
    overrides = json.loads(args.config) if args.config else {}
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.profile_ops:
        overrides["profile_ops"] = True
    return overrides


def run_job(args) -> Result:
    from . import facts
    from .measure import cpu_ticks, device_load, peak_rss_mb, time_runs, wait_idle
    from .session import Session

    result = Result(device=facts.collect(with_providers=False))
    stage = "load"      # verify's own failures say "verify"; a bad config is the load's
    lock = None
    try:
        if args.lock:
            t0 = time.perf_counter()
            lock = device_lock(args.lock, args.lock_timeout)
            result.stages_ms["lock_wait"] = (time.perf_counter() - t0) * 1e3
            result.window_s = [time.time(), None]
        t0 = time.perf_counter()
        session = Session.open(args.bundle, **session_overrides(args))
        result.stages_ms["verify+load"] = (time.perf_counter() - t0) * 1e3
        manifest = session.manifest
        result.bundle_sha256, result.backend, result.meta = (session.bundle_id, manifest.backend,
                                                             manifest.meta)
        result.config, result.load_ms = session.config, session.load_ms
        result.versions = session.versions
        if manifest.eval and not args.no_eval:
            stage = "eval"
            from .evaluate import load_eval, metrics, predict
            t0 = time.perf_counter()
            data = load_eval(session.root / manifest.eval, session.inputs, state=manifest.state)
            result.accuracy = metrics(predict(session, data, manifest.eval_batch), data)
            result.stages_ms["eval"] = (time.perf_counter() - t0) * 1e3
        stage = "measure"
        feed = session.check_feed(session.example_feed())
        run = session.backend.run  # the backend directly: no per-call checks in the timed loop
        waited = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
        print(f"measuring: {args.warmup} warm-up, {args.runs} runs", file=sys.stderr, flush=True)
        t0, ticks = time.perf_counter(), cpu_ticks()
        result.latency_ms = time_runs(lambda: run(feed), args.warmup, args.runs, args.min_time,
                                      args.max_time)
        result.stages_ms["measure"] = (time.perf_counter() - t0) * 1e3
        result.load = device_load(ticks, cpu_ticks())
        if waited is not None:
            result.stages_ms["idle_wait"] = waited[0] * 1e3
            result.load = {**(result.load or {}), "share_when_waited": waited[1]}
        if args.profile_ops:
            result.op_profile_ms, result.node_profile_ms = session.backend.op_profile()
        # after runs: some LiteRT builds apply their default delegate at the first invoke
        result.delegation = getattr(session.backend, "delegation", lambda: None)()
        result.peak_rss_mb = peak_rss_mb()
    except RuntimeFailure as exc:
        result.error, result.stage, result.skew = exc.message, exc.stage, exc.details
    except (ValueError, TypeError) as exc:  # bad job arguments or data the checks missed
        result.error, result.stage = f"{type(exc).__name__}: {exc}", stage
    except MemoryError:
        result.error, result.stage = "out of memory on the device", stage
    finally:
        if lock is not None:
            result.window_s[1] = time.time()
            lock.close()
    return result


def compare_jobs(args) -> dict:
    """Several bundles timed in one process, in rotating order each round (none always first
    or last): no process start or session load between them, and every round's device noise
    falls on all of them alike. {"p50_ms": {bundle: [p50 per round]}, "errors", "load"}."""
    from . import facts
    from .measure import cpu_ticks, device_load, time_runs, wait_idle
    from .session import Session

    out = {"ok": True, "device": facts.collect(with_providers=False), "p50_ms": {}, "errors": {}}
    overrides = session_overrides(args)
    lock = device_lock(args.lock, args.lock_timeout) if args.lock else None
    try:
        ready = {}
        for path in args.bundles:
            try:
                session = Session.open(path, **overrides)
                ready[path] = (session.backend.run, session.check_feed(session.example_feed()))
            except RuntimeFailure as exc:
                out["errors"][path] = f"{exc.stage}: {exc.message}"
        if args.wait_idle > 0:
            wait_idle(args.wait_idle)
        ticks, names = cpu_ticks(), list(ready)
        for i in range(args.rounds):
            for path in names[i % max(1, len(names)):] + names[:i % max(1, len(names))]:
                run, feed = ready[path]
                if path not in out["errors"]:
                    try:
                        out["p50_ms"].setdefault(path, []).append(time_runs(
                            lambda: run(feed), args.warmup, args.runs, args.min_time,
                            args.max_time)["p50"])
                    except Exception as exc:  # noqa: BLE001 - the model's own failure
                        out["errors"][path] = f"run: {str(exc).strip()[:300]}"
        out["load"] = device_load(ticks, cpu_ticks())
    finally:
        if lock is not None:
            lock.close()
    return out


def hold_lease(seconds: float) -> None:
    """The host writes to stdin every second while it waits for this run. When nothing comes
    for `seconds` (a dark link the host gave up on) or stdin ends (the host closed the
    channel), the process ends at once, exit 75: an orphaned run held the device lock, and a
    core, until its max time (the next run waited 95 s). The lock goes with the process."""
    import os
    import threading

    last = [time.monotonic()]

    def read() -> None:
        while os.read(0, 64):
            last[0] = time.monotonic()
        os._exit(75)

    def watch() -> None:
        while time.monotonic() - last[0] < seconds:
            time.sleep(0.2)
        os._exit(75)

    for job in (read, watch):
        threading.Thread(target=job, daemon=True, name=f"lease-{job.__name__}").start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m device_runtime",
                                     description="Verify, run and measure an edgesmith bundle.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="verify, evaluate and time a bundle; print a Result")
    run.add_argument("bundle")
    compare = sub.add_parser("compare", help="time bundles in rotating rounds in one process")
    compare.add_argument("bundles", nargs="+")
    compare.add_argument("--rounds", type=int, default=3)
    for p in (run, compare):
        p.add_argument("--json", action="store_true", help="print the Result as JSON (default)")
        p.add_argument("--runs", type=int, default=100)
        p.add_argument("--warmup", type=int, default=10)
        p.add_argument("--min-time", type=float, default=0.0, help="seconds of timed runs at least")
        p.add_argument("--max-time", type=float, default=120.0, help="stop timing after this")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--config", default=None, help="JSON object overriding the runtime config")
        p.add_argument("--no-eval", action="store_true")
        p.add_argument("--profile-ops", action="store_true", help="time per op type and node")
        p.add_argument("--lock", help="flock this file while measuring (one benchmark at a time)")
        p.add_argument("--lock-timeout", type=float, default=600.0)
        p.add_argument("--wait-idle", type=float, default=0.0,
                       help="wait up to this many seconds for other processes to leave the cores")
        p.add_argument("--lease", type=float, default=0.0,
                       help="end when stdin is silent this many seconds (the host's heartbeat)")
    sub.add_parser("facts", help="print this device's fingerprint")
    for command, text in (("deploy", "install BUNDLE as a version of NAME, check it here, then "
                                     "make it active"),
                          ("rollback", "make NAME's previous version (or --to V) active"),
                          ("status", "every deployed NAME: versions, checks, field figures"),
                          ("samples", "merge NAME's captured field inputs into one .npz")):
        p = sub.add_parser(command, help=text)
        if command == "deploy":
            p.add_argument("bundle")
            p.add_argument("--lease", type=float, default=0.0,
                           help="end when stdin is silent this many seconds (the host's heartbeat)")
        p.add_argument("--name", required=command != "status")
        p.add_argument("--store", help="the model store (default $EDGESMITH_STORE or "
                                       "~/.edgesmith/models)")
        p.add_argument("--host", default="", help="who deployed (recorded)")
        p.add_argument("--keep", type=int, default=5, help="versions kept besides the active "
                                                           "and previous ones")
        p.add_argument("--to", type=int, help="rollback: this version")
        p.add_argument("--latency-tolerance", type=float, default=1.5,
                       help="the check's p50 may be this many times the chosen latency (0: "
                            "not compared)")
        p.add_argument("--capture", type=int, default=0, help="keep N field inputs as samples")
        p.add_argument("--bench-lock", help="the device's benchmark lock, held while timing")
        p.add_argument("--lock-timeout", type=float, default=600.0)
    verify = sub.add_parser("verify", help="check a bundle's hashes and paths")
    verify.add_argument("bundle")
    args = parser.parse_args(argv)

    if args.command == "facts":
        from . import facts
        print(json.dumps(facts.collect()))
        return 0
    if args.command in ("deploy", "rollback", "status", "samples"):
        from . import deploy
        if getattr(args, "lease", 0) > 0:  # a deploy's check times under the benchmark lock
            hold_lease(args.lease)
        try:
            out = deploy.deploy(args, run_job) if args.command == "deploy" else \
                getattr(deploy, args.command)(args)
        except RuntimeFailure as exc:
            print(json.dumps({"ok": False, "error": exc.message, "stage": exc.stage}))
            return 1
        print(json.dumps({"ok": out.get("passed", True), **out}))
        return 0 if out.get("passed", True) else 1
    if args.command == "verify":
        from .bundle import verify as verify_bundle
        try:
            _, bundle_id = verify_bundle(args.bundle)
        except RuntimeFailure as exc:
            print(json.dumps({"ok": False, "error": exc.message, "stage": exc.stage}))
            return 1
        print(json.dumps({"ok": True, "bundle_sha256": bundle_id}))
        return 0
    if args.lease > 0:
        hold_lease(args.lease)
    if args.command == "compare":
        try:
            print(json.dumps(compare_jobs(args)))
        except RuntimeFailure as exc:       # the lock not had in time
            print(json.dumps({"ok": False, "error": exc.message, "stage": exc.stage}))
            return 1
        return 0
    result = run_job(args)
    print(json.dumps(result.to_dict()))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
