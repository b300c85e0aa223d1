"""Latency (warm-up, then N runs and/or a minimum duration), and memory of this process."""
from __future__ import annotations

import os
import resource
import sys
import time


def percentile(sorted_samples: list[float], q: float) -> float:
    """Linear-interpolated percentile of pre-sorted samples (numpy's default method)."""
    if not sorted_samples:
        return float("nan")
    pos = (len(sorted_samples) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def summarize(samples_ms: list[float], warmup: int = 0) -> dict:
    """The statistics users compare: p50/p90/p99, mean, min, max, plus the raw samples."""
    s = sorted(samples_ms)
    return {"runs": len(s), "warmup": warmup,
            "p50": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99),
            "mean": sum(s) / len(s) if s else float("nan"),
            "min": s[0] if s else float("nan"), "max": s[-1] if s else float("nan"),
            "samples": list(samples_ms)}


def time_runs(run_once, warmup: int = 10, runs: int = 100, min_time_s: float = 0.0,
              max_time_s: float = 60.0) -> dict:
    """Warm up, then time at least `runs` calls and at least `min_time_s` seconds.

    Stops at `max_time_s` whatever the counts (bounded on a slow device); the result says how
    many runs it really made.
    """
    clock = time.perf_counter_ns
    deadline = time.monotonic() + max_time_s
    for _ in range(warmup):
        run_once()
        if time.monotonic() > deadline:
            break
    samples: list[float] = []
    append = samples.append
    start = time.monotonic()
    while len(samples) < runs or time.monotonic() - start < min_time_s:
        t0 = clock()
        run_once()
        append((clock() - t0) / 1e6)
        if time.monotonic() > deadline:
            break
    return summarize(samples, warmup)


def peak_rss_mb() -> float:
    """Peak resident memory of this process image. Linux: VmHWM, which starts afresh at exec;
    ru_maxrss does not, so a runtime started by a big host process would report the host's."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cpu_ticks():
    """(busy, total) seconds of all CPUs from /proc/stat and this process's CPU seconds, for
    `others_share`; None where /proc is not there."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz, t = os.sysconf("SC_CLK_TCK"), os.times()
    return (sum(fields) - fields[3] - fields[4]) / hz, sum(fields) / hz, t.user + t.system


BUSY_SHARE = 0.25   # other processes on more than this share of the cores: figures unreliable
MIN_LOAD_WINDOW_S = 0.2   # CPU seconds (all cores) a load sample needs: 20 ticks at 100 Hz


def wait_idle(limit_s: float, window_s: float = 0.5) -> tuple[float, float | None]:
    """Wait, at most `limit_s`, until other processes use no more than BUSY_SHARE of the cores
    over a `window_s` sample (as pyperf asks for a quiet machine): (seconds waited, their share
    in the last sample)."""
    t0, share = time.monotonic(), None
    while time.monotonic() - t0 < limit_s:
        before = cpu_ticks()
        time.sleep(window_s)
        load = device_load(before, cpu_ticks())
        share = None if load is None else load["others_share"]
        if share is None or share <= BUSY_SHARE:
            break
    return time.monotonic() - t0, share


def device_load(before, after) -> dict | None:
    """What else ran on the device while it measured: other processes' share of all its cores
    (their CPU time over wall time x cores), the 1-minute load average and the clock of CPU 0
    where Linux shows it. Pyperf and hyperfine warn of a busy machine; so does the host."""
    if before is None or after is None or after[1] - before[1] < MIN_LOAD_WINDOW_S:
        return None         # too few clock ticks to say: a 20 ms window reads 0 % or 50 %
    busy, total, own = (a - b for a, b in zip(after, before))
    load = {"others_share": round(max(0.0, min(1.0, (busy - own) / total)), 3),
            "loadavg_1m": os.getloadavg()[0]}
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq") as fh:
            load["cpu_mhz"] = int(fh.read()) / 1000
    except (OSError, ValueError):
        pass
    return load
