"""make bench: the machine's limit, ours and naive Celery, side by side, per model.

    .venv/bin/python bench/bench.py [--quick] [--models minilm,efficientnet-lite0] [--out bench/results]

For each model, on this machine, in one run:
1. the limit: the model alone in one process, no queue, at each batch size up to max_batch_size
   (each size's median of three rounds; one in the quick mode); the best items/s. On the device a
   worker picks: CUDA when torch sees a GPU (the entry's ``device`` or ``DEVICE`` can say otherwise);
2. ours: Redis, the API (gunicorn) and one batching worker, driven over HTTP (submit, long-poll):
   after a warm-up burst (adaptive batching learns on it), items/s at saturation in five rounds,
   each beside a window of the limit's best batch size run alone again (the order swapped every
   other round; the quick mode runs one round, beside the ladder's figure): ``ours_vs_limit`` is
   the median of the rounds' ratios, ``limit_items_per_s`` and ``ours_items_per_s`` the medians of
   each side's rounds (the ladder's own figure is under ``limit``); then latency p50/p95/p99 under
   open-loop (Poisson) load at 25/50/90% of our rate;
3. naive Celery: one task per job (bench/naive.py, Celery's defaults), same model, same Redis, one
   worker process, driven with Celery's own client (no HTTP: that favours naive): items/s and the
   latency at the same absolute loads;
4. overhead at idle: one job at a time over HTTP (300 of them; 60 in the quick mode), end-to-end
   minus the model's own single-item time;
5. priorities under overload: 2x our rate for a while, 20% high and 80% low; p95 of each, and of
   high at idle (as many, one at a time, each timed to its result being stored, as the overload
   runs time theirs); then again with 10% and 5% high (``--high-shares``; the quick mode runs 20% only);
   beside each, the lane simulated at that share on the limit run's batch times (bench/queueing.py:
   the queueing alone), and the largest share for which that lane alone keeps high within 2x its
   idle p95 (``high_share_within_bound_simulated``: above it no worker on these cores can);
6. adaptive vs fixed batching: on the same worker (``celery control set_batching``), items/s at
   saturation and the idle overhead for adaptive batching and for fixed settings: the entry's
   max_batch_size, and the limit run's best batch size, each with the entry's max_wait_ms and with 0.

The worker (and the limit and naive runs) get the first half of this process's cores, with that many
torch threads; Redis, the API and the load generator get the rest (taskset): as a deployment would
put them on separate machines. Our open-loop runs are sent by bench/loadgen.py (asyncio on uvloop, in
a process of its own: it spends less of that core than threads do); with four or more service
cores, by one such process per two of them (64 connections each), which then also submit the
saturation runs, so that one Python client is not what bounds a GPU worker's figure. Writes
bench/results/latest.json and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder comes first on sys.path, and "bench" would name this file.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import orjson  # noqa: E402
import requests  # noqa: E402

import settings  # noqa: E402
from bench.models import inputs_for, load_runner  # noqa: E402
from bench.queueing import largest_share, simulate_lane  # noqa: E402
from tests.procs import Proc, free_port, start_api, start_redis, start_worker, wait_until, worker_ready  # noqa: E402

CORES = sorted(os.sched_getaffinity(0))
MODEL_CORES = CORES[: max(1, len(CORES) // 2)]
SERVICE_CORES = CORES[len(MODEL_CORES):] or CORES
LOADS = (0.25, 0.5, 0.9)
#: open-loop submitters (bench/loadgen.py processes): one per two service cores, at least one. On
#: a GPU machine (8 service cores) two of them with 32 connections each took 580 to 1,495 POST/s
#: from six API processes, four with 64 each 3,035: a keep-alive connection stays with the gunicorn
#: process that accepted it, and they are not spread evenly, so a few connections leave processes idle.
LOADGEN_PROCESSES = max(1, len(SERVICE_CORES) // 2)
#: keep-alive connections per load generator (one request at a time on each)
LOADGEN_CONNECTIONS = 32 if LOADGEN_PROCESSES == 1 else 64


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def on_cores(cores):
    """Processes started inside inherit ``cores`` (the affinity is inherited at fork)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))], 2)


# -- 1. the limit -------------------------------------------------------------------------------
def limit(model: str, threads: int, seconds: float, rounds: int = 1, sizes: list[int] | None = None) -> dict:
    """In a child process on the model cores: items/s at each batch size (or only ``sizes``), and
    single-item times."""
    cmd = [sys.executable, __file__, "--limit-of", model, "--threads", str(threads), "--seconds", str(seconds),
           "--rounds", str(rounds)] + (["--sizes", ",".join(map(str, sizes))] if sizes else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         preexec_fn=lambda: os.sched_setaffinity(0, MODEL_CORES))
    if out.returncode != 0:
        raise RuntimeError(f"limit run for {model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def limit_child(model: str, threads: int, seconds: float, rounds: int = 1, sizes: list[int] | None = None) -> dict:
    """Each batch size (up to the entry's max_batch_size, or ``sizes``) for ``seconds``, in ``rounds``
    rounds (the order reversed every other round); a size's items/s is the median of its rounds. The
    best of single windows would favour whichever size the machine's drift caught on a fast second:
    the sizes near the best differ by less than this machine's noise."""
    spec, runner, _load_s = load_runner(str(ROOT / "models.toml"), model, threads)
    sizes = sizes or [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= spec.max_batch_size]
    items = inputs_for(spec, max(sizes))
    for size in sizes:  # each shape once before any is timed
        runner(items[:size])
    windows: dict[int, list[float]] = {size: [] for size in sizes}
    single_ms: list[float] = []
    for r in range(rounds):
        for size in (sizes if r % 2 == 0 else sizes[::-1]):
            times, start = [], time.perf_counter()
            while time.perf_counter() - start < seconds or len(times) < 3:
                t = time.perf_counter()
                runner(items[:size])
                times.append(time.perf_counter() - t)
            # all the calls, as a worker's throughput counts them
            windows[size].append(round(size * len(times) / sum(times), 2))
            if size == 1:
                single_ms += [t * 1000 for t in times]
    rates = {size: round(statistics.median(w), 2) for size, w in windows.items()}
    best = max(rates, key=rates.get)
    return {"items_per_s_by_batch": rates, "best_batch": best, "limit_items_per_s": rates[best],
            "rounds": rounds, "seconds_per_window": seconds, "items_per_s_by_batch_rounds": windows,
            "best_single_window_items_per_s": max(max(w) for w in windows.values()),
            "single_ms_p50": pct(single_ms, 50), "single_ms_p99": pct(single_ms, 99),
            "threads": threads, "cores": sorted(os.sched_getaffinity(0)), "device": runner.device,
            "device_name": device_name(runner.device)}


def device_name(device: str) -> str:
    """The processor a runner's device is: the GPU's name, or the CPU's model name."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


# -- drivers: ours over HTTP, naive over Celery -------------------------------------------------
# submit(i, priority) -> handle; wait(handle) -> the epoch second its result was stored, or None.
class Ours:
    """Over HTTP with urllib3 (what requests runs on) and orjson: the load generator shares a core with
    the API and Redis, so it should spend as little of it as it can (requests cost ~1 ms more per job)."""
    name = "ours"

    def __init__(self, api: str, model: str, items: list):
        import urllib3

        self.api, self.model, self.items = api, model, items
        self.pool = urllib3.PoolManager(maxsize=64, retries=False, timeout=urllib3.Timeout(connect=5, read=60))
        self.details: dict[str, tuple[float, float | None, float | None]] = {}  # id -> created, queue_ms, run_ms
        self.headers = {"Content-Type": "application/json"}

    def _request(self, *args, **kwargs):
        """gunicorn closes a keep-alive connection idle for 2 s; a request sent on one just as it
        closes gets no response and was not handled: send it once more on a fresh connection."""
        import urllib3

        try:
            return self.pool.request(*args, **kwargs)
        except urllib3.exceptions.ProtocolError:
            return self.pool.request(*args, **kwargs)

    def submit(self, i: int, priority: str = "normal") -> str:
        body = orjson.dumps({"model": self.model, "input": self.items[i % len(self.items)], "priority": priority})
        r = self._request("POST", f"{self.api}/jobs", body=body, headers=self.headers)
        if r.status != 202:
            raise RuntimeError(f"POST /jobs answered {r.status}: {r.data[:300]!r}")
        return orjson.loads(r.data)["id"]

    def send_open_loop(self, rate: float, seconds: float, priorities, seed: int) -> list[tuple]:
        """``open_loop``'s arrivals, sent by ``bench/loadgen.py`` (asyncio on uvloop: about a third of
        the CPU per job that this process's threads spend, on the core the API and Redis have).
        ``LOADGEN_PROCESSES`` of them share the rate where there are cores for them."""
        procs = []
        try:
            for k in range(LOADGEN_PROCESSES):
                proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "loadgen.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
                procs.append(proc)
                # Poisson streams at rate/k add up to one at the rate; the first keeps the seed's schedule
                proc.stdin.write(json.dumps({"api": self.api, "model": self.model, "items": self.items,
                                             "rate": rate / LOADGEN_PROCESSES, "seconds": seconds,
                                             "priorities": [list(p) for p in priorities],
                                             "seed": seed if k == 0 else seed * 1000 + k,
                                             "concurrency": LOADGEN_CONNECTIONS}) + "\n")
                proc.stdin.flush()
            for proc in procs:
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"bench/loadgen.py did not start:\n{proc.stderr.read()[-3000:]}")
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            arrivals = []
            for proc in procs:
                out, err = proc.communicate(timeout=seconds + 300)
                if proc.returncode != 0:
                    raise RuntimeError(f"bench/loadgen.py failed:\n{err[-3000:]}")
                arrivals += [tuple(a) for a in json.loads(out)["arrivals"]]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        return sorted(arrivals, key=lambda a: a[0])

    def wait(self, job_id: str, timeout_s: float = 300) -> float | None:
        from datetime import datetime

        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            r = self._request("GET", f"{self.api}/jobs/{job_id}?wait=20")
            job = orjson.loads(r.data)
            if job["status"] == "succeeded":
                self.details[job_id] = (datetime.fromisoformat(job["created_at"].replace("Z", "+00:00")).timestamp(),
                                        job.get("queue_ms"), job.get("run_ms"))
                return datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")).timestamp()
            if job["status"] in ("failed", "cancelled", "expired"):
                return None
        return None


class Naive:
    """Sends with Celery's client; reads results straight from the backend's keys (Celery's own
    ``AsyncResult.get`` is not safe from many threads at once: it gave up with "Retry limit exceeded")."""
    name = "naive"

    def __init__(self, app, model: str, items: list, redis_url: str):
        import redis

        self.app, self.model, self.items = app, model, items
        self.r = redis.Redis.from_url(redis_url)

    def submit(self, i: int, priority: str = "normal"):
        return self.app.send_task("naive.infer", args=(self.model, self.items[i % len(self.items)]),
                                  queue="naive").id

    def wait(self, task_id: str, timeout_s: float = 300) -> float | None:
        from datetime import datetime, timezone

        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            raw = self.r.get(f"celery-task-meta-{task_id}")
            if raw:
                meta = json.loads(raw)
                if meta["status"] != "SUCCESS":
                    return None
                done = datetime.fromisoformat(meta["date_done"])
                return (done if done.tzinfo else done.replace(tzinfo=timezone.utc)).timestamp()
            time.sleep(0.005)
        return None


def cpu_busy(before: dict, after: dict) -> dict:
    """Per-core busy fraction between two ``cpu_times()`` samples."""
    out = {}
    for core, (busy0, total0) in before.items():
        busy1, total1 = after[core]
        out[core] = round((busy1 - busy0) / max(1, total1 - total0), 3)
    return out


def cpu_times() -> dict:
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            values = list(map(int, fields))
            idle = values[3] + values[4]
            out[int(name[3:])] = (sum(values) - idle, sum(values))
    return out


def saturate(driver, n: int, threads: int = 16) -> dict:
    """Submit ``n`` jobs as fast as ``threads`` can (or, with several loadgen processes, as fast as
    they can), then wait for all: items/s from the first submit to the last result stored, and how
    busy each core was meanwhile."""
    start, cpu0 = time.time(), cpu_times()
    with ThreadPoolExecutor(threads) as pool:
        if LOADGEN_PROCESSES > 1 and hasattr(driver, "send_open_loop"):
            # a million jobs/s for n/1e6 s: each process sends its share at once, over its connections
            arrivals = driver.send_open_loop(1e6, n / 1e6, (("normal", 1.0),), seed=n)
            start, n = min(a[0] for a in arrivals), len(arrivals)
            handles = [a[2] for a in arrivals]
        else:
            handles = list(pool.map(driver.submit, range(n)))
        submitted = time.time() - start
        done = list(pool.map(lambda h: driver.wait(h) if h is not None else None, handles))
    last = max((t for t in done if t), default=time.time())
    seconds = last - start
    return {"jobs": n, "seconds": round(seconds, 2), "items_per_s": round(n / seconds, 2),
            "failed": done.count(None), "submit_s": round(submitted, 2), "core_busy": cpu_busy(cpu0, cpu_times())}


def side_by_side(model: str, threads: int, batch: int, driver, n: int, rounds: int, seconds: float,
                 metrics_url: str | None = None, first_limit: float | None = None) -> dict:
    """The limit (the model alone at ``batch``, ``seconds``) and ours at saturation (``n`` jobs) in
    turns, ``rounds`` times, the order swapped every other round. The limit's ladder runs minutes
    before ours; the machine's speed drifts more than that between them (run S: ours 0.822x the
    ladder at saturation, 0.902x in the batching comparison on the same worker minutes later).
    ``first_limit``: the first round's limit, already measured (the quick mode's ladder, seconds
    before: another child would load the model again, 10 s of a mode that must stay short)."""
    pairs = []
    for r in range(rounds):
        pair: dict = {}
        for part in ("limit", "ours") if r % 2 == 0 else ("ours", "limit"):
            if part == "limit" and r == 0 and first_limit is not None:
                pair["limit_items_per_s"] = first_limit
            elif part == "limit":
                pair["limit_items_per_s"] = limit(model, threads, seconds, sizes=[batch])["limit_items_per_s"]
            else:
                before = scrape(metrics_url) if metrics_url else None
                pair["ours"] = saturate(driver, n)
                if metrics_url:
                    pair["ours"]["worker"] = worker_between(before, scrape(metrics_url))
        pairs.append(pair)
        say(f"{model}: round {r + 1} of {rounds}: limit {pair['limit_items_per_s']} items/s, "
            f"ours {pair['ours']['items_per_s']} ({pair['ours']['items_per_s'] / pair['limit_items_per_s']:.3f}x)")
    return summarise_side_by_side(pairs, batch)


def summarise_side_by_side(pairs: list[dict], batch: int) -> dict:
    """Medians of the limit's and our rounds, and of the rounds' ratios (each round's pair ran within
    seconds of each other).

    >>> s = summarise_side_by_side([{"limit_items_per_s": 300, "ours": {"items_per_s": 270}},
    ...                             {"limit_items_per_s": 250, "ours": {"items_per_s": 240}},
    ...                             {"limit_items_per_s": 320, "ours": {"items_per_s": 250}}], batch=32)
    >>> s["limit_items_per_s"], s["ours_items_per_s"], s["ours_vs_limit"], s["ratio_rounds"]
    (300, 250, 0.9, [0.9, 0.96, 0.781])
    """
    ratios = [round(p["ours"]["items_per_s"] / p["limit_items_per_s"], 3) for p in pairs]
    return {"batch": batch, "limit_items_per_s": statistics.median(p["limit_items_per_s"] for p in pairs),
            "ours_items_per_s": statistics.median(p["ours"]["items_per_s"] for p in pairs),
            "ours_vs_limit": statistics.median(ratios), "ratio_rounds": ratios,
            "limit_rounds": [p["limit_items_per_s"] for p in pairs], "ours_rounds": [p["ours"] for p in pairs]}


def open_loop(driver, rate: float, seconds: float, priorities=(("normal", 1.0),), seed: int = 1) -> dict:
    """Poisson arrivals at ``rate`` jobs/s for ``seconds``. A job's time runs from its scheduled
    arrival to its result being stored (server-side timestamp, same clock): no waiting thread per job
    is needed, so arrivals keep their rate however far behind the system falls."""
    rng = random.Random(seed)
    names, weights = zip(*priorities)
    arrivals: list[tuple[float, str, object]] = []
    lock = threading.Lock()

    def send(i: int, at: float, priority: str) -> None:
        try:
            handle = driver.submit(i, priority)
        except Exception:
            handle = None
        with lock:
            arrivals.append((at, priority, handle))

    if hasattr(driver, "send_open_loop"):  # the same schedule, from a process of its own
        arrivals = driver.send_open_loop(rate, seconds, priorities, seed)
        i = len(arrivals)
    else:
        submitters = ThreadPoolExecutor(32)
        start, i, next_at = time.time(), 0, 0.0
        while next_at < seconds:
            delay = start + next_at - time.time()
            if delay > 0:
                time.sleep(delay)
            submitters.submit(send, i, start + next_at, rng.choices(names, weights)[0])
            i += 1
            next_at += rng.expovariate(rate)
        submitters.shutdown(wait=True)
    with ThreadPoolExecutor(32) as waiters:
        done = list(waiters.map(lambda a: driver.wait(a[2]) if a[2] is not None else None, arrivals))
    times: dict[str, list[float]] = {p: [] for p in names}
    parts: dict[str, dict[str, list[float]]] = {p: {"submit_ms": [], "queue_ms": [], "run_ms": []} for p in names}
    failed = 0
    details = getattr(driver, "details", {})
    for (at, priority, handle), finished in zip(arrivals, done):
        if finished is None:
            failed += 1
        else:
            times[priority].append(max(0.0, finished - at) * 1000)
            if handle in details:  # where the time went: reaching the API, the queue, the batch
                created, queue_ms, run_ms = details[handle]
                parts[priority]["submit_ms"].append(max(0.0, created - at) * 1000)
                for key, value in (("queue_ms", queue_ms), ("run_ms", run_ms)):
                    if value is not None:
                        parts[priority][key].append(value)
    every = [t for ts in times.values() for t in ts]
    out = {"rate": round(rate, 2), "seconds": seconds, "jobs": i, "failed": failed,
           "p50_ms": pct(every, 50), "p95_ms": pct(every, 95), "p99_ms": pct(every, 99)}
    if len(names) > 1:
        out["by_priority"] = {p: {"jobs": len(ts), "p50_ms": pct(ts, 50), "p95_ms": pct(ts, 95),
                                  **{f"{k}_p50_p95": [pct(v, 50), pct(v, 95)] for k, v in parts[p].items() if v},
                                  "cdf_ms": sorted(round(t, 1) for t in ts)} for p, ts in times.items()}
    return out


def sequential(driver, n: int, priority: str = "normal", to: str = "client") -> list[float]:
    """One job at a time: each one's time from submit to its result back at the client (ms), or
    (``to="stored"``) to its result being stored, where ``open_loop`` stops its clock."""
    times = []
    for i in range(n):
        t, at = time.perf_counter(), time.time()
        finished = driver.wait(driver.submit(i, priority))
        if finished is not None:
            times.append((time.perf_counter() - t if to == "client" else finished - at) * 1000)
    return times


def set_batching(env: dict, model: str, size: int, wait_ms: float, mode: str) -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "celery"), "-A", "workers", "control", "set_batching",
                          model, str(size), str(wait_ms), mode], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, timeout=60)
    if out.returncode != 0 or f"batching={mode}" not in out.stdout:
        raise RuntimeError(f"set_batching failed: {out.stdout} {out.stderr[-2000:]}")


def batching_settings(spec, best_batch: int) -> list[tuple[str, int, float]]:
    """(mode, max_batch_size, max_wait_ms): adaptive as configured, then the fixed settings a user
    would try: the entry's size and the limit's best size, each with the entry's wait and with none.

    >>> from types import SimpleNamespace as S
    >>> batching_settings(S(max_batch_size=64, max_wait_ms=10.0), 16)
    [('adaptive', 64, 10.0), ('fixed', 64, 10.0), ('fixed', 64, 0.0), ('fixed', 16, 10.0), ('fixed', 16, 0.0)]
    """
    out = [("adaptive", spec.max_batch_size, spec.max_wait_ms)]
    for size in dict.fromkeys([spec.max_batch_size, best_batch]):
        for wait in dict.fromkeys([spec.max_wait_ms, 0.0]):
            out.append(("fixed", size, wait))
    return out


def compare_batching(driver, env: dict, spec, lim: dict, quick: bool, metrics_url: str | None = None) -> list[dict]:
    """Items/s at saturation and idle overhead for each batching setting, on the running worker.
    Settings take turns, in rounds (the order rotating each round, so that in every ``len(settings)``
    rounds each runs once in every place), and each row reports the median of its rounds and,
    round by round, adaptive's items/s over its own: on a shared machine, speed drifts by 10%
    within minutes, more than the settings differ, and the turns of one round are seconds apart.
    The full mode runs the rotation twice (at least 8 rounds): with one, runs split both ways."""
    settings = batching_settings(spec, lim["best_batch"])
    rounds = 1 if quick else 2 * max(4, len(settings))  # (quick: the whole run stays under 5 minutes)
    n_sat = max(40, int(lim["limit_items_per_s"] * (3 if quick else 6)))
    n_idle = 8 if quick else 20
    runs: dict[tuple, dict[str, list]] = {key: {"items_per_s": [], "idle_ms": [], "mean_batch": []} for key in settings}
    for r in range(rounds):
        for mode, size, wait in settings[r % len(settings):] + settings[:r % len(settings)]:
            set_batching(env, spec.name, size, wait, mode)
            sequential(driver, 3)  # settle
            before = scrape(metrics_url) if metrics_url else {}
            sat = saturate(driver, n_sat)
            if metrics_url:
                runs[(mode, size, wait)]["mean_batch"].append(worker_between(before, scrape(metrics_url))["mean_batch"])
            idle = [t - lim["single_ms_p50"] for t in sequential(driver, n_idle)]
            runs[(mode, size, wait)]["items_per_s"].append(sat["items_per_s"])
            runs[(mode, size, wait)]["idle_ms"].extend(idle)
            say(f"{spec.name}: round {r + 1}/{rounds}, {mode} batching, max {size}, wait {wait} ms: "
                f"{sat['items_per_s']} items/s, idle overhead p50 {pct(idle, 50)} ms")
    set_batching(env, spec.name, spec.max_batch_size, spec.max_wait_ms, spec.batching)
    return summarise_comparison(settings, runs, n_sat)


def summarise_comparison(settings: list[tuple], runs: dict[tuple, dict[str, list]], n_sat: int) -> list[dict]:
    """One row per setting: the median of its rounds, and ``adaptive_vs_this``, the median over
    rounds of adaptive's items/s over this setting's in the same round (the first setting is
    adaptive's; each round's turns are its own, so the machine's drift between rounds cancels),
    with ``adaptive_ahead_rounds``, in how many of those rounds adaptive's items/s was the higher.

    >>> s = [("adaptive", 64, 10.0), ("fixed", 64, 0.0)]
    >>> rows = summarise_comparison(s, {s[0]: {"items_per_s": [100, 200, 300], "idle_ms": [1.0]},
    ...                                 s[1]: {"items_per_s": [110, 190, 310], "idle_ms": [2.0]}}, 50)
    >>> [(r["items_per_s"], r["adaptive_vs_this"], r["adaptive_ahead_rounds"]) for r in rows[1:]]
    [(190, 0.968, 1)]
    """
    adaptive = runs[settings[0]]["items_per_s"]

    def ratios(key: tuple) -> list[float]:
        return [a / b for a, b in zip(adaptive, runs[key]["items_per_s"]) if b]

    return [{"batching": mode, "max_batch_size": size, "max_wait_ms": wait,
             "items_per_s": round(statistics.median(runs[(mode, size, wait)]["items_per_s"]), 2),
             "items_per_s_rounds": runs[(mode, size, wait)]["items_per_s"],
             "adaptive_vs_this": round(statistics.median(ratios((mode, size, wait))), 3),
             "adaptive_ahead_rounds": sum(r > 1 for r in ratios((mode, size, wait))),
             "mean_batch_rounds": runs[(mode, size, wait)].get("mean_batch", []),
             "idle_overhead_ms_p50": pct(runs[(mode, size, wait)]["idle_ms"], 50), "jobs_per_round": n_sat}
            for mode, size, wait in settings]


def worker_between(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the worker ran between two ``scrape``s: model seconds, batches and their mean size.

    >>> worker_between({"batch_size_count": 2, "batch_size_sum": 10}, {"batch_size_count": 6, "batch_size_sum": 250,
    ...                                                              "inference_seconds_sum": 1.5})
    {'model_s': 1.5, 'batches': 4, 'mean_batch': 60.0}
    """
    def diff(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    return {"model_s": round(diff("inference_seconds_sum"), 2), "batches": round(diff("batch_size_count")),
            "mean_batch": round(diff("batch_size_sum") / max(1, diff("batch_size_count")), 2)}


def scrape(url: str) -> dict[str, float]:
    """A worker's metrics, summed by name over labels."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


# -- one model ---------------------------------------------------------------------------------
def bench_model(model: str, args, work: Path) -> dict:
    from models.registry import Registry

    spec = Registry.from_file(str(ROOT / "models.toml")).get(model)
    threads = len(MODEL_CORES)
    items = inputs_for(spec, 32)
    quick = args.quick
    say(f"{model}: the limit (model alone, {threads} thread(s), cores {MODEL_CORES})")
    lim = limit(model, threads, 1.0 if quick else 3.0, rounds=1 if quick else 3)
    say(f"{model}: limit {lim['limit_items_per_s']} items/s at batch {lim['best_batch']} "
        f"(by batch: {lim['items_per_s_by_batch']})")

    work.mkdir(parents=True, exist_ok=True)
    redis_proc, redis_url = start_redis(work)
    env = {"REDIS_URL": redis_url, "MODELS_FILE": str(ROOT / "models.toml"), "MODELS": model, "API_KEYS": "", "TORCH_THREADS": str(threads), "WORKER_CONCURRENCY": str(args.concurrency),
           "LOG_FORMAT": "text", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MAX_QUEUED": "100000", "METRICS_DIR": str(work / "metrics")}
    procs = [redis_proc]
    result = {"model": model, "task": spec.task, "max_batch_size": spec.max_batch_size,
              "max_wait_ms": spec.max_wait_ms, "limit": lim}
    try:
        with on_cores(SERVICE_CORES):
            api_proc, api = start_api(env, work)
        procs.append(api_proc)
        metrics_port = free_port()
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        with on_cores(MODEL_CORES):
            worker = start_worker(model, {**env, "WORKER_METRICS_PORT": str(metrics_port)}, work)
        procs.append(worker)
        worker_ready(redis_url, model, worker, timeout_s=180)
        result["batching"] = args.batching or spec.batching
        if args.max_batch_size or args.max_wait_ms is not None or args.batching:  # not the entry's setting
            size = args.max_batch_size or spec.max_batch_size
            wait_ms = spec.max_wait_ms if args.max_wait_ms is None else args.max_wait_ms
            set_batching(env, model, size, wait_ms, result["batching"])
            result["max_batch_size"], result["max_wait_ms"] = size, float(wait_ms)
        ours = Ours(api, model, items)
        sequential(ours, 3)  # load the model in the pool process
        # A burst first, as a worker that has been up a while has seen: adaptive batching learns its
        # batch sizes on a backlog (a few hundred jobs), and the measurement is of the learnt state.
        warm = saturate(ours, max(30, int(lim["limit_items_per_s"] * (1.5 if quick else 4))))
        say(f"{model}: warm-up burst of {warm['jobs']} jobs: {warm['items_per_s']} items/s")
        n_sat = max(50, int(lim["limit_items_per_s"] * (6 if quick else 25)))  # the jobs ours runs at saturation
        rounds = 1 if quick else 5
        say(f"{model}: ours at saturation against the limit at batch {lim['best_batch']}, in {rounds} round(s) "
            f"of {n_sat // rounds} jobs")
        side = side_by_side(model, threads, lim["best_batch"], ours, n_sat // rounds, rounds, 5.0, metrics_url,
                            first_limit=lim["limit_items_per_s"] if quick else None)
        rate = side["ours_items_per_s"]
        say(f"{model}: ours {rate} items/s, {side['ours_vs_limit']} x the limit (median of the rounds' ratios)")
        window = 5.0 if quick else 30.0  # (quick: 6 s windows took 273.3 and 296.9 s in all, near the 5 minutes)
        ours_loads = {}
        for f in LOADS:
            ours_loads[str(f)] = open_loop(ours, f * rate, window)
            say(f"{model}: ours at {f:.0%} of it: {ours_loads[str(f)]}")
        # 300 jobs: the p95 of 60 (the fourth slowest) moved from 16.57 to 25.75 ms between five
        # sixties of minilm's high jobs in a row, and it is the bound's denominator.
        n_idle = 60 if quick else 300
        idle = sequential(ours, n_idle)
        # To its result being stored, as the overload runs below time each job: like with like.
        idle_high = sequential(ours, n_idle, "high", to="stored")
        overhead = [t - lim["single_ms_p50"] for t in idle]
        # The target (high p95 at 2x <= 2x its idle p95) depends on how much of the load is high: the
        # first share is the headline, the others show where it holds.
        by_share = {}
        for share in args.high_shares:
            say(f"{model}: priorities at 2x our rate for {window:.0f}s, {share:.0%} high")
            by_share[share] = open_loop(ours, 2 * rate, window, priorities=(("high", share), ("low", 1 - share)))
        overload = by_share[args.high_shares[0]]
        high_idle_p95 = pct(idle_high, 95)
        # The largest share whose high p95 the lane alone (the limit run's batch times, no time outside
        # the model) keeps within 2x the idle p95: above it no worker on these cores can meet the bound.
        share_bound = (largest_share(lim["items_per_s_by_batch"], 2 * rate, 2 * high_idle_p95, spec.max_batch_size)
                       if high_idle_p95 else None)
        say(f"{model}: the lane alone keeps high within 2x its idle p95 ({high_idle_p95} ms) up to "
            f"{share_bound:.1%} high at 2x our rate" if share_bound is not None else f"{model}: no idle high p95")
        shares = {}
        for share, run in by_share.items():
            high, low = run["by_priority"]["high"], run["by_priority"]["low"]
            shares[str(share)] = {
                "high_jobs_per_s": round(2 * rate * share, 2), "high_jobs": high["jobs"], "high_p95_ms": high["p95_ms"],
                "low_p95_ms": low["p95_ms"], "failed": run["failed"],
                "high_p95_vs_idle": round(high["p95_ms"] / high_idle_p95, 2) if high["p95_ms"] and high_idle_p95 else None,
                **{k: v for k, v in high.items() if k.endswith("_p50_p95")}}
            # The lane simulated at this share on the limit run's batch times (bench/queueing.py): model time
            # and queueing only, nothing else on the core.
            sim = simulate_lane(lim["items_per_s_by_batch"], 2 * rate * share, spec.max_batch_size)
            shares[str(share)].update(high_p95_ms_simulated=sim["p95_ms"], lane_busy_simulated=sim["busy"])
            say(f"{model}: {share:.0%} high: {shares[str(share)]}")
        comparison = None
        if not args.no_compare:
            say(f"{model}: adaptive vs fixed batching")
            comparison = compare_batching(ours, env, spec, lim, quick, metrics_url)

        with on_cores(MODEL_CORES):
            naive_worker = Proc(f"naive-{model}", [str(Path(sys.executable).parent / "celery"), "-A", "bench.naive",
                                                   "worker", "-Q", "naive", "-c", "1", "--loglevel", "WARNING"],
                                env, work)
        procs.append(naive_worker)
        from celery import Celery

        client = Celery("naive-client", broker=redis_url, backend=redis_url)
        client.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
        naive = Naive(client, model, items, redis_url)
        wait_until(lambda: naive.wait(naive.submit(0), timeout_s=5) is not None, 180, "naive worker", interval=0.5)
        n_naive = max(30, int(n_sat / 3))
        say(f"{model}: naive Celery at saturation ({n_naive} jobs)")
        naive_sat = saturate(naive, n_naive)
        say(f"{model}: naive {naive_sat['items_per_s']} items/s")
        naive_loads = {}
        for f in LOADS:
            naive_loads[str(f)] = open_loop(naive, f * rate, window)
            say(f"{model}: naive at {f:.0%} of our rate: {naive_loads[str(f)]}")
    finally:
        for proc in reversed(procs):
            proc.stop()

    result.update({
        "limit_items_per_s": side["limit_items_per_s"],
        "ours_items_per_s": rate,
        "naive_items_per_s": naive_sat["items_per_s"],
        "ours_vs_limit": side["ours_vs_limit"],
        "ours_vs_limit_ladder": round(rate / lim["limit_items_per_s"], 3),
        "ours_vs_naive": round(rate / naive_sat["items_per_s"], 2),
        "idle_e2e_ms_p50": pct(idle, 50),
        "idle_overhead_ms_p50": pct(overhead, 50),
        "idle_overhead_ms_p99": pct(overhead, 99),
        "high_p95_ms_idle": high_idle_p95,
        "idle_jobs": n_idle,
        "high_p95_ms_overload": overload["by_priority"]["high"]["p95_ms"],
        "low_p95_ms_overload": overload["by_priority"]["low"]["p95_ms"],
        "high_share_overload": args.high_shares[0],
        "high_share_within_bound_simulated": share_bound,
        "priorities_by_high_share": shares,
        "priorities_by_high_share_cdf": {str(sh): run["by_priority"]["high"]["cdf_ms"] for sh, run in by_share.items()
                                         if sh != args.high_shares[0]},
        "ours_warm_up": warm, "ours_against_the_limit": side, "naive_saturation": naive_sat, "batching_comparison": comparison,
        "ours_latency_by_load": ours_loads, "naive_latency_by_load": naive_loads, "overload": overload,
    })
    return result


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    written = []

    def save(fig, ax, title: str, name: str, **legend) -> None:
        ax.set_title(title)
        ax.legend(**legend)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        written.append(name)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for k, (key, label) in enumerate([("limit_items_per_s", "limit (model alone)"), ("ours_items_per_s", "ours"),
                                      ("naive_items_per_s", "naive Celery")]):
        ax.bar([i + (k - 1) * width for i in range(len(models))], [results["models"][m][key] for m in models],
               width, label=label)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("items/s")
    save(fig, ax, "Throughput at saturation", "throughput.png")

    for m in models:
        r = results["models"][m]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("ours_latency_by_load", "ours"), ("naive_latency_by_load", "naive Celery")):
            loads = sorted(r[key], key=float)
            xs = [r[key][f]["rate"] for f in loads]
            for q, style in (("p50_ms", "-o"), ("p95_ms", "--o"), ("p99_ms", ":o")):
                ax.plot(xs, [r[key][f][q] for f in loads], style, label=f"{label} {q[:3]}")
        ax.set_xlabel("offered load (jobs/s, Poisson)")
        ax.set_ylabel("end-to-end ms")
        ax.set_yscale("log")
        save(fig, ax, f"{m}: latency vs load", f"latency-{m}.png", fontsize=8)

        fig, ax = plt.subplots(figsize=(7, 4))
        share = r.get("high_share_overload", 0.2)
        for p, data in r["overload"]["by_priority"].items():
            cdf = data["cdf_ms"]
            if cdf:
                ax.plot(cdf, [(i + 1) / len(cdf) for i in range(len(cdf))],
                        label=f"{p} at 2x capacity ({share if p == 'high' else 1 - share:.0%} of jobs)")
        for other, data in (r.get("priorities_by_high_share_cdf") or {}).items():
            ax.plot(data, [(i + 1) / len(data) for i in range(len(data))], "--",
                    label=f"high at 2x capacity ({float(other):.0%} of jobs)")
        ax.axvline(r["high_p95_ms_idle"], color="grey", linestyle=":", label="high p95 at idle")
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end ms")
        ax.set_ylabel("fraction of jobs")
        save(fig, ax, f"{m}: priorities under overload", f"priorities-{m}.png", fontsize=8)
    return written


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "celery", "celery-batches", "kombu", "redis", "gunicorn",
                                             "Flask", "transformers")}


def commit() -> str | None:
    """The commit the run measured (with "+changes" when the working tree differs from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def shares_arg(text: str) -> list[float]:
    """``--high-shares``: fractions in (0, 1), comma-separated."""
    try:
        shares = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not shares or any(not 0 < x < 1 for x in shares):
        raise argparse.ArgumentTypeError(f"shares must be between 0 and 1 (exclusive), got {text!r}")
    return shares


def _number_arg(cast, ok, need: str):
    """An argparse type: ``cast(text)``, refused unless ``ok(value)`` (``need`` says what is wanted)."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {need}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return value
    return parse


#: ``--concurrency``, ``--max-batch-size``
count_arg = _number_arg(int, lambda v: v >= 1, "a whole number of at least 1")


def sizes_arg(text: str) -> list[int]:
    """``--sizes`` (the limit's child): batch sizes, comma-separated, each a count."""
    return [count_arg(part) for part in text.split(",")]


#: ``--max-wait-ms``: milliseconds, finite (NaN fails the comparison)
wait_arg = _number_arg(float, lambda v: 0 <= v < float("inf"), "0 or more milliseconds")


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP (``timeout``, a closed terminal) end the run as Ctrl-C does: through the
    ``finally`` blocks that stop Redis, the API and the workers (without this they were left
    running), and only once: a second signal during the cleanup is ignored."""
    def stop(signum, frame):
        # Once: ``timeout`` signals both the process and its group, and a second SystemExit raised
        # inside the cleanup would cut it short (the API and Redis were left running).
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows: a few minutes for both models")
    parser.add_argument("--models", default="minilm,efficientnet-lite0")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--max-batch-size", type=count_arg, help="run our worker with this max batch size")
    parser.add_argument("--max-wait-ms", type=wait_arg, help="... and this max wait (0: flush as soon as free)")
    parser.add_argument("--batching", choices=("adaptive", "fixed"), help="... and this batching mode")
    parser.add_argument("--concurrency", type=count_arg, default=1, help="pool processes in our worker (default 1)")
    parser.add_argument("--no-compare", action="store_true", help="skip the adaptive vs fixed batching comparison")
    parser.add_argument("--high-shares", type=shares_arg,
                        help="shares of high jobs in the 2x overload runs; the first is the headline "
                             "(default 0.2,0.1,0.05; with --quick, 0.2)")
    parser.add_argument("--limit-of", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=sizes_arg, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.high_shares is None:
        args.high_shares = [0.2] if args.quick else [0.2, 0.1, 0.05]
    if args.limit_of:
        print(json.dumps(limit_child(args.limit_of, args.threads, args.seconds, args.rounds, args.sizes)))
        return
    from models.registry import Registry

    known = Registry.from_file(str(ROOT / "models.toml")).names()
    unknown = [m for m in args.models.split(",") if m not in known]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; models.toml has {', '.join(known)}")
    exit_on_signals()
    os.sched_setaffinity(0, SERVICE_CORES)  # the load generator, with the API and Redis
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    started = time.time()
    results = {"mode": "quick" if args.quick else "full", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": {"cpus": os.cpu_count(), "affinity": CORES, "platform": platform.platform(),
                           "python": platform.python_version()},
               "cores": {"worker, limit and naive worker": MODEL_CORES,
                         "redis, API and load generator": SERVICE_CORES},
               "commit": commit(), "versions": versions(), "models": {},
               "settings": {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                            "batching": args.batching,
                            "torch_threads": len(MODEL_CORES), "worker_concurrency": args.concurrency,
                            "api_workers": settings.API_WORKERS, "api_threads": settings.API_THREADS,
                            "loadgen_processes": LOADGEN_PROCESSES, "loadgen_connections": LOADGEN_CONNECTIONS,
                            "urgent_lane": bool(settings.URGENT_LANE),
                            "task_sent_events": os.environ.get("TASK_SENT_EVENTS", "0") == "1"}}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for model in args.models.split(","):
            results["models"][model] = bench_model(model, args, Path(tmp) / model)
    results["seconds"] = round(time.time() - started, 1)
    results["plots"] = plots(results, out)
    (out / "latest.json").write_text(json.dumps(results, indent=1))
    summary = {m: {k: r[k] for k in ("limit_items_per_s", "ours_items_per_s", "naive_items_per_s", "ours_vs_limit",
                                     "ours_vs_naive", "idle_overhead_ms_p50", "idle_overhead_ms_p99",
                                     "high_p95_ms_idle", "high_p95_ms_overload", "low_p95_ms_overload")}
               for m, r in results["models"].items()}
    print(json.dumps(summary, indent=1))
    say(f"done in {results['seconds']}s: {out / 'latest.json'} and {', '.join(results['plots'])}")


if __name__ == "__main__":
    main()
