"""Builds the Celery app: config from ``celeryconfig``, tasks from ``tasks``, and the
``--model`` worker option that binds a worker to one model's queue."""

from __future__ import annotations

import math
import os
import time

from celery import Celery, bootsteps, signals
from click import Option

import settings


def reuse_redis_clients() -> None:
    """kombu's Redis channel builds a new ``redis.Redis`` for every publish, every delivery it
    records as unacked and every ack: about 80 µs each (its response-callback table), so 0.16 ms of
    the worker's main process per job, on the model's core, and 0.08 ms per ``POST /jobs``. This
    makes each channel build one and reuse it: the same connection pool, the same commands (pipelines
    stay one per call). A new pool (after a reconnect) gets a new client."""
    from kombu.transport import redis as kombu_redis

    build = kombu_redis.Channel._create_client
    if getattr(build, "reuses_clients", False):
        return

    def _create_client(self, asynchronous=False):
        if asynchronous:
            return build(self, asynchronous=True)
        client = self.__dict__.get("_reused_client")
        if client is None or client.connection_pool is not self.pool:
            client = self.__dict__["_reused_client"] = build(self)
        return client

    _create_client.reuses_clients = True
    kombu_redis.Channel._create_client = _create_client


def make_celery() -> Celery:
    reuse_redis_clients()
    celery = Celery("workers", include=["tasks.infer"])
    celery.config_from_object("celeryconfig")
    celery.user_options["worker"].add(Option(
        ["--model"], default=None, help="Serve this model (a name from MODELS_FILE): "
        "consume its queue with its batch settings."))
    celery.steps["worker"].add(ModelBinding)
    celery.steps["worker"].add(MetricsEndpoint)
    celery.steps["consumer"].add(Heartbeat)
    return celery


class ModelBinding(bootsteps.Step):
    """``--model NAME``: queue ``jobs.NAME``, node name ``worker-NAME@host``,
    prefetch large enough for two batches, and the batch settings on the task."""

    def __init__(self, worker, model=None, **options):
        super().__init__(worker, **options)
        if not model:
            return
        from models import ConfigError, UnknownModel, load_registry, runner_class
        from workers import state

        if settings.KEEP_FREED_MEMORY:
            # Once, here, in the main process before it starts a thread; its pool processes inherit it.
            # Set in each pool process instead, it missed at times: a thread that allocated here first
            # had a malloc arena of its own, the fork kept it, and the pool's batch thread allocated
            # from it, mapping large blocks afresh each batch (efficientnet-lite0's batches of 16:
            # about 7,000 faults a job, 23 images/s against 37; README, what changed after X).
            from models.base import keep_freed_memory

            keep_freed_memory()

        try:
            spec = load_registry().get(model)
            runner_class(spec).check_spec(spec)
            runner_class(spec).preload()
        except (ConfigError, UnknownModel) as exc:
            raise SystemExit(f"error: {exc}") from None
        state.bind(spec)
        from workers import transport

        transport.enable()  # fetch its messages and ack its batches in bulk
        queues = worker.app.amqp.queues
        if set(queues.consume_from) <= {worker.app.conf.task_default_queue}:
            worker.setup_queues([spec.queue])
        if worker.hostname.startswith("celery@"):
            worker.hostname = f"worker-{spec.name}@{worker.hostname.split('@', 1)[1]}"
        concurrency = max(1, worker.concurrency or 1)
        worker.prefetch_multiplier = max(worker.prefetch_multiplier or 1,
                                         math.ceil(2 * spec.max_batch_size / concurrency))
        task = worker.app.tasks["tasks.infer"]
        task.configure(spec.max_batch_size, spec.max_wait_ms, adaptive=spec.batching == "adaptive")
        from celery.concurrency.prefork import TaskPool

        pool_cls = getattr(worker, "pool_cls", None)
        task.lane = (bool(settings.URGENT_LANE) and not getattr(worker, "autoscale", None)
                     and isinstance(pool_cls, type) and issubclass(pool_cls, TaskPool))  # (processes only)
        if task.lane:
            # One process more, for high-priority jobs; its share of the prefetch window is kept
            # for them too (the rest fills with other jobs' backlog).
            worker.concurrency = concurrency + 1
            if getattr(worker, "min_concurrency", None):  # (the pool step read it already)
                worker.min_concurrency = worker.concurrency
            transport.reserve(worker.prefetch_multiplier)
        else:
            transport.reserve(0)
        if settings.WORKER_METRICS_PORT:
            # Before the pool forks: its processes write their samples where /metrics reads them.
            import metrics

            metrics.use_directory(os.path.join(settings.METRICS_DIR, worker.hostname))


class MetricsEndpoint(bootsteps.StartStopStep):
    """``WORKER_METRICS_PORT``: this worker's Prometheus metrics (all its pool processes' samples,
    added up) on ``http://WORKER_METRICS_HOST:PORT/metrics``, served by a thread in the main process."""

    def __init__(self, worker, **options):
        super().__init__(worker, **options)
        self.server = None

    def start(self, worker):
        from workers import state

        if not settings.WORKER_METRICS_PORT or state.spec is None:
            return
        import metrics

        host, port = settings.WORKER_METRICS_HOST, settings.WORKER_METRICS_PORT
        try:
            self.server = metrics.serve(port, host)
        except OSError as exc:
            raise SystemExit(f"error: cannot serve metrics on {host}:{port} (WORKER_METRICS_PORT): {exc}") from None
        worker.app.log.get_default_logger().info("metrics on http://%s:%d/metrics", host, port)

    def stop(self, worker):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class Heartbeat(bootsteps.StartStopStep):
    """Refreshes this node in ``workers:<model>`` every few seconds so the API can count live workers,
    and every ``LOST_SWEEP_EVERY_S`` sends again the model's jobs whose message was lost in transit."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    interval_s = 5.0

    def __init__(self, consumer, **options):
        super().__init__(consumer, **options)
        self.tref = None
        self.next_sweep = 0.0

    def start(self, consumer):
        from workers import state

        if state.spec is None:
            return
        self.beat(consumer)
        self.tref = consumer.timer.call_repeatedly(self.interval_s, self.beat, (consumer,))

    def beat(self, consumer):
        from workers import state

        log = consumer.app.log.get_default_logger()
        try:
            state.store().heartbeat(state.spec.name, consumer.hostname, int(self.interval_s * 3))
            if time.monotonic() >= self.next_sweep:
                self.next_sweep = time.monotonic() + settings.LOST_SWEEP_EVERY_S
                self.sweep(consumer)
        except Exception as exc:  # Redis down: the next beat tries again
            log.warning("heartbeat or lost-message sweep failed: %s", exc)

    def sweep(self, consumer) -> int:
        """One worker per model (a lock) looks for the model's lost messages and sends them again.

        kombu's Redis transport pops a message and only then records it as unacked: a worker
        killed, or Redis restarted, in between loses the message, never the job record. A resent
        job is claimed like any other; if the first message was not lost after all, the claim makes
        sure the job still finishes once (at worst it runs again, as any redelivery may)."""
        from celeryconfig import PRIORITIES, broker_transport_options
        from workers import state

        store, spec = state.store(), state.spec
        if not store.r.set(f"sweep:{spec.name}", consumer.hostname, nx=True, px=int(settings.LOST_SWEEP_EVERY_S * 900)):
            return 0
        steps = broker_transport_options["priority_steps"]
        lists = [spec.queue if step == 0 else f"{spec.queue}\x06\x16{step}" for step in steps]
        lost = store.find_lost(spec.name, lists, settings.LOST_MESSAGE_AFTER_S)
        for job in lost:
            consumer.app.send_task("tasks.infer", task_id=job["id"], queue=spec.queue,
                                   priority=PRIORITIES.get(job["priority"], PRIORITIES["normal"]),
                                   kwargs={"model": spec.name, "n_inputs": job["n_inputs"], "single": job["single"]},
                                   ignore_result=True)  # the worker stores results itself
        if lost:
            consumer.app.log.get_default_logger().warning(
                "sent again %d job(s) whose message was lost in transit: %s", len(lost),
                ", ".join(job["id"] for job in lost[:10]))
        return len(lost)

    def stop(self, consumer):
        from workers import state

        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if state.spec is not None:
            try:
                state.store().leave(state.spec.name, consumer.hostname)
            except Exception:
                pass


app = make_celery()


@signals.worker_process_init.connect
def _load_model(**_):
    """Each pool process loads its model as it starts, in a thread (Celery stops a
    ``worker_process_init`` handler after 4 s): the lane's process is ready before the first
    high-priority job, not loading for it. A batch that comes first waits for the load."""
    from workers import state

    state.load_in_background()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger=None, **_):
    import logs

    logs.use_formatter(logger)


from workers import control  # noqa: E402,F401  (registers our remote-control commands)
