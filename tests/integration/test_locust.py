"""locustfile.py, run headless for real: a short quiet -> burst -> quiet against the session stack
(gunicorn API, real workers for minilm, sentiment and efficientnet-lite0).

Every job is reported as a request of type JOB named <model>/<priority>; the run must end with exit
code 0 (locust's code for: no failed request, no exception in a user), JOB rows for every model,
and the CSV and HTML reports written.
"""

from __future__ import annotations

import csv
import os
import subprocess
from collections import Counter

from tests.procs import ROOT, VENV_BIN

MODELS = ("minilm", "sentiment", "efficientnet-lite0")
SHAPE = {"LOAD_USERS_QUIET": "1", "LOAD_USERS_BURST": "6", "LOAD_PHASE_S": "7", "LOAD_SPAWN_RATE": "6",
         "LOAD_SEED": "20261122", "LOAD_THINK_S": "0.1-0.5", "LOAD_GIVE_UP_S": "60",
         "LOAD_MIX": "minilm=2,sentiment=2,efficientnet-lite0=1"}


def test_a_short_burst_reports_every_job_with_its_latency(client, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOAD_") and k != "API_KEY"}
    env.update(SHAPE, PYTHONPATH=str(ROOT))
    argv = [str(VENV_BIN / "locust"), "-f", str(ROOT / "locustfile.py"), "--headless", "--host", client.base,
            "--run-time", "60s", "--csv", str(tmp_path / "stats"), "--html", str(tmp_path / "report.html"),
            "--only-summary", "--loglevel", "WARNING"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    output = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, output

    with open(tmp_path / "stats_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    jobs, failures, names = Counter(), Counter(), set()
    for row in rows:
        if row["Type"] == "JOB":
            model, _, priority = row["Name"].rpartition("/")
            assert priority in {"high", "normal", "low"}, row["Name"]
            jobs[model] += int(row["Request Count"])
            failures[model] += int(row["Failure Count"])
            names.add(row["Name"])
        elif row["Type"] in {"POST", "GET"}:
            names.add(f'{row["Type"]} {row["Name"]}')
    assert all(jobs[m] > 0 for m in MODELS), (jobs, output)
    assert sum(failures.values()) == 0, (failures, output)
    # HTTP calls are named by route, never by job id
    assert {"POST /jobs", "GET /jobs/[id]"} <= names, names
    assert not any("/jobs/" in n and "[id]" not in n for n in names), names
    # every submitted job was followed to its end and reported (the graceful stop lets the last ones finish)
    posts = sum(int(r["Request Count"]) for r in rows if r["Type"] == "POST")
    assert sum(jobs.values()) == posts, (jobs, posts)

    report = tmp_path / "report.html"
    assert report.exists() and report.stat().st_size > 10_000
    assert "efficientnet-lite0/" in report.read_text(errors="replace")
