"""Idle latency and a burst, against a running stack (make up): the figures quoted in the README.

    .venv/bin/python bench/burst.py [--api http://127.0.0.1:8000] [--model minilm] [--burst 64]

Prints JSON: per-job queue_ms / run_ms / end-to-end at idle (medians over --idle
jobs, one at a time), and for a burst of --burst jobs submitted at once: the
wall time from first submit to last result, and the batch sizes the workers used.
The full side-by-side benchmark (limit vs ours vs naive Celery) is bench's job in issue 6.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests


def run_job(session: requests.Session, api: str, model: str, text: str) -> tuple[dict, float]:
    start = time.perf_counter()
    job_id = session.post(f"{api}/jobs", json={"model": model, "input": text}, timeout=30).json()["id"]
    job = session.get(f"{api}/jobs/{job_id}", params={"wait": 30}, timeout=40).json()
    return job, (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--idle", type=int, default=20)
    parser.add_argument("--burst", type=int, default=64)
    args = parser.parse_args()
    session = requests.Session()
    run_job(session, args.api, args.model, "warm up")
    idle = [run_job(session, args.api, args.model, f"idle job {i}") for i in range(args.idle)]
    med = lambda xs: round(statistics.median(xs), 2)  # noqa: E731

    texts = [f"burst job number {i} with a few words" for i in range(args.burst)]
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda t: requests.post(f"{args.api}/jobs", json={"model": args.model, "input": t},
                                                    timeout=30).json()["id"], texts))
    submitted = time.perf_counter() - start
    with ThreadPoolExecutor(16) as pool:
        jobs = list(pool.map(lambda i: requests.get(f"{args.api}/jobs/{i}", params={"wait": 30},
                                                    timeout=40).json(), ids))
    wall = time.perf_counter() - start
    batches = Counter((j["worker"], j["started_at"], j["batch_size"]) for j in jobs)
    print(json.dumps({
        "model": args.model,
        "idle": {"jobs": args.idle, "queue_ms_p50": med([j["queue_ms"] for j, _ in idle]),
                 "run_ms_p50": med([j["run_ms"] for j, _ in idle]),
                 "end_to_end_ms_p50": med([ms for _, ms in idle])},
        "burst": {"jobs": args.burst, "succeeded": sum(j["status"] == "succeeded" for j in jobs),
                  "submit_s": round(submitted, 3), "wall_s": round(wall, 3),
                  "batch_sizes": sorted((size for (_, _, size) in batches), reverse=True)},
    }, indent=2))


if __name__ == "__main__":
    main()
