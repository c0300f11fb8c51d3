"""The open-loop submitter for our API, in a process of its own (``bench.py`` runs it).

It shares a core with the API and Redis, as the benchmark pins them, so what it spends per request
is taken from the system it measures. It is asyncio on uvloop, with httptools (the C parser uvicorn
uses) reading the responses, over keep-alive connections. In the open loop (320 jobs/s for 10 s,
start-up counted, side by side, 3 rounds) it spent 0.245-0.257 ms of CPU per job, against
0.516-0.581 ms for gevent with geventhttpclient (what locust's FastHttpUser runs on, and this file
before) and 0.713-0.741 ms for urllib3 from a thread pool.

stdin: one JSON object: api, model, items, rate (jobs/s), seconds, priorities ([[name, weight],
...]), seed, concurrency. It prints ``ready``, reads one more line (go), sends Poisson arrivals at
``rate`` for ``seconds`` (the same schedule, seed for seed, as ``bench.open_loop``'s threads), and
prints one JSON object: ``{"arrivals": [[scheduled epoch s, priority, job id or null], ...]}``.
An arrival waits for a free connection when all ``concurrency`` are busy; its time still runs from
when it was scheduled.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from urllib.parse import urlsplit

import httptools
import orjson
import uvloop

#: Seconds to wait for a response (as ``bench.Ours``'s read timeout).
TIMEOUT_S = 60.0


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.body: list[bytes] = []

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """(status, body). ConnectionError if the connection closes before a whole response."""
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(TIMEOUT_S, self._fail, TimeoutError(f"no response in {TIMEOUT_S:g} s"))
        self.transport.write(data)
        try:
            status, body, keep_alive = await self.waiter
        finally:
            timer.cancel()
        if not keep_alive and self.transport is not None:
            self.transport.close()
        return status, body

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"unreadable response: {exc}"))

    def connection_lost(self, exc) -> None:
        self._fail(ConnectionError("the connection closed without a response"))
        self.transport = None

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), body, self.parser.should_keep_alive()))


class Client:
    """POSTs to one URL over up to ``size`` connections, opened as needed."""

    def __init__(self, url: str, size: int) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.netloc = parts.hostname, parts.port or 80, parts.netloc
        self.path = parts.path.rstrip("/")
        # Last in, first out: at low rates a few connections stay busy rather than all going idle
        # long enough for the server's keep-alive timeout to close them.
        self.free: asyncio.LifoQueue = asyncio.LifoQueue()
        for _ in range(size):
            self.free.put_nowait(None)  # (not connected yet)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        data = (f"POST {self.path}{path} HTTP/1.1\r\nHost: {self.netloc}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        conn = await self.free.get()
        try:
            for attempt in (1, 2):
                if conn is None or not conn.usable():
                    _, conn = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
                try:
                    return await conn.request(data)
                except ConnectionError:
                    # gunicorn closes a keep-alive connection idle for 2 s; a request sent on it just
                    # as it closes gets no response and was not handled: send it once more on a fresh
                    # connection, as bench.Ours does.
                    conn = None
                    if attempt == 2:
                        raise
        finally:
            self.free.put_nowait(conn if conn is not None and conn.usable() else None)

    def close(self) -> None:
        while not self.free.empty():
            conn = self.free.get_nowait()
            if conn is not None and conn.usable():
                conn.transport.close()


async def open_loop(spec: dict) -> list:
    client = Client(spec["api"], spec["concurrency"])
    items, model = spec["items"], spec["model"]
    names, weights = zip(*spec["priorities"])
    rng = random.Random(spec["seed"])
    arrivals: list = []

    async def send(i: int, at: float, priority: str) -> None:
        job_id = None
        try:
            status, data = await client.post("/jobs", orjson.dumps(
                {"model": model, "input": items[i % len(items)], "priority": priority}))
            if status == 202:
                job_id = orjson.loads(data)["id"]
        except Exception:  # counted as failed, as bench.open_loop counts a submit that raised
            pass
        arrivals.append((at, priority, job_id))

    sending = []
    start, i, next_at = time.time(), 0, 0.0
    while next_at < spec["seconds"]:
        delay = start + next_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sending.append(asyncio.create_task(send(i, start + next_at, rng.choices(names, weights)[0])))
        i += 1
        next_at += rng.expovariate(spec["rate"])
    await asyncio.gather(*sending)
    client.close()
    return sorted(arrivals)


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    print("ready", flush=True)
    sys.stdin.readline()
    arrivals = uvloop.run(open_loop(spec))
    # Not through sys.stdout: after uvloop.run, a write to it longer than the pipe holds (64 KiB)
    # loses the rest when the reader is not draining at that moment, with no error (uvloop 0.23).
    with open(sys.stdout.fileno(), "w", closefd=False) as out:
        out.write(json.dumps({"arrivals": arrivals}) + "\n")


if __name__ == "__main__":
    main()
