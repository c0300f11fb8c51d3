"""The open-loop submitter for our API, in a process of its own (``bench.py`` runs it).

It shares a core with the API and Redis, as the benchmark pins them, so what it spends per request
is taken from the system it measures. gevent greenlets on geventhttpclient (what locust's
FastHttpUser runs on, installed with locust) spent 0.25-0.30 ms of CPU per POST here, against
0.41-0.43 ms for urllib3 from a thread pool and 0.34-0.36 ms for aiohttp (4,000 POSTs each,
32 at a time). gevent patches the standard library of the whole process, hence a process.

stdin: one JSON object: api, model, items, rate (jobs/s), seconds, priorities ([[name, weight],
...]), seed, concurrency. It prints ``ready``, reads one more line (go), sends Poisson arrivals at
``rate`` for ``seconds`` (the same schedule, seed for seed, as ``bench.open_loop``'s threads), and
prints one JSON object: ``{"arrivals": [[scheduled epoch s, priority, job id or null], ...]}``.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
import orjson  # noqa: E402
from geventhttpclient import HTTPClient  # noqa: E402
from geventhttpclient.response import HTTPConnectionClosed  # noqa: E402
from geventhttpclient.url import URL  # noqa: E402


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    url = URL(spec["api"])
    client = HTTPClient(url.host, url.port, concurrency=spec["concurrency"], connection_timeout=5,
                        network_timeout=60)
    headers = {"Content-Type": "application/json"}
    items, model = spec["items"], spec["model"]
    names, weights = zip(*spec["priorities"])
    rng = random.Random(spec["seed"])
    arrivals: list = []

    def post(body: bytes):
        """gunicorn closes a keep-alive connection idle for 2 s; a request sent on one just as it
        closes gets no response and was not handled: send it once more (geventhttpclient retries
        only idempotent methods), as ``bench.Ours`` does."""
        try:
            return client.post("/jobs", body=body, headers=headers)
        except (HTTPConnectionClosed, ConnectionError):
            return client.post("/jobs", body=body, headers=headers)

    def send(i: int, at: float, priority: str) -> None:
        job_id = None
        try:
            response = post(orjson.dumps({"model": model, "input": items[i % len(items)], "priority": priority}))
            data = response.read()
            if response.status_code == 202:
                job_id = orjson.loads(data)["id"]
        except Exception:  # counted as failed, as bench.open_loop counts a submit that raised
            pass
        arrivals.append((at, priority, job_id))

    print("ready", flush=True)
    sys.stdin.readline()
    pool = gevent.pool.Pool(spec["concurrency"])
    start, i, next_at = time.time(), 0, 0.0
    while next_at < spec["seconds"]:
        delay = start + next_at - time.time()
        if delay > 0:
            gevent.sleep(delay)
        pool.spawn(send, i, start + next_at, rng.choices(names, weights)[0])  # waits while all are busy
        i += 1
        next_at += rng.expovariate(spec["rate"])
    pool.join()
    client.close()
    arrivals.sort()
    sys.stdout.write(json.dumps({"arrivals": arrivals}) + "\n")


if __name__ == "__main__":
    main()
