"""Every setting that is not Celery's, read once from the environment.

Celery's own settings (broker, result backend) live in ``celeryconfig.py``;
this module holds the rest so ``os.environ`` is read in exactly two places.
Each name is the environment variable that overrides it; the README lists
them all.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _list(name: str, default: str = "") -> list[str]:
    return [part.strip() for part in os.environ.get(name, default).split(",") if part.strip()]


#: TOML file describing the models this deployment can serve.
MODELS_FILE = os.environ.get("MODELS_FILE", str(ROOT / "models.toml"))
#: Comma list of model names to serve; empty means every model in MODELS_FILE.
MODELS = _list("MODELS")
#: Comma list of accepted API keys; empty disables authentication.
API_KEYS = _list("API_KEYS")
#: Largest request body in bytes (413 beyond it).
MAX_BODY_BYTES = _int("MAX_BODY_BYTES", 10 * 1024 * 1024)
#: Longest text input in characters.
MAX_TEXT_CHARS = _int("MAX_TEXT_CHARS", 10_000)
#: Most items in one job's ``inputs`` list.
MAX_INPUTS = _int("MAX_INPUTS", 256)
#: Largest image, in pixels (width x height); larger ones are refused.
MAX_IMAGE_PIXELS = _int("MAX_IMAGE_PIXELS", 40_000_000)
#: Most jobs waiting in one model's queue before POST /jobs answers 429.
MAX_QUEUED = _int("MAX_QUEUED", 10_000)
#: Longest ``?wait=`` a client may ask for, in seconds.
MAX_WAIT_S = 30
#: How long a job record and its result are kept, in seconds.
JOB_TTL_S = _int("JOB_TTL_S", 24 * 3600)
#: How many times a job may be delivered to a worker before it fails for good.
MAX_DELIVERIES = _int("MAX_DELIVERIES", 5)
#: A job not finished, older than this, whose message is in no queue and held by no worker, had
#: its message lost in transit (a worker or Redis killed mid-handover); workers send it again.
LOST_MESSAGE_AFTER_S = _int("LOST_MESSAGE_AFTER_S", 30)
#: How often (seconds) one worker per model looks for such jobs (it checks on its 5 s heartbeat).
LOST_SWEEP_EVERY_S = _int("LOST_SWEEP_EVERY_S", 15)
#: Retries (with exponential backoff and jitter) for transient errors.
MAX_RETRIES = _int("MAX_RETRIES", 3)
#: Torch threads per worker process; 0 picks cores / models served on this host.
TORCH_THREADS = _int("TORCH_THREADS", 0)
#: 1: each model's worker has one pool process more, kept for high-priority jobs, and runs other
#: batches at the lowest CPU priority, so a high job never waits for a batch of others (it costs
#: one more copy of the model in memory); 0: off.
URGENT_LANE = _int("URGENT_LANE", 1)
if URGENT_LANE not in (0, 1):
    raise ValueError(f"URGENT_LANE must be 0 or 1, got {URGENT_LANE}")
#: 1: a worker's processes keep the memory the model frees for the next batch (glibc's malloc
#: would give it back and fault it in again each batch; see ``models.base.keep_freed_memory``);
#: 0: glibc's defaults.
KEEP_FREED_MEMORY = _int("KEEP_FREED_MEMORY", 1)
if KEEP_FREED_MEMORY not in (0, 1):
    raise ValueError(f"KEEP_FREED_MEMORY must be 0 or 1, got {KEEP_FREED_MEMORY}")


def _probability(name: str) -> float:
    raw = os.environ.get(name, "") or "0"
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number between 0 and 1, got {raw!r}") from None
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be between 0 and 1, got {raw!r}")
    return value


def _range_ms(name: str) -> tuple[float, float]:
    raw = os.environ.get(name, "") or "0"
    try:
        low, _, high = raw.partition("-")
        bounds = (float(low), float(high or low))
    except ValueError:
        raise ValueError(f"{name} must be MS or MIN-MAX in milliseconds, got {raw!r}") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise ValueError(f"{name} must be MS or MIN-MAX with 0 <= MIN <= MAX, got {raw!r}")
    return bounds


#: Failure injection, for demos and fault tests (off by default): the probability that a
#: worker's pool process dies abruptly (os._exit) in the middle of a batch ...
FAULT_CRASH_PROBABILITY = _probability("FAULT_CRASH_PROBABILITY")
#: ... and a random delay added to every batch, "MS" or "MIN-MAX" in milliseconds.
FAULT_DELAY_MS = _range_ms("FAULT_DELAY_MS")
#: Log lines: "json" (one JSON object per line, the default) or "text".
LOG_FORMAT = os.environ.get("LOG_FORMAT", "json")
if LOG_FORMAT not in ("json", "text"):
    raise ValueError(f"LOG_FORMAT must be json or text, got {LOG_FORMAT!r}")
#: Device for models that do not name one: auto (CUDA when available), cpu or cuda.
DEVICE = os.environ.get("DEVICE", "auto")
if DEVICE not in ("auto", "cpu", "cuda") and not (DEVICE.startswith("cuda:") and DEVICE[5:].isdigit()):
    raise ValueError(f"DEVICE must be auto, cpu, cuda or cuda:N, got {DEVICE!r}")

# -- the local stack (make up) -------------------------------------------------
#: Where make up keeps logs, Redis data, the supervisord socket and Flower's state.
VAR_DIR = os.environ.get("VAR_DIR", str(ROOT / "var"))
#: The API's address: loopback by default; 0.0.0.0 to serve other hosts.
API_HOST = os.environ.get("API_HOST", "127.0.0.1")
API_PORT = _int("API_PORT", 8000)
#: gunicorn processes and threads per process (threads also hold ?wait= long polls).
API_WORKERS = _int("API_WORKERS", 2)
API_THREADS = _int("API_THREADS", 16)
#: Flower's address and basic auth ("user:password"); make up generates a dev credential if unset.
FLOWER_HOST = os.environ.get("FLOWER_HOST", "127.0.0.1")
FLOWER_PORT = _int("FLOWER_PORT", 5555)
FLOWER_BASIC_AUTH = os.environ.get("FLOWER_BASIC_AUTH", "")

# -- metrics (Prometheus) ------------------------------------------------------
#: A worker serves /metrics on this port (0: it serves none). make up gives its workers 9410, 9411, ...
WORKER_METRICS_PORT = _int("WORKER_METRICS_PORT", 0)
#: ... on this address: loopback by default (compose sets 0.0.0.0 on its private network).
WORKER_METRICS_HOST = os.environ.get("WORKER_METRICS_HOST", "127.0.0.1")
#: Where the API's and each worker's processes write their samples (one subdirectory per server).
METRICS_DIR = os.environ.get("METRICS_DIR", os.path.join(VAR_DIR, "metrics"))
