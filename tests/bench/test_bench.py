"""The benchmark's measuring parts, with a stand-in system whose timings are known."""

import time

import pytest

from bench import bench


class Delayed:
    """Stores each job's result ``delay_s`` after it is submitted."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def submit(self, i: int, priority: str = "normal"):
        return time.time() + (self.delay_s if priority != "high" else self.delay_s / 10)

    def wait(self, done_at: float):
        return done_at


def test_counts_and_waits_are_checked_before_anything_starts():
    import argparse

    assert bench.count_arg("2") == 2 and bench.wait_arg("0") == 0.0 and bench.wait_arg("2.5") == 2.5
    for bad in ("0", "-1", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.count_arg(bad)
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.wait_arg(bad)
    assert bench.sizes_arg("64") == [64] and bench.sizes_arg("1,32") == [1, 32]
    for bad in ("0", "4,-2", "4,", "x"):  # the limit's child: no size 0 (0 items/s) or below (negative rates)
        with pytest.raises(argparse.ArgumentTypeError):
            bench.sizes_arg(bad)


def test_a_terminated_run_goes_through_its_cleanup():
    """``timeout make bench`` sends SIGTERM: the run must still stop the servers it started."""
    import os
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    stopped = []
    try:
        bench.exit_on_signals()
        with pytest.raises(SystemExit) as exited:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # (the handler runs at once)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # timeout signals the process group too
                time.sleep(0.1)
                stopped.append(True)  # where bench_model stops Redis, the API and the workers
        assert exited.value.code == 128 + signal.SIGTERM and stopped
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_open_loop_times_each_job_from_its_arrival_by_priority():
    out = bench.open_loop(Delayed(0.05), rate=200, seconds=0.5, priorities=(("high", 0.5), ("low", 0.5)))
    assert 60 <= out["jobs"] <= 140 and out["failed"] == 0  # Poisson at 200/s for 0.5 s
    low, high = out["by_priority"]["low"], out["by_priority"]["high"]
    # from the scheduled arrival: the stand-in's delay, plus however late a busy machine submits
    assert 48 <= low["p50_ms"] <= 150 and 4 <= high["p50_ms"] <= 100 and high["p50_ms"] < low["p50_ms"]
    assert len(low["cdf_ms"]) == low["jobs"] and low["cdf_ms"] == sorted(low["cdf_ms"])


def test_one_at_a_time_is_timed_to_the_client_or_to_the_stored_result():
    """The idle ``high`` p95 is the overload bound's denominator: it stops its clock where
    ``open_loop`` stops the overload's, at the stored result, not after the way back."""

    class WayBack(Delayed):
        def wait(self, done_at: float):
            time.sleep(max(0.0, done_at - time.time()) + 0.04)  # stored, then 40 ms to the client
            return done_at

    client = bench.sequential(WayBack(0.02), 3)
    stored = bench.sequential(WayBack(0.02), 3, to="stored")
    assert len(client) == len(stored) == 3
    assert all(t >= 59 for t in client) and all(19 <= t < 45 for t in stored)


def test_saturate_counts_items_per_second_to_the_last_result():
    out = bench.saturate(Delayed(0.2), 20, threads=4)
    assert out["jobs"] == 20 and out["failed"] == 0
    assert out["items_per_s"] == pytest.approx(20 / out["seconds"], rel=0.05)  # (seconds is rounded to 10 ms)
    assert 0.2 <= out["seconds"] < 1.5


def test_percentiles_and_core_busy():
    assert bench.pct([], 50) is None
    assert bench.pct([3, 1, 2], 50) == 2 and bench.pct(list(range(101)), 99) == 99
    before = {0: (100, 1000), 1: (0, 1000)}
    assert bench.cpu_busy(before, {0: (600, 2000), 1: (1000, 2000)}) == {0: 0.5, 1: 1.0}
    times = bench.cpu_times()
    assert times and all(isinstance(core, int) and 0 <= busy <= total for core, (busy, total) in times.items())


def test_the_batching_comparison_covers_adaptive_and_the_fixed_settings_a_user_would_try():
    from types import SimpleNamespace

    assert bench.batching_settings(SimpleNamespace(max_batch_size=64, max_wait_ms=10.0), 16) == [
        ("adaptive", 64, 10.0), ("fixed", 64, 10.0), ("fixed", 64, 0.0), ("fixed", 16, 10.0), ("fixed", 16, 0.0)]
    # the limit's best is the entry's size, and the entry waits 0: no duplicates
    assert bench.batching_settings(SimpleNamespace(max_batch_size=8, max_wait_ms=0.0), 8) == [
        ("adaptive", 8, 0.0), ("fixed", 8, 0.0)]


def test_adaptive_is_compared_round_by_round_so_the_machines_drift_cancels():
    """Fixed is 5% ahead in two rounds of three, but the machine was slow in its second turn: the
    medians put adaptive far ahead; the median of the rounds' ratios says it is behind."""
    s = [("adaptive", 64, 10.0), ("fixed", 64, 10.0)]
    runs = {s[0]: {"items_per_s": [400.0, 300.0, 200.0], "idle_ms": [1.0, 3.0, 2.0], "mean_batch": [59.1, 60.5, 64.0]},
            s[1]: {"items_per_s": [420.0, 210.0, 210.0], "idle_ms": [5.0]}}
    rows = bench.summarise_comparison(s, runs, 100)
    assert [r["items_per_s"] for r in rows] == [300.0, 210.0]  # medians: adaptive far ahead
    assert rows[0]["adaptive_vs_this"] == 1.0
    assert rows[1]["adaptive_vs_this"] == pytest.approx(200 / 210, abs=0.001)  # but behind in 2 of 3 rounds
    assert rows[1]["adaptive_ahead_rounds"] == 1 and rows[0]["adaptive_ahead_rounds"] == 0
    assert rows[1]["items_per_s_rounds"] == [420.0, 210.0, 210.0] and rows[1]["jobs_per_round"] == 100
    assert rows[0]["idle_overhead_ms_p50"] == 2.0
    assert rows[0]["mean_batch_rounds"] == [59.1, 60.5, 64.0] and rows[1]["mean_batch_rounds"] == []


def test_ours_and_the_limit_run_in_turns_and_ours_vs_the_limit_is_the_median_of_the_rounds_ratios(monkeypatch):
    """The limit at the ladder's best batch, run alone again beside each of our saturation rounds,
    the order swapped every other round; the machine slows down in the middle round, for both."""
    calls = []
    limits, ours = iter([300.0, 200.0, 310.0]), iter([270.0, 190.0, 250.0])

    def alone(model, threads, seconds, sizes):
        calls.append(("limit", sizes))
        return {"limit_items_per_s": next(limits)}

    def saturated(driver, n):
        calls.append(("ours", n))
        return {"items_per_s": next(ours)}

    monkeypatch.setattr(bench, "limit", alone)
    monkeypatch.setattr(bench, "saturate", saturated)
    out = bench.side_by_side("minilm", 1, 32, Delayed(0), 500, rounds=3, seconds=5.0)
    assert calls == [("limit", [32]), ("ours", 500), ("ours", 500), ("limit", [32]), ("limit", [32]), ("ours", 500)]
    assert out["ratio_rounds"] == [0.9, 0.95, 0.806] and out["ours_vs_limit"] == 0.9
    # ours's median over the limit's median would say 0.833: the slow round's pair counts as a pair
    assert out["limit_items_per_s"] == 300.0 and out["ours_items_per_s"] == 250.0 and out["batch"] == 32
    assert [r["items_per_s"] for r in out["ours_rounds"]] == [270.0, 190.0, 250.0]

    # the quick mode: one round, its limit the ladder's figure just measured; no second child
    calls.clear()
    ours = iter([280.0])
    out = bench.side_by_side("minilm", 1, 32, Delayed(0), 500, rounds=1, seconds=1.0, first_limit=320.0)
    assert calls == [("ours", 500)] and out["limit_items_per_s"] == 320.0 and out["ours_vs_limit"] == 0.875


def test_the_benchs_doctests():
    import doctest

    assert doctest.testmod(bench).failed == 0


def test_high_shares_are_fractions_and_the_first_is_the_headline():
    import argparse

    assert bench.shares_arg("0.2,0.1, 0.05") == [0.2, 0.1, 0.05]
    for bad in ("", "0.2,x", "0", "1", "0.2,1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.shares_arg(bad)


def test_the_load_generator_sends_open_loops_schedule_and_sends_again_on_a_dropped_keep_alive():
    """bench/loadgen.py (our driver's open loop): the same arrivals as the threads' schedule, seed for
    seed, every one answered even when the server drops idle keep-alive connections unannounced."""
    import json
    import random
    import threading
    import uuid
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies, requests = [], []

    class Jobs(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            if len(requests) % 4 == 0:  # as gunicorn drops a keep-alive connection a request came on
                self.close_connection = True  # just as it timed out: no answer, not handled
                return
            bodies.append(body)
            data = json.dumps({"id": str(uuid.uuid4())}).encode()
            self.send_response(202)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        driver = bench.Ours(f"http://127.0.0.1:{server.server_address[1]}", "m", ["a", "b", "c"])
        arrivals = driver.send_open_loop(100, 0.5, (("high", 0.3), ("low", 0.7)), seed=7)
    finally:
        server.shutdown()
    rng, expected, next_at = random.Random(7), [], 0.0
    while next_at < 0.5:
        expected.append(rng.choices(("high", "low"), (0.3, 0.7))[0])
        next_at += rng.expovariate(100)
    assert [priority for _, priority, _ in arrivals] == expected
    assert all(job_id for _, _, job_id in arrivals) and len(bodies) == len(expected) < len(requests)
    assert sorted(b["input"] for b in bodies) == sorted(["a", "b", "c"][i % 3] for i in range(len(expected)))
    assert arrivals[-1][0] - arrivals[0][0] < 0.5 and all(b["model"] == "m" for b in bodies)


def test_the_lane_is_simulated_as_a_batching_queue_on_the_limit_runs_batch_times():
    from bench.queueing import batch_seconds, simulate_lane

    rates = {"1": 100.0, "2": 160.0, "4": 200.0}  # as limit() returns them: 10, 12.5 and 20 ms a batch
    seconds = batch_seconds(rates)
    assert seconds(1) == pytest.approx(0.010) and seconds(3) == pytest.approx(0.01625)
    assert seconds(8) == pytest.approx(0.040)  # beyond the sizes measured: per item at the largest
    # One at a time it is an M/D/1 queue: mean time in it D + rho * D / (2 * (1 - rho)).
    only_one = simulate_lane(rates, 50.0, max_batch=1)
    assert only_one["mean_ms"] == pytest.approx(10 + 0.5 * 10 / (2 * 0.5), rel=0.03)
    assert only_one["busy"] == pytest.approx(0.5, rel=0.03)
    # Taking every job waiting as one batch serves a load one at a time cannot (120/s > 100/s).
    batched = simulate_lane(rates, 120.0, max_batch=4)
    assert batched["busy"] < 1 and batched["p95_ms"] < 100
    assert simulate_lane(rates, 1.0, max_batch=4)["p95_ms"] == pytest.approx(10.0)  # nearly always alone
    with pytest.raises(ValueError):
        simulate_lane(rates, 0, max_batch=4)


def test_the_largest_high_share_the_lane_allows_is_where_its_simulated_p95_reaches_the_bound():
    import doctest

    from bench import queueing
    from bench.queueing import largest_share, simulate_lane

    assert doctest.testmod(queueing).failed == 0
    rates = {"1": 100.0, "2": 160.0, "4": 200.0}
    share = largest_share(rates, 200.0, bound_ms=25.0, max_batch=4)
    assert 0 < share < 1
    # within the bound at that share, past it one step on (the same 20,000 arrivals it bisects on)
    assert simulate_lane(rates, 200.0 * share, 4, jobs=20_000)["p95_ms"] <= 25.0
    assert simulate_lane(rates, 200.0 * (share + 0.005), 4, jobs=20_000)["p95_ms"] > 25.0
    assert largest_share(rates, 200.0, bound_ms=40.0, max_batch=4) > share  # a looser bound allows more
    assert largest_share(rates, 200.0, bound_ms=9.0, max_batch=4) == 0.0  # one job alone takes 10 ms
    with pytest.raises(ValueError):
        largest_share(rates, 200.0, bound_ms=0, max_batch=4)


def test_saturation_from_several_load_generators_counts_every_job(monkeypatch):
    """Where the service cores allow, ``saturate`` submits from several bench/loadgen.py processes.
    Each one's list of arrivals here is longer than a pipe holds (64 KiB), which uvloop 0.23 cut
    short without an error when written through ``sys.stdout``."""
    import json
    import threading
    import uuid
    from datetime import datetime, timezone
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posted = []

    class Jobs(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            job_id = str(uuid.uuid4())
            posted.append(job_id)
            self._send(202, {"id": job_id})

        def do_GET(self):  # every job has finished by the time it is asked for
            now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
            self._send(200, {"status": "succeeded", "created_at": now, "finished_at": now})

        def log_message(self, *args):
            pass

    monkeypatch.setattr(bench, "LOADGEN_PROCESSES", 2)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Jobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = bench.saturate(bench.Ours(f"http://127.0.0.1:{server.server_address[1]}", "m", ["a"]), 3000)
    finally:
        server.shutdown()
    # a Poisson count near 3000 (sd 55), each one sent, answered, and waited for
    assert 2700 <= out["jobs"] <= 3300 and out["jobs"] == len(posted) and out["failed"] == 0
    assert out["items_per_s"] == pytest.approx(out["jobs"] / out["seconds"], rel=0.05)


def test_the_limit_and_naive_load_the_model_on_the_device_a_worker_picks(tmp_path):
    """Not always the CPU: on a GPU machine the worker runs on CUDA, so the limit beside it must too."""
    import torch

    from bench.models import load_runner

    models = tmp_path / "models.toml"
    models.write_text('[models.auto]\ntask = "text-classification"\nsource = "python:tests.fixtures.runners:EchoRunner"\n'
                      '[models.gpu]\ntask = "text-classification"\nsource = "python:tests.fixtures.runners:EchoRunner"\n'
                      'device = "cuda"\n')
    _spec, runner, _load_s = load_runner(str(models), "auto", 1)
    assert runner.device == ("cuda" if torch.cuda.is_available() else "cpu") and runner(["x"])[0]["echo"] == "x"
    if torch.cuda.is_available():
        assert load_runner(str(models), "gpu", 1)[1].device == "cuda"
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            load_runner(str(models), "gpu", 1)


def test_the_cuda_check_compares_every_number_and_label_and_says_when_there_is_no_gpu():
    import subprocess
    import sys

    import torch

    from bench import cuda_check

    cpu = [{"top_k": [{"label": "tabby", "index": 281, "score": 0.5}, {"label": "lynx", "index": 287, "score": 0.25}]}]
    assert cuda_check.compare(cpu, [{"top_k": [{"label": "tabby", "index": 281, "score": 0.5004},
                                               {"label": "lynx", "index": 287, "score": 0.25}]}]) == (
        pytest.approx(0.0004), True)
    swapped = [{"top_k": [{"label": "lynx", "index": 287, "score": 0.5}, {"label": "tabby", "index": 281, "score": 0.25}]}]
    assert cuda_check.compare(cpu, swapped)[1] is False
    assert cuda_check.compare([1.0, 2.0], [1.0]) == (float("inf"), False)
    assert cuda_check.cosine([1.0, 0.0], [1.0, 0.0]) == pytest.approx(1.0)
    assert cuda_check.cosine([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0)
    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, "bench/cuda_check.py"], capture_output=True, text=True,
                             cwd=bench.ROOT, timeout=120)
        assert out.returncode == 2 and "no CUDA device" in out.stderr
