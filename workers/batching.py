"""The batching core: pure, no broker I/O, testable with fake runners.

``plan`` picks which buffered requests go into the next batch; ``execute``
runs a batch of jobs through a runner and returns one outcome per job, never
letting one bad job take the others down:

* an input that fails preprocessing fails its job only;
* a batch whose forward pass raises is split in halves until the job (or
  jobs) that raise are alone; each of those fails with its error;
* a ``TransientError`` marks every job in the failing group for retry.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from celeryconfig import PRIORITIES
from models.exceptions import InvalidInput, TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")


def plan(requests: Sequence[T], max_size: int, priority: Callable[[T], int],
         weight: Callable[[T], int] = lambda r: 1) -> tuple[list[T], list[T]]:
    """Split buffered requests into (next batch, leftovers): most urgent first,
    arrival order kept within a priority, at most ``max_size`` inputs in all
    (``weight`` is a request's input count; one request is always taken).

    >>> plan([("a", 5), ("b", 0), ("c", 5)], 2, priority=lambda r: r[1])
    ([('b', 0), ('a', 5)], [('c', 5)])
    >>> plan([("big", 0, 300), ("x", 0, 1)], 64, priority=lambda r: r[1], weight=lambda r: r[2])
    ([('big', 0, 300)], [('x', 0, 1)])
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    ordered = sorted(requests, key=priority)  # sorted() is stable
    total, cut = 0, 0
    for request in ordered:
        size = max(1, weight(request))
        if cut and total + size > max_size:
            break
        total += size
        cut += 1
    return ordered[:cut], ordered[cut:]


@dataclass
class Job:
    """One job in a batch: its id and its input items (a single input is a list of one)."""

    id: str
    items: list[Any]
    single: bool = True


@dataclass
class Outcome:
    """What happened to one job: ``succeeded`` (result), ``failed`` (error) or ``retry``."""

    job_id: str
    status: str
    result: Any = None
    error: dict[str, str] | None = None
    prepared: list[Any] = field(default_factory=list, repr=False)


def error_dict(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__}


def execute(runner, jobs: list[Job], max_items: int) -> list[Outcome]:
    """Run ``jobs`` through ``runner`` (preprocess/run), at most ``max_items`` per forward pass."""
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    outcomes: dict[str, Outcome] = {}
    ready: list[Outcome] = []
    for job in jobs:
        try:
            if not job.items:
                raise InvalidInput("no inputs")
            prepared = [runner.preprocess(item) for item in job.items]
        except TransientError as exc:
            outcomes[job.id] = Outcome(job.id, "retry", error=error_dict(exc))
        except Exception as exc:
            outcomes[job.id] = Outcome(job.id, "failed", error=error_dict(exc))
        else:
            outcome = Outcome(job.id, "succeeded", prepared=prepared)
            outcomes[job.id] = outcome
            ready.append(outcome)
    singles = {job.id: job.single for job in jobs}
    _run_group(runner, ready, max_items, singles)
    for outcome in outcomes.values():
        outcome.prepared = []
    return [outcomes[job.id] for job in jobs]


def _forward(runner, prepared: list[Any], max_items: int) -> list[Any]:
    results: list[Any] = []
    for start in range(0, len(prepared), max_items):
        chunk = prepared[start:start + max_items]
        out = runner.run(chunk)
        if len(out) != len(chunk):
            raise RuntimeError(f"runner returned {len(out)} results for {len(chunk)} inputs")
        results.extend(out)
    return results


def _run_group(runner, group: list[Outcome], max_items: int, singles: dict[str, bool]) -> None:
    if not group:
        return
    flat = [item for outcome in group for item in outcome.prepared]
    try:
        results = _forward(runner, flat, max_items)
    except TransientError as exc:
        for outcome in group:
            outcome.status, outcome.error = "retry", error_dict(exc)
        return
    except Exception as exc:
        if len(group) == 1:
            log.warning("job %s failed alone: %s\n%s", group[0].job_id, exc, traceback.format_exc())
            group[0].status, group[0].error = "failed", error_dict(exc)
            return
        mid = len(group) // 2
        _run_group(runner, group[:mid], max_items, singles)
        _run_group(runner, group[mid:], max_items, singles)
        return
    pos = 0
    for outcome in group:
        n = len(outcome.prepared)
        chunk = results[pos:pos + n]
        pos += n
        outcome.result = chunk[0] if singles[outcome.job_id] else chunk


class BatchStats:
    """A worker's batching figures, as ``celery inspect batching`` shows them: batches run, mean
    batch size, items/s over the last ``window_s`` seconds (and per second of model time), model
    time per batch p50/p95 (over the last ``keep`` batches)."""

    def __init__(self, window_s: float = 60.0, keep: int = 1000):
        from collections import deque

        self.window_s = window_s
        self.batches = self.jobs = self.inputs = 0
        self._recent: deque = deque(maxlen=keep)  # (monotonic time, inputs, run_ms)

    def record(self, jobs: int, inputs: int, run_ms: float, now: float) -> None:
        if not jobs:
            return
        self.batches += 1
        self.jobs += jobs
        self.inputs += inputs
        self._recent.append((now, inputs, run_ms))

    def summary(self, now: float) -> dict[str, Any]:
        """
        >>> s = BatchStats(window_s=10)
        >>> s.record(4, 8, 20.0, now=100.0); s.record(2, 2, 10.0, now=105.0); s.record(0, 0, 0, now=106)
        >>> s.summary(now=110.0)["mean_batch_size"], s.summary(now=110.0)["items_per_s"]
        (3.0, 1.0)
        >>> s.summary(now=110.0)["items_per_busy_s"]  # 10 items in 30 ms of model time
        333.33
        """
        recent = [r for r in self._recent if now - r[0] <= self.window_s]
        times = sorted(r[2] for r in self._recent)

        def pct(q: float) -> float | None:
            return round(times[min(len(times) - 1, int(q * len(times)))], 2) if times else None

        return {
            "batches": self.batches, "jobs": self.jobs, "inputs": self.inputs,
            "mean_batch_size": round(self.jobs / self.batches, 2) if self.batches else None,
            "mean_inputs_per_batch": round(self.inputs / self.batches, 2) if self.batches else None,
            "items_per_s": round(sum(r[1] for r in recent) / self.window_s, 2),
            # the rate while the model runs: what the worker could sustain with a backlog
            "items_per_busy_s": (round(sum(r[1] for r in recent) / (sum(r[2] for r in recent) / 1000), 2)
                                 if recent and sum(r[2] for r in recent) > 0 else None),
            "window_s": self.window_s,
            "inference_ms_p50": pct(0.5), "inference_ms_p95": pct(0.95),
        }


class AdaptiveBatcher:
    """Learns what a batch costs this worker at each size, and picks batch sizes from it.

    The cost is a batch's whole cycle per input, kept per size bucket (1, 2, 4, ... up to
    ``max_size``) as a moving average. A batch counts for the size it is within ``NEAR`` of (62
    inputs: 64's); one between sizes counts for none (a burst's tail of 40 to 60 inputs, counted
    as 32's, would make 32 look as cheap per input as those larger batches are). With a backlog
    (the batch was handed over as the one before it returned) the cycle runs from that return to this batch's: the acks, the planning and hand-off,
    the pool's claim, model and store, the result's way back, and whatever Redis and the machine
    make them wait. The pool's own time misses the part outside it, and that part is per batch: on
    the benchmark's machine it made batches of 32 cost MiniLM 7 to 8% more per input than batches
    of 64, although the pool ran 32 faster. A batch started on an idle pool has no cycle to time; it
    counts as the pool's time plus ``gap``, the moving average of that outside part (``GAP_S`` until
    a backlog has shown it). A linear fit of batch time against size (BentoML's model) cannot say
    that a CNN runs slower per image at 32 than at 8 on a CPU; buckets can, and there are only
    log2(max_size) of them to learn.

    * ``target(available)``: with a backlog, the next batch takes the best-measured bucket's size.
      Buckets with fewer than ``MIN_SAMPLES`` batches are tried first (smallest first, and none
      above a size that costs more per input than a smaller one), and every
      ``EXPLORE_EVERY`` batches a neighbour of the best is tried again, so the choice follows
      drift (other inputs, another process on the machine).
    * ``should_wait(buffered)``: with a process free, run what is buffered now unless jobs arrive
      faster than batches of that size could serve them; then wait for more (the caller bounds the
      wait by ``max_wait_ms``). At idle it never waits.
    * High-priority jobs bound the batch: for ``URGENT_FOR_S`` after one arrives, no batch is planned
      to take longer than ``URGENT_FACTOR`` times a batch of one, and nothing waits. A high job then
      waits for at most one short batch, not a long one; the other jobs take the queueing.

    >>> b = AdaptiveBatcher(max_size=8)
    >>> b.sizes
    [1, 2, 4, 8]
    >>> for size, ms in [(1, 10), (2, 12), (4, 16), (8, 40)] * 3:  # 8 costs more per input than 4
    ...     b.record(size, ms / 1000, cycle=(ms + 2) / 1000)
    >>> b.best(), b.target(available=100), round(b.gap * 1000, 3)
    (4, 4, 2.0)
    >>> b.should_wait(1, now=0.0)  # no arrivals seen: run now
    False
    """

    MIN_SAMPLES = 3
    #: A batch of ``n`` inputs shows the cost of a size ``s`` with ``|n - s| <= NEAR * s``.
    NEAR = 0.125
    #: Sizes within this of the cheapest cost per input are tied, and the largest of them is taken.
    #: MiniLM's batches of 32 timed 2.25 ms a text in the pool and about 2.36 over the cycle, against
    #: 2.34 and 2.40 for 64, yet fixed 32 ran 5 to 10% fewer texts a second in the system than fixed
    #: 64 (runs M, N and O). What the timers miss I have not found; bigger batches pay it less.
    TIE = 0.05
    EXPLORE_EVERY = 25
    ALPHA = 0.2
    URGENT_PRIORITY = PRIORITIES["high"]
    URGENT_FOR_S = 2.0
    URGENT_FACTOR = 1.5
    #: What a batch costs outside the pool until a backlog has timed it (``gap``): the worker's main
    #: process, on the model's core, spent about 2 ms a batch on it in minilm backlog drains here.
    GAP_S = 0.002

    def __init__(self, max_size: int, processes: int = 1):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.processes = max(1, processes)
        self.sizes = sorted({2 ** i for i in range(max_size.bit_length()) if 2 ** i <= max_size} | {max_size})
        self.cost: dict[int, float] = {}  # bucket -> seconds per input (moving average)
        self.samples: dict[int, int] = {s: 0 for s in self.sizes}
        self.batches = 0
        self.gap = self.GAP_S  # seconds a batch costs outside the pool (moving average, backlog cycles)
        self._arrival_gap: float | None = None  # moving average of seconds between arrivals
        self._last: float | None = None
        self._explore_up = True
        self._urgent_until = float("-inf")
        #: What was learnt of sizes above a lowered limit, (cost, samples) by size: back when it rises.
        self._kept: dict[int, tuple[float, int]] = {}

    def resized(self, max_size: int, processes: int | None = None) -> "AdaptiveBatcher":
        """A batcher for a new ``max_size`` that keeps what this one learnt of every size (a size's
        cost does not depend on the limit; sizes the new limit excludes come back when it is raised
        again, so that switching to a small fixed limit and back does not relearn them), its
        arrival rate and its urgency."""
        other = AdaptiveBatcher(max_size, self.processes if processes is None else processes)
        learnt = {**self._kept, **{s: (c, self.samples[s]) for s, c in self.cost.items()}}
        for size, (cost, samples) in learnt.items():
            if size in other.samples:
                other.cost[size], other.samples[size] = cost, samples
            else:
                other._kept[size] = (cost, samples)
        other.batches = sum(other.samples.values())
        other.gap = self.gap
        other._arrival_gap, other._last, other._urgent_until = self._arrival_gap, self._last, self._urgent_until
        return other

    def bucket(self, inputs: int) -> int:
        """The largest bucket size that ``inputs`` fills."""
        return max(s for s in self.sizes if s <= max(1, inputs))

    def shows(self, inputs: int) -> int | None:
        """The size whose cost a batch of ``inputs`` inputs shows: one it is within ``NEAR`` of.

        >>> b = AdaptiveBatcher(max_size=64)
        >>> b.shows(64), b.shows(62), b.shows(30), b.shows(3), b.shows(48), b.shows(300)
        (64, 64, 32, None, None, None)
        """
        near = [s for s in self.sizes if abs(inputs - s) <= self.NEAR * s]
        return min(near, key=lambda s: abs(inputs - s)) if near else None

    def record(self, inputs: int, seconds: float, cycle: float | None = None) -> None:
        """One batch of ``inputs`` inputs took the pool ``seconds``; with a backlog, ``cycle``
        seconds passed from the return of the batch before it to its own."""
        if inputs < 1 or seconds <= 0:
            return
        if cycle is not None and cycle >= seconds:
            self.gap += self.ALPHA * (cycle - seconds - self.gap)
        else:  # started on an idle pool (or a clock that went back): the pool's time and the usual gap
            cycle = seconds + self.gap
        self.batches += 1
        b = self.shows(inputs)
        if b is None:  # between sizes: its gap counts, its cost per input belongs to no size
            return
        per = cycle / inputs
        n = self.samples[b]
        if n < self.MIN_SAMPLES:  # the mean of the first few, then a moving average
            self.cost[b] = per if n == 0 else (self.cost[b] * n + per) / (n + 1)
        else:
            self.cost[b] = (1 - self.ALPHA) * self.cost[b] + self.ALPHA * per
        self.samples[b] += 1

    def per_input(self, size: int) -> float | None:
        """Seconds per input in batches of ``size`` (a bucket), over the whole cycle."""
        return self.cost.get(size)

    def best(self) -> int:
        """The size to take with a backlog: the largest whose cost per input is within ``TIE`` of
        the cheapest measured size's."""
        known = [s for s in self.cost if self.samples[s] >= self.MIN_SAMPLES]
        if not known:
            return self.max_size
        cheapest = min(map(self.per_input, known))
        return max(s for s in known if self.per_input(s) <= (1 + self.TIE) * cheapest)

    def _explored_up_to(self) -> int:
        """The largest size worth learning at start: sizes above one that costs more per input
        than a smaller size are skipped (the cost per input falls, then rises; it does not fall again)."""
        cheapest = None
        for size in self.sizes:
            if self.samples[size] < self.MIN_SAMPLES:
                return self.max_size
            cost = self.cost[size]
            if cheapest is not None and cost > 1.1 * cheapest:
                return size
            cheapest = cost if cheapest is None else min(cheapest, cost)
        return self.max_size

    def urgent(self, now: float) -> bool:
        """A high-priority job arrived lately."""
        return now < self._urgent_until

    def urgent_cap(self) -> int:
        """The largest size whose batch takes at most ``URGENT_FACTOR`` times a batch of one."""
        if 1 not in self.cost:
            return 1
        budget = self.URGENT_FACTOR * self.cost[1]
        fits = [s for s, c in self.cost.items() if s * c <= budget and self.samples[s] >= 1]
        return max(fits, default=1)

    def target(self, available: int, now: float | None = None) -> int:
        """How many inputs the next batch may take, ``available`` being buffered."""
        size = self._target(available)
        if now is not None and self.urgent(now):
            return min(size, self.urgent_cap())
        return size

    def _target(self, available: int) -> int:
        ceiling = self._explored_up_to()
        for size in self.sizes:  # learn each size the backlog can fill, smallest first
            if size > ceiling or size > available:
                break
            if self.samples[size] < self.MIN_SAMPLES:
                return size
        best = self.best()
        if self.batches and self.batches % self.EXPLORE_EVERY == 0:
            i = self.sizes.index(best)
            self._explore_up = not self._explore_up
            j = i + 1 if self._explore_up else i - 1
            if 0 <= j < len(self.sizes) and self.sizes[j] <= available:
                return self.sizes[j]
        return best

    def arrived(self, now: float, priority: int | None = None, count: int = 1) -> None:
        """``count`` jobs arrived at ``now`` (several: one bulk fetch; their gaps are spread evenly
        over the time since the last arrival), the most urgent of ``priority``."""
        if priority is not None and priority <= self.URGENT_PRIORITY:
            self._urgent_until = now + self.URGENT_FOR_S
        if self._last is not None:
            count = max(1, count)
            gap = max(0.0, now - self._last) / count
            self._arrival_gap = gap if self._arrival_gap is None else gap + (self._arrival_gap - gap) * 0.9 ** count
        self._last = now

    def arrival_rate(self, now: float) -> float:
        """Jobs per second lately (0 when none came for a while)."""
        if self._arrival_gap is None or self._last is None:
            return 0.0
        gap = max(self._arrival_gap, now - self._last)  # a quiet spell counts at once
        return 1.0 / gap if gap > 0 else float("inf")

    def should_wait(self, buffered: int, now: float) -> bool:
        """A process is free and ``buffered`` inputs are ready: wait for more?"""
        if buffered >= min(self.best(), self.max_size) or self.urgent(now):
            return False
        per_input = self.per_input(self.bucket(buffered))
        if per_input is None:
            return False
        # batches of this size serve processes / per_input inputs per second; arrivals outpace that?
        return self.arrival_rate(now) * per_input > self.processes

    def summary(self) -> dict[str, Any]:
        return {"target_batch": self.best(), "urgent_cap": self.urgent_cap(), "gap_ms": round(self.gap * 1000, 3),
                "ms_per_input_by_batch": {s: round(c * 1000, 3) for s, c in sorted(self.cost.items())},
                "batches_by_size": {s: n for s, n in self.samples.items() if n}}
