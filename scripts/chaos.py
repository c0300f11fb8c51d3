"""make chaos: run the whole stack, submit jobs while breaking it, and account for every job.

Starts its own stack (``scripts/stack.py up``) in its own VAR_DIR (default ``var/chaos``) on free
ports, so it never touches a running ``make up``. With crash injection on
(``FAULT_CRASH_PROBABILITY``) and a short ``VISIBILITY_TIMEOUT_S``, several threads submit jobs
across models and priorities (single inputs and ``inputs`` lists, images for image models, some
with a short ``timeout_s``, some cancelled right after submission, some repeated with the same
``Idempotency-Key``) while a chaos thread, at intervals:

* SIGKILLs a worker's main process (supervisord restarts it),
* SIGKILLs a worker's pool process,
* SIGTERMs a worker (warm shutdown; supervisord restarts it),
* restarts Redis (``supervisorctl restart redis``),
* SIGKILLs redis-server (supervisord restarts it; the AOF keeps the data).

Then it waits (bounded) until every accepted job is terminal and prints a ledger: submitted,
accepted, refused (by status), succeeded, failed (by error type), expired, cancelled, lost
(accepted but never terminal) and model executions beyond one per job, with the faults injected
and the wall time. It exits 1 when a job is lost (or a contract check fails), and always tears the
stack down (also on Ctrl-C or SIGTERM) unless --keep.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.registry import Registry  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = VENV_BIN / "python" if (VENV_BIN / "python").exists() else Path(sys.executable)
DEFAULT_MODELS = "minilm,sentiment,efficientnet-lite0"
TERMINAL = ("succeeded", "failed", "cancelled", "expired")
FAULT_KINDS = ("worker_sigkill", "pool_sigkill", "worker_sigterm", "redis_restart", "redis_sigkill")
MARKER = ".chaos-var"
CRASH_LINE = "FAULT_CRASH_PROBABILITY: this pool process exits now"

WORDS = ("the service was great and the staff were friendly but the food arrived cold and late "
         "I would recommend this product to anyone who needs a reliable tool for daily work "
         "terrible experience never again broken on arrival support did not answer emails "
         "a quiet afternoon by the river with a good book and a cup of tea").split()


def now_iso(ts: float | None = None) -> str:
    dt = datetime.fromtimestamp(time.time() if ts is None else ts, tz=timezone.utc)
    return dt.strftime("%H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[chaos {now_iso()}] {msg}", flush=True)


class Interrupted(Exception):
    pass


# -- the stack ------------------------------------------------------------------------------------
class Stack:
    """scripts/stack.py up/down in our own VAR_DIR, plus supervisorctl and /proc helpers."""

    def __init__(self, var: Path, env: dict[str, str]):
        self.var = var
        self.env = env
        self.conf = var / "supervisord.conf"

    def stack_py(self, cmd: str, timeout: float, logname: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(PYTHON), str(ROOT / "scripts" / "stack.py"), cmd], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        (self.var / "log").mkdir(parents=True, exist_ok=True)
        (self.var / "log" / logname).write_text(proc.stdout + proc.stderr)
        return proc

    def ctl(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=timeout)
        return proc.stdout + proc.stderr

    def running(self) -> bool:
        if not self.conf.exists() or not (self.var / "supervisor.sock").exists():
            return False
        try:
            return self.ctl("pid", timeout=15).strip().isdigit()
        except subprocess.TimeoutExpired:
            return False

    def status(self) -> dict[str, tuple[str, int]]:
        """program -> (state, pid); pid 0 unless RUNNING."""
        out = {}
        for line in self.ctl("status").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] and not line.startswith(("unix://", "error")):
                m = re.search(r"pid (\d+)", line)
                out[parts[0]] = (parts[1], int(m.group(1)) if m else 0)
        return out

    def wait_running(self, program: str, timeout: float, stop: threading.Event | None = None) -> int:
        """The pid of ``program`` once supervisord says RUNNING; 0 if not within ``timeout``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not (stop and stop.is_set()):
            state, pid = self.status().get(program, ("?", 0))
            if state == "RUNNING" and pid:
                return pid
            time.sleep(0.5)
        return 0

    def wait_all_running(self, timeout: float) -> dict[str, tuple[str, int]]:
        end = time.monotonic() + timeout
        status = self.status()
        while time.monotonic() < end:
            status = self.status()
            if status and all(state == "RUNNING" for state, _ in status.values()):
                break
            time.sleep(1)
        return status

    def our_processes(self) -> list[dict]:
        """Every process that belongs to this VAR_DIR's stack (by environment or command line),
        except this script and its ancestors."""
        mine = {os.getpid()}
        pid = os.getpid()
        while pid > 1:
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
            mine.add(pid)
        var = str(self.var)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in mine:
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                environ = (entry / "environ").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if f"VAR_DIR={var}".encode() in environ or f"{var}/supervisord.conf" in cmdline \
                    or f"{var}/redis.conf" in cmdline:
                found.append({"pid": int(entry.name), "ppid": ppid, "cmdline": cmdline[:200]})
        return found

    def orphans(self) -> list[dict]:
        """Worker processes of ours whose parent is neither supervisord nor a supervised worker:
        pool processes left behind by a killed worker main process."""
        procs = self.our_processes()
        supervisord = [p["pid"] for p in procs if "supervisord" in p["cmdline"]]
        mains = {p["pid"] for p in procs if p["ppid"] in supervisord}
        return [p for p in procs if "celery" in p["cmdline"] and p["pid"] not in mains
                and p["ppid"] not in mains and p["ppid"] not in supervisord]

    def children(self, pid: int) -> list[int]:
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return out


# -- the job mix ----------------------------------------------------------------------------------
def make_images(rng: random.Random, n: int = 12) -> list[str]:
    from PIL import Image, ImageDraw

    images = []
    for i in range(n):
        w, h = rng.randint(32, 160), rng.randint(32, 160)
        img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 6)):
            x0, y0 = rng.randint(0, w - 1), rng.randint(0, h - 1)
            x1, y1 = rng.randint(x0, w), rng.randint(y0, h)
            draw.ellipse((x0, y0, x1, y1), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG" if i % 2 else "PNG", quality=85)
        images.append(base64.b64encode(buf.getvalue()).decode())
    return images


def plan_jobs(n: int, specs: list, rng: random.Random, images: list[str]) -> list[dict]:
    """n submissions: model, priority, body, intent (normal/expiring/cancel), replay flag, key."""
    weights = [1 if spec.input_kind == "image" else 2 for spec in specs]
    jobs = []
    for i in range(n):
        spec = rng.choices(specs, weights)[0]
        priority = rng.choices(("high", "normal", "low"), (25, 45, 30))[0]

        def item():
            if spec.input_kind == "image":
                value = {"image_b64": rng.choice(images)}
                if spec.task == "zero-shot-image":
                    value["labels"] = ["a photo of a cat", "a photo of a dog"]
                return value
            return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))

        body = {"model": spec.name, "priority": priority}
        if rng.random() < 0.25:
            body["inputs"] = [item() for _ in range(rng.randint(2, 3 if spec.input_kind == "image" else 6))]
        else:
            body["input"] = item()
        roll = rng.random()
        intent = "expiring" if roll < 0.10 else "cancel" if roll < 0.18 else "normal"
        if intent == "expiring":  # log-uniform 50 ms .. 2 s: most expire only when the system is stalled
            body["timeout_s"] = round(math.exp(rng.uniform(math.log(0.05), math.log(2.0))), 3)
        replay = intent != "cancel" and rng.random() < 0.06
        jobs.append({"n": i, "model": spec.name, "priority": priority, "body": body, "intent": intent,
                     "replay": "concurrent" if replay and rng.random() < 0.5 else "after" if replay else None,
                     "key": f"chaos-{uuid.UUID(int=rng.getrandbits(128))}"})
    return jobs


# -- the run --------------------------------------------------------------------------------------
class Chaos:
    def __init__(self, args, stack: Stack, api: str, models: list[str]):
        self.args = args
        self.stack = stack
        self.api = api
        self.models = models
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.local = threading.local()
        self.responses: collections.Counter = collections.Counter()  # every POST answer, retries included
        self.refused: collections.Counter = collections.Counter()  # final outcome of a submission
        self.accepted: dict[str, dict] = {}  # job id -> record
        self.submitted = 0
        self.not_submitted = 0
        self.violations: list[str] = []
        self.cancels: collections.Counter = collections.Counter()
        self.replays: collections.Counter = collections.Counter()
        self.faults: list[dict] = []
        self.fault_failures: list[str] = []

    def session(self) -> requests.Session:
        if not hasattr(self.local, "s"):
            self.local.s = requests.Session()
        return self.local.s

    def violation(self, msg: str) -> None:
        with self.lock:
            self.violations.append(msg)
        log(f"VIOLATION: {msg}")

    # -- submitting --
    def post(self, job: dict, history: list | None = None) -> tuple[str, str]:
        """('accepted', id) or ('refused', reason). 503/409 and connection errors are retried with
        the same Idempotency-Key for up to --submit-retry-s; 429 and 4xx are final. Each answer is
        appended to ``history`` as (wall time, status)."""
        end = time.monotonic() + self.args.submit_retry_s
        reason = "no answer"
        history = [] if history is None else history
        while True:
            history.append([now_iso(), "sent"])
            try:
                r = self.session().post(f"{self.api}/jobs", json=job["body"],
                                        headers={"Idempotency-Key": job["key"]}, timeout=30)
                try:
                    etype = r.json().get("error", {}).get("type", "") if r.status_code != 202 else ""
                except ValueError:
                    etype = "non-json"
                with self.lock:
                    self.responses[f"{r.status_code} {etype}".strip()] += 1
                history[-1][1] = f"{r.status_code} {etype}".strip()
                if r.status_code == 202:
                    return "accepted", r.json()["id"]
                reason = f"{r.status_code} {etype}".strip()
                if r.status_code not in (503, 409):
                    return "refused", reason
                wait = min(2.0, float(r.headers.get("Retry-After") or 1))
            except requests.RequestException as exc:
                with self.lock:
                    self.responses[f"connection error ({type(exc).__name__})"] += 1
                history[-1][1] = f"connection error ({type(exc).__name__})"
                reason, wait = f"connection error ({type(exc).__name__})", 0.5
            if time.monotonic() + wait > end or self.stop.is_set():
                return "refused", f"{reason} (gave up retrying)"
            time.sleep(wait)

    def cancel(self, job_id: str) -> str:
        end = time.monotonic() + self.args.submit_retry_s
        while True:
            try:
                r = self.session().delete(f"{self.api}/jobs/{job_id}", timeout=30)
                if r.status_code == 200:
                    return "200 cancelled"
                if r.status_code == 409:
                    return "409 too late"
                reason = str(r.status_code)
            except requests.RequestException as exc:
                reason = f"connection error ({type(exc).__name__})"
            if time.monotonic() > end or self.stop.is_set():
                return f"{reason} (gave up)"
            time.sleep(0.5)

    def submit_one(self, job: dict) -> None:
        twin = None
        history: list = []  # every POST of this submission (and its replay), in order
        if job["replay"] == "concurrent":
            twin_result = {}
            twin = threading.Thread(target=lambda: twin_result.update(r=self.post(job, history)), daemon=True)
            twin.start()
        verdict, detail = self.post(job, history)
        with self.lock:
            self.submitted += 1
        results = [(verdict, detail)]
        if twin is not None:
            twin.join(self.args.submit_retry_s + 60)
            results.append(twin_result.get("r", ("refused", "twin did not answer")))
        elif job["replay"] == "after":
            results.append(self.post(job, history))
        ids = {d for v, d in results if v == "accepted"}
        if job["replay"]:
            with self.lock:
                self.replays["replayed submissions"] += 1
                if len(ids) > 1:
                    self.replays["DIFFERENT ids"] += 1
                elif len(ids) == 1 and all(v == "accepted" for v, _ in results):
                    self.replays["same id"] += 1
                else:
                    self.replays["one or both refused"] += 1
            if len(ids) > 1:
                self.violation(f"Idempotency-Key {job['key']} gave two jobs: {sorted(ids)}")
        if not ids:
            with self.lock:
                self.refused[results[0][1]] += 1
            return
        for job_id in ids:
            record = {"id": job_id, "model": job["model"], "priority": job["priority"], "intent": job["intent"],
                      "replay": job["replay"], "timeout_s": job["body"].get("timeout_s"),
                      "n_inputs": len(job["body"].get("inputs") or [0]), "accepted_at": time.time(),
                      "cancel": None, "final": None, "posts": history}
            with self.lock:
                self.accepted[job_id] = record
            if job["intent"] == "cancel":
                record["cancel"] = self.cancel(job_id)
                with self.lock:
                    self.cancels[record["cancel"]] += 1

    def submitter(self, jobs: list[dict], start: float, window: float, hard_end: float) -> None:
        n = len(jobs)
        while not self.stop.is_set():
            with self.lock:
                if not self.queue:
                    return
                job = self.queue.popleft()
            due = start + window * job["n"] / max(1, n)
            delay = due - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            if self.stop.is_set() or time.monotonic() > hard_end:
                with self.lock:
                    self.not_submitted += 1
                continue
            try:
                self.submit_one(job)
            except Exception as exc:  # a bug here must not hide the rest of the run
                self.violation(f"submitter crashed on job #{job['n']}: {exc!r}")

    def submit_all(self, jobs: list[dict], start: float, window: float, hard_end: float) -> list[threading.Thread]:
        self.queue = collections.deque(jobs)
        threads = [threading.Thread(target=self.submitter, args=(jobs, start, window, hard_end), daemon=True,
                                    name=f"submit-{i}") for i in range(self.args.threads)]
        for t in threads:
            t.start()
        return threads

    # -- faults --
    def inject(self, kind: str, model: str) -> dict | None:
        stack = self.stack
        program = "redis" if kind.startswith("redis") else f"worker-{model}"
        pid = stack.wait_running(program, 60, self.stop)
        if not pid:
            self.fault_failures.append(f"{kind}: {program} not RUNNING within 60s")
            return None
        event = {"t": time.time(), "at": now_iso(), "kind": kind, "program": program, "pid": pid}
        try:
            if kind == "worker_sigkill":
                os.kill(pid, signal.SIGKILL)
            elif kind == "worker_sigterm":
                os.kill(pid, signal.SIGTERM)
            elif kind == "pool_sigkill":
                end = time.monotonic() + 30
                kids = stack.children(pid)
                while not kids and time.monotonic() < end and not self.stop.is_set():
                    time.sleep(0.5)
                    kids = stack.children(pid)
                if not kids:
                    self.fault_failures.append(f"{kind}: {program} (pid {pid}) had no pool process")
                    return None
                event["pid"] = kids[0]
                event["parent"] = pid
                os.kill(kids[0], signal.SIGKILL)
            elif kind == "redis_sigkill":
                os.kill(pid, signal.SIGKILL)
            elif kind == "redis_restart":
                event["supervisorctl"] = stack.ctl("restart", "redis").strip().replace("\n", "; ")
        except ProcessLookupError:
            self.fault_failures.append(f"{kind}: pid {pid} was already gone")
            return None
        return event

    def chaos(self, start: float, window: float, schedule: list[str], rng: random.Random) -> None:
        interval = window / (len(schedule) + 1)
        worker_models = collections.deque(rng.sample(self.models, len(self.models)))
        for i, kind in enumerate(schedule):
            due = start + interval * (i + 1)
            if self.stop.wait(max(0.0, due - time.monotonic())):
                return
            model = ""
            if not kind.startswith("redis"):
                model = worker_models[0]
                worker_models.rotate(-1)
            event = self.inject(kind, model)
            if event:
                with self.lock:
                    self.faults.append(event)
                log(f"fault {len(self.faults)}/{len(schedule)}: {kind} {event['program']} pid {event['pid']}")

    # -- waiting --
    def poll(self, job_id: str) -> dict | None:
        try:
            r = self.session().get(f"{self.api}/jobs/{job_id}", timeout=30)
        except requests.RequestException as exc:
            return {"status": f"poll error ({type(exc).__name__})"}
        if r.status_code == 200:
            return r.json()
        if r.status_code == 404:
            return {"status": "missing (404)"}
        return {"status": f"poll error ({r.status_code})"}

    def drain(self, timeout: float) -> float:
        """Poll every non-terminal job until all are terminal or ``timeout`` passes."""
        start = time.monotonic()
        last_report = 0.0
        with ThreadPoolExecutor(self.args.threads) as pool:
            while True:
                pending = [r for r in self.accepted.values()
                           if not (r["final"] and r["final"].get("status") in TERMINAL)]
                if pending:
                    for record, view in zip(pending, pool.map(lambda r: self.poll(r["id"]), pending)):
                        record["final"] = view
                    pending = [r for r in pending if r["final"].get("status") not in TERMINAL]
                elapsed = time.monotonic() - start
                if not pending or elapsed > timeout:
                    return elapsed
                if elapsed - last_report >= 10:
                    last_report = elapsed
                    states = collections.Counter(r["final"].get("status") for r in pending)
                    log(f"waiting: {len(pending)} not terminal after {elapsed:.0f}s: {dict(states)}")
                time.sleep(2)


# -- diagnostics ----------------------------------------------------------------------------------
def crash_count(var: Path) -> tuple[int, int]:
    """(injected crashes logged by pool processes, batches the worker main processes reported lost)."""
    crashes = lost = 0
    for path in (var / "log").glob("worker-*.log*"):
        text = path.read_text(errors="replace")
        crashes += text.count(CRASH_LINE)
        lost += len(re.findall(r"batch of \d+ lost", text))
    return crashes, lost


def _aof_commands(path: Path):
    """The commands of one AOF file (RESP arrays), as lists of bytes."""
    data = path.read_bytes()
    i, n = 0, len(data)
    while i < n:
        if data[i:i + 1] != b"*":  # an annotation or a timestamp line
            i = data.index(b"\n", i) + 1
            continue
        j = data.index(b"\r\n", i)
        count, i = int(data[i + 1:j]), j + 2
        args = []
        for _ in range(count):
            j = data.index(b"\r\n", i)
            size, i = int(data[i + 1:j]), j + 2
            args.append(data[i:i + size])
            i += size + 2
        yield args


def aof_history(var: Path, job_ids: list[str]) -> dict[str, list[str]]:
    """What Redis' append-only file says happened to each job's message: published (LPUSH), popped
    by a consumer (a served BRPOP is logged as RPOP; found by replaying the queue lists), recorded
    as unacked by that consumer (HSET unacked), acked or restored. The AOF is replayed from the
    start of the run, so a rewrite during the run hides the earlier history."""
    aof_dir = var / "redis" / "appendonlydir"
    manifest = aof_dir / "appendonly.aof.manifest"
    out: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    if not manifest.exists():
        return {job_id: ["no AOF to read"] for job_id in job_ids}
    files = [line.split()[1] for line in manifest.read_text().splitlines() if line.startswith("file ")]
    needles = {job_id: job_id.encode() for job_id in job_ids}
    lists: dict[bytes, collections.deque] = collections.defaultdict(collections.deque)
    k = 0
    for name in files:
        path = aof_dir / name
        if name.endswith(".rdb"):
            if path.stat().st_size > 200:
                for job_id in job_ids:
                    out[job_id].append(f"the AOF was rewritten during the run ({name}): earlier history is gone")
            continue
        for args in _aof_commands(path):
            k += 1
            cmd = args[0].upper()
            key = args[1] if len(args) > 1 else b""
            if key.startswith(b"jobs."):
                if cmd in (b"LPUSH", b"RPUSH"):
                    for item in args[2:]:
                        (lists[key].appendleft if cmd == b"LPUSH" else lists[key].append)(item)
                elif cmd in (b"RPOP", b"LPOP"):
                    for _ in range(int(args[2]) if len(args) > 2 else 1):
                        if not lists[key]:
                            break
                        item = lists[key].pop() if cmd == b"RPOP" else lists[key].popleft()
                        for job_id, needle in needles.items():
                            if needle in item:
                                out[job_id].append(f"#{k} {cmd.decode()} {key.decode(errors='replace')!r}: "
                                                   "popped by a consumer")
                elif cmd == b"DEL":
                    lists.pop(key, None)
            hits = [job_id for job_id, needle in needles.items() if any(needle in a for a in args[1:])]
            for job_id in hits:
                what = {b"LPUSH": "published to", b"RPUSH": "published to", b"HSET": "HSET", b"HDEL": "HDEL",
                        b"SET": "SET", b"DEL": "DEL", b"ZADD": "ZADD", b"ZREM": "ZREM"}.get(cmd, cmd.decode())
                if cmd in (b"PEXPIREAT", b"EXPIRE", b"PUBLISH"):
                    continue
                detail = ""
                if cmd == b"HSET" and key.startswith(b"job:") and len(args) > 3:
                    pairs = dict(zip(args[2::2], args[3::2]))
                    detail = " " + ",".join(f"{f.decode()}={v.decode(errors='replace')[:20]}"
                                            for f, v in pairs.items() if f in (b"status", b"attempts"))
                out[job_id].append(f"#{k} {what} {key.decode(errors='replace')[:60]!r}{detail}")
    for job_id in job_ids:
        still = [key.decode(errors="replace") for key, items in lists.items()
                 if any(needles[job_id] in item for item in items)]
        if still:
            out[job_id].append(f"at the end still in {still}")
        events = out[job_id]
        pops = [i for i, line in enumerate(events) if "popped by a consumer" in line]
        if not any("published to" in line for line in events):
            events.append("VERDICT: never published (no LPUSH of its message in the AOF)")
        elif still:
            events.append("VERDICT: its message is still waiting in Redis: no worker took it (is the model's "
                          "worker consuming? see worker_activity)")
        elif pops and not any("HSET 'unacked'" in line for line in events[pops[-1]:]):
            events.append("VERDICT: popped from its queue by a consumer that never recorded it in 'unacked' "
                          "(lost between the BRPOP and kombu's unacked HSET)")
    return out


def worker_activity(var: Path) -> dict[str, str]:
    """Per worker log: when it last logged a batch, and its last line (a stuck worker shows here)."""
    out = {}
    for path in sorted((var / "log").glob("worker-*.log")):
        lines = path.read_text(errors="replace").splitlines()
        batches = [line for line in lines if re.search(r"batch of \d+ \(", line)]  # text or JSON lines
        stamped = [line for line in lines if line.startswith(("[20", '{"time"'))]
        out[path.stem] = (f"last batch: {batches[-1][:140] if batches else 'none'} | "
                          f"last line: {stamped[-1][:140] if stamped else 'none'}")
    return out


def inspect_workers(env: dict[str, str]) -> dict[str, str]:
    """`celery inspect` of the live workers (what each holds), before the stack goes down."""
    out = {}
    for command in ("active", "reserved", "stats"):
        try:
            proc = subprocess.run([str(VENV_BIN / "celery"), "-A", "workers", "inspect", command, "--timeout", "5",
                                   "--json"], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                                  capture_output=True, text=True, timeout=60)
            text = proc.stdout.strip() or proc.stderr.strip()
        except subprocess.TimeoutExpired:
            text = "timed out"
        if command == "stats":
            try:
                stats = json.loads(text.splitlines()[-1])
                text = json.dumps({node: {"pool": v.get("pool", {}).get("processes"),
                                          "total": v.get("total"), "prefetch_count": v.get("prefetch_count")}
                                   for node, v in stats.items()})
            except (ValueError, IndexError, AttributeError):
                pass
        out[command] = text[-3000:]
    return out


def investigate(lost: list[dict], redis_url: str, var: Path, faults: list[dict]) -> list[dict]:
    """For each lost job: its record in Redis, where its message is (a queue, unacked, nowhere),
    the faults around its life, and the log lines naming it."""
    import redis

    out = []
    try:
        r = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10, decode_responses=True)
        unacked = r.hgetall("unacked")
        queues = {k: r.lrange(k, 0, -1) for k in r.scan_iter("jobs.*") if r.type(k) == "list"}
    except Exception as exc:
        r, unacked, queues = None, {}, {}
        log(f"could not read Redis for diagnostics: {exc}")
    logs = {p.name: p.read_text(errors="replace").splitlines() for p in (var / "log").glob("*.log")}
    time.sleep(1.5)  # appendfsync everysec
    try:
        history = aof_history(var, [rec["id"] for rec in lost[:10]])
    except Exception as exc:
        history = {rec["id"]: [f"could not read the AOF: {exc!r}"] for rec in lost[:10]}
    for rec in lost[:10]:
        job_id = rec["id"]
        where = [f"unacked[{tag}]" for tag, raw in unacked.items() if job_id in raw]
        where += [f"queue {name!r}" for name, items in queues.items() if any(job_id in m for m in items)]
        record = r.hgetall(f"job:{job_id}") if r is not None else {}
        created = float(record.get("created_at") or rec["accepted_at"])
        around = [f"{f['at']} ({f['t'] - created:+.3f}s from created_at) {f['kind']} {f['program']} pid {f['pid']}"
                  for f in faults if created - 10 <= f["t"]]
        lines = [f"{name}: {line.strip()[:300]}" for name, ls in logs.items() for line in ls
                 if job_id in line and "GET /jobs/" not in line]
        out.append({"id": job_id, "model": rec["model"], "priority": rec["priority"], "intent": rec["intent"],
                    "accepted_at": now_iso(rec["accepted_at"]), "view": rec["final"], "record": record,
                    "message_at": where or ["nowhere (no queue, not unacked)"],
                    "posts": rec.get("posts"), "aof": history.get(job_id, [])[:40],
                    "faults_from_10s_before_created": around[:10], "log_lines": lines[:10]})
    return out


# -- the ledger -----------------------------------------------------------------------------------
def build_ledger(c: Chaos, times: dict, crashes: tuple[int, int], orphans: list[dict],
                 leftovers: list[dict], diagnostics: list[dict]) -> dict:
    records = list(c.accepted.values())
    final = collections.Counter()
    failed = collections.Counter()
    lost = []
    attempts = collections.Counter()
    by_intent: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for rec in records:
        view = rec["final"] or {"status": "never polled"}
        status = view.get("status")
        by_intent[rec["intent"]][status if status in TERMINAL else "lost"] += 1
        if status in TERMINAL:
            final[status] += 1
            if status == "failed":
                failed[(view.get("error") or {}).get("type", "?")] += 1
            attempts[int(view.get("attempts") or 0)] += 1
        else:
            lost.append(rec)
        if rec["cancel"] == "200 cancelled" and status in TERMINAL and status != "cancelled":
            c.violation(f"job {rec['id']} was cancelled (DELETE 200) but ended {status}")
        if status == "succeeded" and view.get("result") is None:
            c.violation(f"job {rec['id']} succeeded without a result")
    extra = sum(max(0, n - 1) * count for n, count in attempts.items())
    kinds = collections.Counter(f["kind"] for f in c.faults)
    return {
        "models": c.models,
        "submitted": c.submitted,
        "not_submitted_time_bound": c.not_submitted,
        "accepted": len(records),
        "refused": dict(c.refused),
        "refused_total": sum(c.refused.values()),
        "post_answers": dict(c.responses),
        "succeeded": final["succeeded"],
        "failed": sum(failed.values()),
        "failed_by_reason": dict(failed),
        "expired": final["expired"],
        "cancelled": final["cancelled"],
        "lost": len(lost),
        "lost_jobs": [{"id": r["id"], "model": r["model"], "intent": r["intent"],
                       "status": (r["final"] or {}).get("status"), "attempts": (r["final"] or {}).get("attempts"),
                       "worker": (r["final"] or {}).get("worker")} for r in lost[:10]],
        "all_accepted_terminal": not lost,
        "extra_executions": extra,
        "jobs_run_more_than_once": sum(count for n, count in attempts.items() if n > 1),
        "attempts_histogram": {str(k): v for k, v in sorted(attempts.items())},
        "by_intent": {k: dict(v) for k, v in by_intent.items()},
        "cancel_requests": dict(c.cancels),
        "idempotency_replays": dict(c.replays),
        "faults": {**{k: kinds.get(k, 0) for k in FAULT_KINDS}, "injected_crash": crashes[0]},
        "batches_reported_lost_by_workers": crashes[1],
        "fault_timeline": [{k: v for k, v in f.items() if k != "t"} for f in c.faults],
        "fault_failures": c.fault_failures,
        "orphaned_worker_processes": orphans,
        "leftover_processes_after_teardown": leftovers,
        "violations": c.violations,
        "lost_diagnostics": diagnostics,
        "times_s": {k: round(v, 1) for k, v in times.items()},
    }


def print_ledger(ledger: dict) -> None:
    def fmt(counter: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"

    t = ledger["times_s"]
    faults = ledger["faults"]
    lines = [
        "",
        "================ chaos ledger ================",
        f"models               {', '.join(ledger['models'])}",
        f"submitted            {ledger['submitted']}" + (f"  (not submitted, time bound: {ledger['not_submitted_time_bound']})"
                                                        if ledger["not_submitted_time_bound"] else ""),
        f"accepted (202)       {ledger['accepted']}",
        f"refused              {ledger['refused_total']}: {fmt(ledger['refused'])}",
        f"  POST answers       {fmt(ledger['post_answers'])}",
        f"succeeded            {ledger['succeeded']}",
        f"failed               {ledger['failed']}: {fmt(ledger['failed_by_reason'])}",
        f"expired              {ledger['expired']}",
        f"cancelled            {ledger['cancelled']}",
        f"lost                 {ledger['lost']}",
    ]
    for job in ledger["lost_jobs"]:
        lines.append(f"  {job['id']}  {job['model']:<20} {job['intent']:<9} status={job['status']} "
                     f"attempts={job['attempts']} worker={job['worker']}")
    lines += [
        f"extra executions     {ledger['extra_executions']}  (jobs run more than once: "
        f"{ledger['jobs_run_more_than_once']}; attempts histogram {ledger['attempts_histogram']})",
        f"by intent            " + "; ".join(f"{k}: {fmt(v)}" for k, v in sorted(ledger["by_intent"].items())),
        f"cancel requests      {fmt(ledger['cancel_requests'])}",
        f"idempotent replays   {fmt(ledger['idempotency_replays'])}",
        f"faults injected      " + ", ".join(f"{k} {v}" for k, v in faults.items()),
        f"  worker-reported lost batches {ledger['batches_reported_lost_by_workers']}",
    ]
    if ledger["fault_failures"]:
        lines.append(f"  faults not injected: {'; '.join(ledger['fault_failures'])}")
    lines.append(f"orphaned pool procs  {len(ledger['orphaned_worker_processes'])}"
                 + "".join(f"\n  pid {p['pid']} ppid {p['ppid']}: {p['cmdline'][:120]}"
                           for p in ledger["orphaned_worker_processes"]))
    if ledger["leftover_processes_after_teardown"]:
        lines.append(f"left after teardown  {len(ledger['leftover_processes_after_teardown'])} (killed)")
    lines.append(f"violations           {len(ledger['violations'])}"
                 + "".join(f"\n  {v}" for v in ledger["violations"][:20]))
    lines.append(f"wall time            {t.get('total', 0)} s (stack up {t.get('stack_up', 0)}, chaos window "
                 f"{t.get('chaos', 0)}, drain {t.get('drain', 0)}, teardown {t.get('teardown', 0)})")
    lines.append("==============================================")
    print("\n".join(lines), flush=True)
    for diag in ledger["lost_diagnostics"]:
        print(json.dumps(diag, indent=2), flush=True)
    if ledger.get("worker_activity"):
        print("worker activity (from the logs):", json.dumps(ledger["worker_activity"], indent=2), flush=True)
        print("celery inspect:", json.dumps(ledger["worker_inspect"], indent=2), flush=True)


# -- main -----------------------------------------------------------------------------------------
def prepare_var(var: Path) -> None:
    """Our own VAR_DIR: never the one `make up` uses; fresh Redis data and logs every run."""
    if var.resolve() == (ROOT / "var").resolve():
        sys.exit("error: --var-dir must not be the var/ that `make up` uses")
    if var.exists() and any(var.iterdir()) and not (var / MARKER).exists():
        sys.exit(f"error: {var} exists and was not made by chaos.py; pick another --var-dir")
    var.mkdir(parents=True, exist_ok=True)
    (var / MARKER).write_text("made by scripts/chaos.py; deleted data is Redis AOF and logs of chaos runs\n")
    for sub in ("redis", "log"):
        shutil.rmtree(var / sub, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000, help="submissions (default 3000)")
    parser.add_argument("--duration", type=float, default=120,
                        help="seconds of the chaos window: submissions are spread over it and the faults "
                             "injected during it (default 120)")
    parser.add_argument("--drain-timeout", type=float, default=None,
                        help="seconds to wait after the window for every job to be terminal "
                             "(default: visibility timeout + 120)")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list (default {DEFAULT_MODELS})")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the ledger as JSON here")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    parser.add_argument("--var-dir", type=Path, default=ROOT / "var" / "chaos",
                        help="the stack's VAR_DIR (default var/chaos)")
    parser.add_argument("--fault-rounds", type=int, default=3,
                        help="each fault kind is injected this many times (default 3)")
    parser.add_argument("--crash-probability", type=float, default=0.02,
                        help="FAULT_CRASH_PROBABILITY: chance per batch that the pool process dies (default 0.02)")
    parser.add_argument("--visibility-timeout", type=int, default=30,
                        help="VISIBILITY_TIMEOUT_S for the stack (default 30)")
    parser.add_argument("--threads", type=int, default=8, help="submitting/polling threads (default 8)")
    parser.add_argument("--submit-retry-s", type=float, default=60,
                        help="how long a submission answered 503 is retried with its key (default 60)")
    parser.add_argument("--up-timeout", type=float, default=420, help="seconds allowed for `stack.py up`")
    args = parser.parse_args()
    if args.jobs < 1 or args.duration <= 0 or args.fault_rounds < 0 or args.threads < 1:
        parser.error("--jobs, --duration and --threads must be positive, --fault-rounds >= 0")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    drain_timeout = args.drain_timeout if args.drain_timeout is not None else args.visibility_timeout + 120
    var = args.var_dir.resolve()

    registry = Registry.from_file(os.environ.get("MODELS_FILE", str(ROOT / "models.toml")),
                                  [m.strip() for m in args.models.split(",") if m.strip()])
    specs = list(registry)
    models = [spec.name for spec in specs]

    def interrupted(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    prepare_var(var)
    api_port, flower_port, redis_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_URL", "RESULT_BACKEND", "API_KEYS", "FAULT_DELAY_MS", "API_HOST", "FLOWER_HOST")}
    env.update({
        "VAR_DIR": str(var), "API_PORT": str(api_port), "FLOWER_PORT": str(flower_port),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "MODELS": ",".join(models),
        "FAULT_CRASH_PROBABILITY": str(args.crash_probability),
        "VISIBILITY_TIMEOUT_S": str(args.visibility_timeout),
        "MAX_QUEUED": env.get("MAX_QUEUED") or str(max(10_000, args.jobs * 2)),
        "FLOWER_BASIC_AUTH": f"chaos:{uuid.uuid4().hex[:12]}",
    })
    stack = Stack(var, env)
    api = f"http://127.0.0.1:{api_port}"
    schedule = [kind for _ in range(args.fault_rounds) for kind in FAULT_KINDS]
    rng.shuffle(schedule)
    bound = args.up_timeout + args.duration + args.submit_retry_s + 60 + drain_timeout + 200
    log(f"seed {seed}; {args.jobs} jobs over {args.duration:.0f}s on {', '.join(models)}; "
        f"{len(schedule)} faults; crash probability {args.crash_probability}; visibility timeout "
        f"{args.visibility_timeout}s; VAR_DIR {var}; API {api}; at most ~{bound:.0f}s in all")

    times: dict[str, float] = {}
    t_start = time.monotonic()
    chaos = None
    ledger = None
    code = 0
    try:
        if stack.running():
            log(f"a stack from an earlier run is still up in {var}: stopping it first")
            stack.stack_py("down", 120, "chaos-stack-down-before.log")
        up = stack.stack_py("up", args.up_timeout, "chaos-stack-up.log")
        times["stack_up"] = time.monotonic() - t_start
        if up.returncode != 0:
            print(up.stdout + up.stderr, file=sys.stderr)
            log(f"stack.py up failed (exit {up.returncode}); logs in {var / 'log'}")
            return 2
        log(f"stack up in {times['stack_up']:.1f}s")

        chaos = Chaos(args, stack, api, models)
        images = make_images(rng) if any(s.input_kind == "image" for s in specs) else []
        jobs = plan_jobs(args.jobs, specs, rng, images)
        t_chaos = time.monotonic()
        hard_end = t_chaos + args.duration + args.submit_retry_s + 60
        submitters = chaos.submit_all(jobs, t_chaos, args.duration, hard_end)
        chaos_thread = threading.Thread(target=chaos.chaos, args=(t_chaos, args.duration, schedule, rng),
                                        daemon=True, name="chaos")
        chaos_thread.start()
        next_report = t_chaos + 15
        while any(t.is_alive() for t in submitters) or chaos_thread.is_alive():
            time.sleep(0.5)
            if time.monotonic() >= next_report:
                next_report += 15
                log(f"submitted {chaos.submitted}/{args.jobs}, accepted {len(chaos.accepted)}, "
                    f"faults {len(chaos.faults)}/{len(schedule)}")
            if time.monotonic() > hard_end + 120:
                log("submitters or chaos thread still busy past the time bound: stopping them")
                chaos.stop.set()
                break
        times["chaos"] = time.monotonic() - t_chaos
        log(f"chaos window over after {times['chaos']:.1f}s: {chaos.submitted} submitted, "
            f"{len(chaos.accepted)} accepted, {len(chaos.faults)} faults; waiting for every program to run")
        status = stack.wait_all_running(120)
        not_running = {k: v[0] for k, v in status.items() if v[0] != "RUNNING"}
        if not_running:
            log(f"not RUNNING after 120s: {not_running}")
        log(f"waiting up to {drain_timeout:.0f}s for {len(chaos.accepted)} jobs to be terminal")
        times["drain"] = chaos.drain(drain_timeout)
        orphans = stack.orphans()
        lost = [r for r in chaos.accepted.values() if (r["final"] or {}).get("status") not in TERMINAL]
        diagnostics = investigate(lost, env["REDIS_URL"], var, chaos.faults) if lost else []
        ledger = build_ledger(chaos, times, crash_count(var), orphans, [], diagnostics)
        if lost:
            log("jobs are missing: asking the workers what they hold (celery inspect)")
            ledger["worker_activity"] = worker_activity(var)
            ledger["worker_inspect"] = inspect_workers(env)
        if ledger["lost"] or ledger["violations"]:
            code = 1
    except Interrupted as exc:
        log(f"interrupted ({exc}): tearing down")
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if chaos is not None:
            chaos.stop.set()
        t_down = time.monotonic()
        leftovers = []
        if args.keep:
            log(f"--keep: the stack is still up (VAR_DIR={var}, API {api}); stop it with "
                f"VAR_DIR={var} .venv/bin/python scripts/stack.py down")
        else:
            try:
                down = stack.stack_py("down", 150, "chaos-stack-down.log")
                if down.returncode != 0:
                    log(f"stack.py down failed: {(down.stdout + down.stderr)[-500:]}")
            except subprocess.TimeoutExpired:
                log("stack.py down timed out")
            time.sleep(1)
            leftovers = stack.our_processes()
            for p in leftovers:  # pool processes orphaned by a killed worker are outside supervisord's reach
                try:
                    os.kill(p["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        times["teardown"] = time.monotonic() - t_down
        times["total"] = time.monotonic() - t_start
        if ledger is not None:
            ledger["leftover_processes_after_teardown"] = leftovers
            ledger["times_s"] = {k: round(v, 1) for k, v in times.items()}
            ledger["seed"] = seed
            ledger["exit_code"] = code
            print_ledger(ledger)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(ledger, indent=2) + "\n")
            log(f"logs of this run: {var / 'log'}" + (f"; ledger JSON: {args.json}" if args.json else ""))
        elif leftovers:
            log(f"killed {len(leftovers)} processes left after teardown")
    return code


if __name__ == "__main__":
    sys.exit(main())
