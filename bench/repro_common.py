"""What the reproduction benchmarks share: phase timing with the machine's load beside it, and bootstrap intervals."""

from __future__ import annotations

import os
import time

LOADS: list[float] = []  # the 1-minute load average at each phase's end (reported with the results)


def load_note() -> str:
    load = os.getloadavg()
    LOADS.append(load[0])
    return " ".join(f"{x:.2f}" for x in load)


def timed(label: str, fn):
    t, cpu = time.perf_counter(), time.process_time()
    out = fn()
    print(f"[{label}] {time.perf_counter() - t:.1f} s wall, {time.process_time() - cpu:.1f} s CPU, load average "
          f"{load_note()}", flush=True)
    return out


def bootstrap_mean(x, n_boot: int, rng) -> tuple[float, float]:
    """Percentile 95 % interval of the mean of x over n_boot resamples (with replacement); NaNs when x is empty."""
    import numpy as np

    x = np.asarray(x, float)
    if not len(x):
        return float("nan"), float("nan")
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def finish(out, stamp: str, args, t_start: float, results: dict) -> None:
    """The closing lines every reproduction prints (wall time, load averages) and its result file."""
    import json

    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s wall; 1-min load average over the phases {min(LOADS):.2f}–{max(LOADS):.2f}; "
          f"end {time.strftime('%H:%M:%S', time.gmtime())} UTC; /proc/loadavg {open('/proc/loadavg').read().strip()}")
    res = out / f"result-{stamp}.json"
    res.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results,
                               "total_s": round(total, 1), "loads": LOADS}, indent=1))
    print(f"written {res}")
