"""Celery settings: one flat module, the only reader of broker/backend env vars.

Loaded by ``workers`` with ``app.config_from_object("celeryconfig")``.
"""

import os

from settings import JOB_TTL_S

#: One Redis for broker and results unless they are given apart.
redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
broker_url = os.environ.get("BROKER_URL", redis_url)
result_backend = os.environ.get("RESULT_BACKEND", redis_url)

# JSON only: a pickle payload from the network is remote code execution.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# At least once: a job is acked only after its result is stored. Redelivery of
# unacked jobs happens after visibility_timeout, which must exceed the longest
# batch; a crashed job is not requeued in a loop (deliveries are capped by the
# job store instead).
task_acks_late = True
task_reject_on_worker_lost = False
visibility_timeout_s = int(os.environ.get("VISIBILITY_TIMEOUT_S", "600"))

#: Priorities are emulated on Redis with one list per step; 0 is served first.
PRIORITIES = {"high": 0, "normal": 5, "low": 9}
broker_transport_options = {
    "visibility_timeout": visibility_timeout_s,
    # Look for unacked messages past their visibility timeout every 5 s (kombu's default sweep is
    # every 10th call of a 10 s timer, ~100 s): a dead worker's jobs come back within the
    # visibility timeout plus about 5 s. Each look is one ZRANGE on the unacked index.
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    "queue_order_strategy": "priority",
    "priority_steps": sorted(PRIORITIES.values()),
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
}
result_backend_transport_options = {"socket_connect_timeout": 2, "socket_timeout": 5}
redis_socket_connect_timeout = 2
redis_socket_timeout = 5
result_expires = JOB_TTL_S

# Publishing fails fast so the API can answer 503 instead of hanging.
broker_connection_timeout = 2
broker_connection_retry_on_startup = True
broker_connection_max_retries = None
task_publish_retry = True
task_publish_retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}

# One process per worker: a worker serves one model; scale with more workers.
worker_concurrency = int(os.environ.get("WORKER_CONCURRENCY", "1"))
worker_send_task_events = True
# A task-sent event per submission shows a job in Flower before a worker has fetched it, at about 1 ms
# of API CPU per POST /jobs (3.1 ms instead of 4.1 ms, measured): off unless TASK_SENT_EVENTS=1.
# Workers send task-received as they fetch, and queue depths are in Flower's Broker tab.
task_send_sent_event = os.environ.get("TASK_SENT_EVENTS", "0") == "1"
worker_hijack_root_logger = False
worker_cancel_long_running_tasks_on_connection_loss = False
#: `celery control pool_restart` starts fresh pool processes (the model loads again in each).
worker_pool_restarts = True
