"""The urgent lane simulated: a batching queue on the limit run's batch times.

At twice our rate, the share of ``high`` jobs decides whether their p95 can stay within 2× the idle
p95 at all: the worker's lane runs one ``high`` batch at a time, and ``high`` jobs that arrive meanwhile
wait for it. :func:`simulate_lane` simulates that lane: Poisson arrivals, every ``high`` job waiting
taken as one batch as soon as the last one ends, the batch taking the limit run's time for its size,
nothing else on the core and no time outside the model. A measured p95 also holds the submit, the
fetch, the claim and the store, and a model slowed by what runs beside it; but the limit run is
measured minutes earlier, and this machine's speed drifts by 10% or more in that time, so the
simulation is a reference for the queueing alone, not a bound on what was measured.
"""

from __future__ import annotations

import bisect
import random
from typing import Callable


def batch_seconds(items_per_s_by_batch: dict) -> Callable[[int], float]:
    """Seconds a batch of ``k`` takes, linear between the measured sizes (per item at the largest
    beyond it)."""
    rates = {int(k): float(v) for k, v in items_per_s_by_batch.items()}  # (JSON keys are strings)
    sizes = sorted(rates)
    times = [size / rates[size] for size in sizes]

    def seconds(k: int) -> float:
        if k <= sizes[0]:
            return times[0]
        if k >= sizes[-1]:
            return times[-1] * k / sizes[-1]
        i = bisect.bisect_left(sizes, k)
        lo, hi = sizes[i - 1], sizes[i]
        return times[i - 1] + (times[i] - times[i - 1]) * (k - lo) / (hi - lo)

    return seconds


def simulate_lane(items_per_s_by_batch: dict, jobs_per_s: float, max_batch: int,
                   jobs: int = 100_000, seed: int = 1) -> dict:
    """A ``high`` job's time from reaching the worker to its batch's end, in ms (p50, p95, mean), and
    how busy the lane was, for Poisson arrivals at ``jobs_per_s`` (one input each)."""
    if jobs_per_s <= 0 or max_batch < 1:
        raise ValueError("jobs_per_s must be > 0 and max_batch >= 1")
    seconds = batch_seconds(items_per_s_by_batch)
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(jobs):
        t += rng.expovariate(jobs_per_s)
        arrivals.append(t)
    times, busy, free, i = [], 0.0, 0.0, 0
    while i < jobs:
        start = max(free, arrivals[i])
        end_of_batch = min(bisect.bisect_right(arrivals, start, i), i + max_batch)
        took = seconds(end_of_batch - i)
        times.extend(start + took - a for a in arrivals[i:end_of_batch])
        busy += took
        free, i = start + took, end_of_batch
    times.sort()
    return {"p50_ms": round(1000 * times[len(times) // 2], 2), "p95_ms": round(1000 * times[int(len(times) * 0.95)], 2),
            "mean_ms": round(1000 * sum(times) / len(times), 3), "busy": round(busy / free, 3)}


def largest_share(items_per_s_by_batch: dict, jobs_per_s: float, bound_ms: float, max_batch: int,
                  step: float = 0.005) -> float:
    """The largest share of ``jobs_per_s`` (to ``step``) that, sent as ``high`` jobs, keeps the
    simulated lane's p95 within ``bound_ms``: an upper limit on the shares for which any worker with
    this model on these cores can meet the bound, since a real one adds the submit, the fetch, the
    claim and the store. 0.0 when even the smallest share does not.

    >>> largest_share({1: 100.0, 2: 150.0}, 100.0, bound_ms=20.0, max_batch=2)  # one job alone: 10 ms
    0.355
    >>> largest_share({1: 100.0}, 100.0, bound_ms=9.0, max_batch=1)  # a batch of one takes longer
    0.0
    """
    if jobs_per_s <= 0 or bound_ms <= 0 or not 0 < step < 1:
        raise ValueError("jobs_per_s and bound_ms must be > 0, and step between 0 and 1")

    def within(share: float) -> bool:
        return simulate_lane(items_per_s_by_batch, jobs_per_s * share, max_batch, jobs=20_000)["p95_ms"] <= bound_ms

    lo, hi = 0, int(round(1 / step)) - 1  # in steps: lo is within (0: none is), above hi is not
    while lo < hi:  # the simulated p95 grows with the share: bisect for the last step within
        mid = (lo + hi + 1) // 2
        if within(mid * step):
            lo = mid
        else:
            hi = mid - 1
    return round(lo * step, 6)
