"""make status: a terminal view of the running system, read straight from Redis.

Per model: the live workers (and each one's recent seconds per job), the jobs waiting by priority,
the submitted/succeeded/failed/expired/cancelled totals, and the jobs finished per second over the
last ``--interval`` seconds (the counters are read twice, that far apart). Then the most recent
failures.

Every read is a fixed handful of small keys (one pipeline per sample, no SCAN): ``workers:<model>``,
``speed:<model>``, ``waiting:<model>``, ``stats:submitted``, ``stats:finished``, and the list
``failures:recent`` (newest first, JSON per entry), where the job store keeps the last 100 failures.

    make status                         # one sample pair, then exit
    make status STATUS_ARGS=--watch     # refresh every interval until Ctrl-C
    python scripts/status.py --json     # machine-readable
Exit status 2 when Redis cannot be reached (or the models file is bad).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from kombu.utils.url import maybe_sanitize_url  # noqa: E402

import celeryconfig  # noqa: E402
import settings  # noqa: E402
from models.exceptions import ConfigError  # noqa: E402
from models.registry import Registry  # noqa: E402
from tasks.store import FAILURES_KEY, TERMINAL, JobStore  # noqa: E402

PRIORITIES = list(celeryconfig.PRIORITIES)  # high, normal, low


def redact(url: str) -> str:
    """The URL without its password."""
    return maybe_sanitize_url(url, mask="***")


def sample(store: JobStore, models: list[str], n_failures: int) -> dict:
    """Everything the view shows, in one round trip."""
    pipe = store.r.pipeline(transaction=False)
    for name in models:
        pipe.hgetall(f"workers:{name}")
        pipe.hgetall(f"speed:{name}")
        pipe.hmget(f"waiting:{name}", PRIORITIES)
    pipe.hgetall("stats:submitted")
    pipe.hgetall("stats:finished")
    pipe.lrange(FAILURES_KEY, 0, max(0, n_failures - 1))
    rows = pipe.execute()
    now = time.time()
    submitted, finished, failures = rows[-3:]
    out = {"at": now, "models": {}, "failures": [json.loads(f) for f in failures if _json_ok(f)]}
    for i, name in enumerate(models):
        beats, speeds, waiting = rows[3 * i: 3 * i + 3]
        workers = []
        for node in sorted(n for n, until in beats.items() if _float(until) >= now):
            speed = _json(speeds.get(node))
            fresh = speed if speed and _float(speed.get("until")) >= now else None
            workers.append({"name": node, "job_s": fresh.get("job_s") if fresh else None,
                            "procs": fresh.get("procs") if fresh else None})
        queued = {p: max(0, int(n or 0)) for p, n in zip(PRIORITIES, waiting)}
        out["models"][name] = {"workers": workers, "queued": queued,
                               "submitted": _sum(submitted, name), "finished": {s: 0 for s in TERMINAL}}
    for key, value in finished.items():
        parts = key.split("|")
        if len(parts) == 3 and parts[0] in out["models"] and parts[2] in TERMINAL:
            out["models"][parts[0]]["finished"][parts[2]] += int(value)
    return out


def _sum(counters: dict[str, str], model: str) -> int:
    return sum(int(v) for k, v in counters.items() if k.split("|", 1)[0] == model)


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _json(raw):
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _json_ok(raw) -> bool:
    return _json(raw) is not None


def build(first: dict, second: dict, store: JobStore, args, url: str) -> dict:
    dt = max(1e-6, second["at"] - first["at"])
    models, totals = {}, {"submitted": 0, "queued": 0, "workers": 0, "jobs_per_s": 0.0, **{s: 0 for s in TERMINAL}}
    for name, now in second["models"].items():
        before = first["models"][name]
        done_now, done_before = sum(now["finished"].values()), sum(before["finished"].values())
        rate = max(0, done_now - done_before) / dt
        models[name] = {
            "workers": now["workers"], "queued": now["queued"], "queued_total": sum(now["queued"].values()),
            "submitted": now["submitted"], **now["finished"],
            "unfinished": max(0, now["submitted"] - done_now), "jobs_per_s": round(rate, 2),
        }
        totals["submitted"] += now["submitted"]
        totals["queued"] += models[name]["queued_total"]
        totals["workers"] += len(now["workers"])
        totals["jobs_per_s"] = round(totals["jobs_per_s"] + rate, 2)
        for s in TERMINAL:
            totals[s] += now["finished"][s]
    failures = second["failures"]
    return {"redis": redact(url), "time": _iso(second["at"]), "interval_s": round(dt, 2),
            "models": models, "totals": totals,
            "recent_failures": failures}


def _iso(ts) -> str:
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clock(f: dict) -> str:
    if f.get("at"):
        return datetime.fromtimestamp(float(f["at"]), tz=timezone.utc).strftime("%m-%d %H:%M:%S")
    return "?"


def render(view: dict) -> str:
    lines = [f"{view['redis']}   {view['time']}   jobs/s over the last {view['interval_s']:.1f}s", ""]
    head = (f"{'MODEL':<20} {'WORKERS':>7} {'HIGH':>6} {'NORMAL':>6} {'LOW':>6} {'SUBMITTED':>9} "
            f"{'SUCCEEDED':>9} {'FAILED':>6} {'EXPIRED':>7} {'CANCELLED':>9} {'JOBS/S':>7}")
    lines.append(head)
    for name, m in view["models"].items():
        q = m["queued"]
        lines.append(f"{name:<20} {len(m['workers']):>7} {q['high']:>6} {q['normal']:>6} {q['low']:>6} "
                     f"{m['submitted']:>9} {m['succeeded']:>9} {m['failed']:>6} {m['expired']:>7} "
                     f"{m['cancelled']:>9} {m['jobs_per_s']:>7.1f}")
        for w in m["workers"]:
            speed = f"{w['job_s'] * 1000:.1f} ms/job" if w["job_s"] is not None else "no batch yet"
            procs = f", {w['procs']} procs" if (w.get("procs") or 1) > 1 else ""
            lines.append(f"  {w['name']}  {speed}{procs}")
        if not m["workers"]:
            lines.append("  (no live worker)")
    t = view["totals"]
    lines.append(f"{'total':<20} {t['workers']:>7} {'':>6} {'':>6} {'':>6} {t['submitted']:>9} {t['succeeded']:>9} "
                 f"{t['failed']:>6} {t['expired']:>7} {t['cancelled']:>9} {t['jobs_per_s']:>7.1f}   "
                 f"queued {t['queued']}")
    lines += ["", "Recent failures:"]
    if not view["recent_failures"]:
        lines.append("  none")
    for f in view["recent_failures"]:
        message = " ".join(str(f.get("message") or "").split())
        if len(message) > 90:
            message = message[:87] + "..."
        lines.append(f"  {_clock(f)}  {f.get('model') or '?':<18} {f.get('id')}  "
                     f"{f.get('type') or '?'}: {message}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Workers, queues, jobs/s and recent failures, from Redis.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one sample pair, then exit (the default)")
    mode.add_argument("--watch", action="store_true", help="refresh every interval until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="print JSON (with --watch: one object per line)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples (default 2)")
    parser.add_argument("--failures", type=int, default=5, help="recent failures to show (default 5)")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")

    try:
        models = Registry.from_file(settings.MODELS_FILE, settings.MODELS or None).names()
    except ConfigError as exc:
        print(f"status: {exc}", file=sys.stderr)
        return 2
    url = celeryconfig.result_backend
    store = JobStore.from_url(url, settings.JOB_TTL_S)
    store.r.connection_pool.connection_kwargs["retry"] = None  # fail once, fast: no hidden retries

    def take() -> dict:
        return sample(store, models, args.failures)

    try:
        first = take()
        while True:
            time.sleep(args.interval)
            try:
                second = take()
                view = build(first, second, store, args, url)
            except redis.RedisError as exc:
                if not args.watch:
                    raise
                print(f"\033[H\033[2Jstatus: cannot reach Redis at {redact(url)}: {exc} (retrying)", flush=True)
                continue
            out = json.dumps(view) if args.json else render(view)
            if args.watch and not args.json:
                out = "\033[H\033[2J" + out
            print(out, flush=True)
            if not args.watch:
                return 0
            first = second
    except redis.RedisError as exc:
        print(f"status: cannot reach Redis at {redact(url)}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
