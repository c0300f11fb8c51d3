"""/metrics for real: the API under gunicorn (2 processes) and a worker with a prefork pool (2 processes),
each adding up the samples of all its processes, dead ones included; the Grafana dashboard charts only
metrics that exist."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections import defaultdict

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import ROOT, free_port, start_ready_worker, wait_until

MODEL = "metered"


def scrape(url: str, **kw) -> dict[tuple, float]:
    """{(sample name, sorted label pairs): value}, over a fresh connection each time."""
    response = requests.get(url, timeout=30, headers={"Connection": "close"}, **kw)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(v for (n, pairs), v in samples.items() if n == name and set(labels.items()) <= set(pairs))


def pids_in(directory: str) -> set[str]:
    return {m.group(1) for f in os.listdir(directory) if (m := re.search(r"_(\d+)\.db$", f))}


def pool_pids(worker) -> set[str]:
    return set(subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split())


@pytest.fixture(scope="module")
def metered(client, stack_env, stack_dir, redis_url):
    """A worker of its own for the ``metered`` model: metrics on a free port, two pool processes
    (one for batches, one more for high-priority jobs: URGENT_LANE)."""
    port = free_port()
    env = {**stack_env, "WORKER_METRICS_PORT": str(port), "WORKER_CONCURRENCY": "1", "URGENT_LANE": "1"}
    worker, node = start_ready_worker(MODEL, env, stack_dir, redis_url)
    try:
        yield worker, node, f"http://127.0.0.1:{port}/metrics"
    finally:
        worker.stop()


def test_worker_metrics_add_up_every_pool_process_even_dead_ones(client, metered, stack_env):
    worker, node, url = metered
    jobs = [client.submit(MODEL, f"high {i}", priority="high")["id"] for i in range(6)]
    jobs += [client.submit(MODEL, inputs=[f"low {i}.{k}" for k in range(3)], priority="low")["id"] for i in range(2)]
    jobs.append(client.submit(MODEL, "boom")["id"])
    done = [client.wait(job_id) for job_id in jobs]
    assert [job["status"] for job in done] == ["succeeded"] * 8 + ["failed"]

    first = scrape(url)
    assert total(first, "worker_jobs_total", model=MODEL, priority="high", status="succeeded") == 6
    assert total(first, "worker_jobs_total", model=MODEL, priority="low", status="succeeded") == 2
    assert total(first, "worker_jobs_total", model=MODEL, priority="normal", status="failed") == 1
    assert total(first, "job_e2e_seconds_count", model=MODEL, status="succeeded") == 8
    assert total(first, "job_e2e_seconds_count", model=MODEL, status="failed") == 1
    assert total(first, "job_e2e_seconds_sum", model=MODEL) > 0
    assert total(first, "job_e2e_seconds_bucket", model=MODEL, priority="high", status="succeeded", le="+Inf") == 6
    assert total(first, "job_queue_wait_seconds_count", model=MODEL) == 9
    assert total(first, "job_queue_wait_seconds_count", model=MODEL, priority="low") == 2
    assert total(first, "batch_size_sum", model=MODEL) == 9            # every job ran once
    assert total(first, "batch_inputs_sum", model=MODEL) == 6 + 2 * 3 + 1
    calls = total(first, "batch_size_count", model=MODEL)
    assert 1 <= calls <= 9 and total(first, "inference_seconds_count", model=MODEL) == calls
    assert total(first, "model_load_seconds", model=MODEL) > 0
    assert total(first, "model_loads_total", model=MODEL) >= 1

    # Kill the pool processes (idle now): their samples stay, their replacements add theirs.
    directory = os.path.join(stack_env["METRICS_DIR"], node)
    old = pool_pids(worker)
    assert len(old) == 2 and old <= pids_in(directory) | old
    for pid in old:
        os.kill(int(pid), signal.SIGKILL)
    wait_until(lambda: len(pool_pids(worker)) == 2 and not pool_pids(worker) & old, 60, "new pool processes")
    after = [client.run(MODEL, f"after {i}") for i in range(4)]
    assert all(str(job["result"]["pid"]) not in old for job in after)

    second = scrape(url)
    assert total(second, "worker_jobs_total", model=MODEL, priority="high", status="succeeded") == 6
    assert total(second, "worker_jobs_total", model=MODEL, priority="normal", status="succeeded") == 4
    assert total(second, "batch_size_sum", model=MODEL) == 13
    assert total(second, "model_loads_total", model=MODEL) >= total(first, "model_loads_total", model=MODEL) + 1
    writers = pids_in(directory)
    assert writers & old and writers - old  # files from the dead processes and from a new one


def test_api_metrics_add_up_every_gunicorn_process(client, api, stack_env):
    url = f"{api}/metrics"
    fresh = {"Connection": "close"}  # a new connection per request: both gunicorn processes take some
    directory = os.path.join(stack_env["METRICS_DIR"], "api-127.0.0.1-" + api.rsplit(":", 1)[1])

    def both_processes_wrote():
        requests.get(f"{api}/healthz", headers=fresh, timeout=10)
        return len(pids_in(directory)) == 2

    wait_until(both_processes_wrote, 60, "requests served by both gunicorn processes", interval=0.01)
    before = scrape(url)
    for i in range(10):
        assert requests.post(f"{api}/jobs", json={"model": "flaky", "input": f"api {i}"}, headers=fresh,
                             timeout=10).status_code == 202
    bad = requests.post(f"{api}/jobs", json={"model": "flaky", "input": 12}, headers=fresh, timeout=10)
    assert bad.status_code == 400
    reason = bad.json()["error"]["type"]
    for _ in range(2):
        requests.post(f"{api}/jobs", json={"model": "flaky", "input": 12}, headers=fresh, timeout=10)
        assert requests.post(f"{api}/jobs", json={"model": "no-such-model", "input": "x"}, headers=fresh,
                             timeout=10).status_code == 404
    assert requests.request("BREW", f"{api}/jobs", headers=fresh, timeout=10).status_code in (400, 405)
    huge = requests.post(f"{api}/jobs", json={"model": "flaky", "input": "x" * 3_000_000}, headers=fresh, timeout=30)
    assert huge.status_code == 413  # over MAX_BODY_BYTES: its model is never read
    waiting = [client.submit("idle", f"wait {i}", priority=p)["id"] for i, p in enumerate(["high", "high", "low"])]
    try:
        for _ in range(6):  # answered by either process: each sees every process's samples
            now = scrape(url)

            def delta(name, **labels):
                return total(now, name, **labels) - total(before, name, **labels)

            assert delta("api_request_seconds_count", method="POST", route="/jobs", status="202") == 13
            assert delta("api_jobs_rejected_total", model="flaky", reason=reason) == 3
            assert delta("api_jobs_rejected_total", model="other", reason="unknown_model") == 2
            assert delta("api_jobs_rejected_total", model="other", reason="too_large") == 1
            assert total(now, "cluster_up") == 1
            assert not any(("method", "BREW") in labels for _name, labels in now)  # made-up methods: "other"
            assert delta("api_request_seconds_count", method="other", status="405") == 1
            assert delta("jobs_submitted_total", model="idle", priority="high") == 2
            assert total(now, "queue_depth", model="idle", priority="high") >= 2
            assert total(now, "queue_depth", model="idle", priority="low") >= 1
            assert total(now, "jobs_unfinished", model="idle") >= 3
            assert total(now, "workers_live", model="flaky") >= 1
    finally:
        for job_id in waiting:
            client.delete(f"/jobs/{job_id}")


def metric_names(expr: str) -> set[str]:
    """The series a PromQL expression reads: identifiers that are not functions, label lists,
    matchers or ranges."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)", " ", expr)
    return {m.group(1) for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare)
            if not re.fullmatch(r"\d.*|e", m.group(1))}


def test_metric_names_reads_promql():
    assert metric_names('sum by (model, le) (rate(a_bucket{model=~"$model"}[5m])) / max without (instance) '
                        '(b_total{x="y"}) + histogram_quantile(0.95, c)') == {"a_bucket", "b_total", "c"}


def test_grafana_dashboard_charts_only_metrics_that_exist(client, metered, api):
    _worker, _node, url = metered
    client.run(MODEL, "for the dashboard")
    assert client.post("/jobs", json={"model": "no-such-model", "input": "x"}).status_code == 404  # a refusal
    exported = {name for name, _labels in scrape(url)} | {name for name, _labels in scrape(f"{api}/metrics")}
    dashboard = json.loads((ROOT / "grafana" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    named = defaultdict(list)
    for expr in exprs:
        for name in metric_names(expr):
            named[name].append(expr)
    assert named and set(named) <= exported, sorted(set(named) - exported)
    uses = set(named)
    for needed in ("job_e2e_seconds_bucket", "job_queue_wait_seconds_bucket", "batch_size_sum",
                   "inference_seconds_bucket", "queue_depth", "model_load_seconds", "jobs_submitted_total",
                   "jobs_finished_total", "api_jobs_rejected_total", "api_request_seconds_bucket"):
        assert needed in uses, needed
    # the model variable is filled from a metric the API exports
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    assert re.search(r"label_values\((\w+), model\)", variable["definition"]).group(1) in exported
