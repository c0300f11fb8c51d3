"""Load test with locust: users that submit a job and poll it to the end.

    .venv/bin/locust -f locustfile.py --host http://127.0.0.1:8000      # web UI on http://127.0.0.1:8089
    make load                                                            # headless, reports in $(VAR_DIR)/load/

Each user, in a loop: POST /jobs (a weighted mix of models, priorities and input sizes, images
included), then long-polls GET /jobs/<id>?wait=N until the job is terminal. Besides the HTTP calls
(named by route, "/jobs" and "/jobs/[id]"), every job is reported to locust as a request of its
own, type "JOB", named "<model>/<priority>": its response time is the end-to-end time from submit
to terminal, and it fails when the job ends failed, expired or cancelled, is refused at submission
(429/503), or polling gives up. The UI and the CSV/HTML reports thus chart job latency per model and
priority next to the HTTP calls. Note that locust's "Aggregated" row mixes both kinds.

The default load shape is quiet -> burst -> quiet (LoadTestShape below), then the run ends.
Everything is set through the environment:

    LOAD_USERS_QUIET   users in the quiet phases (default 2)
    LOAD_USERS_BURST   users in the burst (default 20)
    LOAD_PHASE_S       seconds per phase, three phases (default 20)
    LOAD_SPAWN_RATE    users started/stopped per second between phases (default LOAD_USERS_BURST)
    LOAD_SHAPE         "burst" (default) or "off": no shape, locust's own -u/-r/-t drive the run
    LOAD_MIX           model weights, "minilm=3,sentiment=2,efficientnet-lite0=1" (default)
    LOAD_PRIORITIES    priority weights, "high=1,normal=3,low=1" (default)
    LOAD_THINK_S       pause between a user's jobs, "MIN-MAX" seconds (default "0.2-1")
    LOAD_POLL_WAIT_S   ?wait= of each long poll (default 10, at most 30)
    LOAD_GIVE_UP_S     a job not terminal after this long is reported failed (default 120)
    LOAD_SEED          seed for the inputs and the mix (default: random)
    API_KEY            sent as "Authorization: Bearer <key>" when the API has API_KEYS set

With the shape, -t/--run-time (if given) caps the run; -u and -r are not used. Unless
--stop-timeout is given, users are stopped gracefully (each finishes and reports the job it is
polling) within LOAD_GIVE_UP_S, so a ramp-down does not silently drop the slowest jobs.
"""

from __future__ import annotations

import base64
import io
import os
import random
import time

import gevent
import locust.stats
from locust import LoadTestShape, between, events, task
from locust.contrib.fasthttp import FastHttpUser

TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def _weights(name: str, default: str) -> tuple[list[str], list[float]]:
    """"a=3,b=1" -> (["a", "b"], [3.0, 1.0]); a name without "=w" weighs 1."""
    names, weights = [], []
    for part in (os.environ.get(name, "").strip() or default).split(","):
        if not part.strip():
            continue
        key, _, weight = part.partition("=")
        names.append(key.strip())
        weights.append(float(weight) if weight.strip() else 1.0)
    if not names or sum(weights) <= 0:
        raise ValueError(f"{name}: no positive weight in {os.environ.get(name)!r}")
    return names, weights


MODELS, MODEL_WEIGHTS = _weights("LOAD_MIX", "minilm=3,sentiment=2,efficientnet-lite0=1")
PRIORITIES, PRIORITY_WEIGHTS = _weights("LOAD_PRIORITIES", "high=1,normal=3,low=1")
THINK_MIN, _, THINK_MAX = (os.environ.get("LOAD_THINK_S", "").strip() or "0.2-1").partition("-")
POLL_WAIT_S = min(30.0, max(0.0, _env_float("LOAD_POLL_WAIT_S", 10)))
GIVE_UP_S = _env_float("LOAD_GIVE_UP_S", 120)
API_KEY = os.environ.get("API_KEY", "").strip()
RNG = random.Random(os.environ.get("LOAD_SEED") or None)
IMAGE_MODELS = {"efficientnet-lite0"}  # any other model name gets texts

# --- inputs, made once at startup ---------------------------------------------------------------
WORDS = ("the service was quick and the staff friendly but the room was small and a bit noisy at "
         "night I would happily come back again terrible food great view awful wait lovely price "
         "broken screen excellent battery slow delivery works perfectly never again").split()


def _text(n_words: int) -> str:
    return " ".join(RNG.choice(WORDS) for _ in range(n_words)).capitalize() + "."


#: (size class, weight, how many words): short sentences, paragraphs, a page (~2 KB)
TEXT_SIZES = [("short", 6, (3, 12)), ("medium", 3, (40, 80)), ("long", 1, (300, 400))]
TEXTS = {size: [_text(RNG.randint(*words)) for _ in range(20)] for size, _, words in TEXT_SIZES}


def _image(width: int, height: int, fmt: str) -> str:
    from PIL import Image

    noise = [Image.effect_noise((width, height), RNG.uniform(20, 90)) for _ in range(2)]
    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.merge("RGB", (noise[0], gradient, noise[1]))
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode()


#: (size class, weight, (width, height), format): thumbnails, the model's own size, a photo
IMAGE_SIZES = [("small", 3, (64, 48), "PNG"), ("medium", 2, (224, 224), "JPEG"), ("large", 1, (640, 480), "JPEG")]
IMAGES = {size: [_image(*wh, fmt) for _ in range(3)] for size, _, wh, fmt in IMAGE_SIZES}


def make_body(model: str, priority: str) -> dict:
    """One job: a single input (4 in 5) or an ``inputs`` list of 2 to 8 texts / 2 to 3 images."""
    if model in IMAGE_MODELS:
        sizes, weights = [s[0] for s in IMAGE_SIZES], [s[1] for s in IMAGE_SIZES]
        item = lambda: {"image_b64": RNG.choice(IMAGES[RNG.choices(sizes, weights)[0]])}  # noqa: E731
        list_len = (2, 3)
    else:
        sizes, weights = [s[0] for s in TEXT_SIZES], [s[1] for s in TEXT_SIZES]
        item = lambda: RNG.choice(TEXTS[RNG.choices(sizes, weights)[0]])  # noqa: E731
        list_len = (2, 8)
    body = {"model": model, "priority": priority}
    if RNG.random() < 0.2:
        body["inputs"] = [item() for _ in range(RNG.randint(*list_len))]
    else:
        body["input"] = item()
    return body


# --- the user ---------------------------------------------------------------------------------
class JobError(Exception):
    """A job that did not succeed: refused, failed, expired, cancelled, or given up on."""


def _error_type(response) -> str:
    """ "429 queue_full": the status and the API's error type, for locust's failure table."""
    try:
        kind = response.json()["error"]["type"]
    except Exception:
        kind = (getattr(response, "text", "") or "").strip()[:60] or "no body"
    return f"{response.status_code} {kind}"


class JobUser(FastHttpUser):
    wait_time = between(float(THINK_MIN), float(THINK_MAX or THINK_MIN))
    # the long poll holds a request for up to POLL_WAIT_S
    network_timeout = POLL_WAIT_S + 30.0
    connection_timeout = 10.0
    default_headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else None

    @task
    def submit_and_wait(self):
        model = RNG.choices(MODELS, MODEL_WEIGHTS)[0]
        priority = RNG.choices(PRIORITIES, PRIORITY_WEIGHTS)[0]
        body = make_body(model, priority)
        name = f"{model}/{priority}"
        start = time.perf_counter()

        with self.client.post("/jobs", json=body, name="/jobs", catch_response=True) as response:
            refused = response.status_code != 202
            if refused:
                error = _error_type(response)
                response.failure(error)
                retry_after = (response.headers or {}).get("Retry-After")
            else:
                job_id = response.json()["id"]
        if refused:
            self._job_done(name, start, 0, JobError(f"refused: {error}"))
            if response.status_code in (429, 503) and retry_after:
                try:  # a polite client backs off as told, within reason
                    time.sleep(min(float(retry_after), 5.0))
                except ValueError:
                    pass
            return

        job, length, last_error = None, 0, None
        while True:
            left = GIVE_UP_S - (time.perf_counter() - start)
            if left <= 0:
                status = job["status"] if job else "unknown"
                self._job_done(name, start, length, JobError(f"gave up after {GIVE_UP_S:g}s ({status})"
                                                             + (f", last error {last_error}" if last_error else "")))
                return
            wait = int(max(0, min(POLL_WAIT_S, left)))
            with self.client.get(f"/jobs/{job_id}?wait={wait}", name="/jobs/[id]", catch_response=True) as response:
                ok = response.status_code == 200
                if ok:
                    job, length = response.json(), len(response.content or b"")
                else:  # e.g. 503 while Redis restarts: counted, then polled again
                    last_error = _error_type(response)
                    response.failure(last_error)
            if not ok:
                time.sleep(min(1.0, left))
            elif job["status"] in TERMINAL:
                break

        if job["status"] == "succeeded":
            self._job_done(name, start, length, None)
        else:
            error = (job.get("error") or {}).get("type")
            self._job_done(name, start, length, JobError(job["status"] + (f": {error}" if error else "")))

    def _job_done(self, name: str, start: float, length: int, exception: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="JOB", name=name, response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, response=None, context=self.context(), exception=exception)


# --- the shape: quiet, burst, quiet -------------------------------------------------------------
@events.init.add_listener
def _graceful_stop(environment, **_kw):
    # Without --stop-timeout, locust kills users mid-job when it scales down or ends, and those jobs
    # (the slowest, under a burst) are never reported. Let each finish within the give-up time.
    if not environment.stop_timeout:
        environment.stop_timeout = GIVE_UP_S + 5


@events.test_stop.add_listener
def _let_the_csv_catch_up(environment, **_kw):
    # locust rewrites the --csv files once a second, not at exit: after the graceful stop, wait one
    # more round so that the jobs that finished last are in them too (the HTML report has them anyway).
    options = environment.parsed_options
    if options is not None and getattr(options, "csv_prefix", None):
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.5)


if (os.environ.get("LOAD_SHAPE", "").strip() or "burst") != "off":

    class BurstShape(LoadTestShape):
        """LOAD_USERS_QUIET users for LOAD_PHASE_S, LOAD_USERS_BURST for LOAD_PHASE_S, quiet again, stop."""

        use_common_options = True  # reads --run-time as a cap

        quiet = int(_env_float("LOAD_USERS_QUIET", 2))
        burst = int(_env_float("LOAD_USERS_BURST", 20))
        phase_s = _env_float("LOAD_PHASE_S", 20)
        spawn_rate = _env_float("LOAD_SPAWN_RATE", float(max(burst, 1)))

        def tick(self):
            elapsed = self.get_run_time()
            options = self.runner.environment.parsed_options if self.runner else None
            cap = getattr(options, "run_time", None)
            if elapsed >= 3 * self.phase_s or (cap and elapsed >= cap):
                return None
            users = self.burst if self.phase_s <= elapsed < 2 * self.phase_s else self.quiet
            return users, self.spawn_rate
