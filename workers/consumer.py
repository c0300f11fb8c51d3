"""ModelBatches: celery-batches' ``Batches`` with the gaps DESIGN.md lists closed.

celery-batches buffers messages in the worker's main process and hands a list
of requests to the pool. As shipped it (1) flushes on a timer even while the
pool is busy, so batches stay small under load; (2) acks a batch whole when
the batch function returns, stored or not; (3) sends no per-request events.
This subclass:

* flushes only when a pool process is free, taking up to ``flush_every``
  inputs (not jobs: a job's ``inputs`` list counts in full), most urgent
  priority first (``workers.batching.plan``);
* adaptive batching (the default): learns the cost of each batch size as it runs, over a batch's
  whole cycle with a backlog (from the return of the batch before it to its own), not the pool's
  time alone (``workers.batching.AdaptiveBatcher``), takes the most efficient size when
  there is a backlog, and runs a job at once when the pool is free unless
  arrivals outpace what that batch size can serve (then it waits, at most
  ``flush_interval``); fixed batching waits ``flush_interval`` for
  ``flush_every`` inputs, as celery-batches does;
* acks exactly the requests the batch function says it finished (stored a
  result for, or found already terminal), and puts the rest back on the queue;
* requeues a whole batch whose pool process died;
* while no batch can start (the pool is full), the flush timer ticks every ``BUSY_TICK_S`` rather
  than every ``flush_interval``: a returning batch flushes by itself, and each tick woke this
  process on the model's core, ahead of the batch;
* with ``workers.transport`` (enabled for a model's worker): a backlog is fetched up to the prefetch
  window per round trip and planned once the whole fetch is buffered, and a batch's acks go in one
  round trip;
* sends no per-job event from the main process: the pool sends ``task-received`` and
  ``task-started`` for a whole batch in one message as it starts (a publish per job here cost
  about a third of this process's time, on the core the model runs on);
* with an urgent lane (``lane``: the pool has one process more than batches of other jobs may
  use), ``high`` jobs never wait for a batch of other jobs: they go, by themselves, to a free
  process as they arrive, and the pool runs other batches at the lowest CPU priority
  (``workers.lane``), so the operating system runs the ``high`` batch first on the same cores.
  One ``high`` batch runs at a time (per process batches of others may use): those that arrive
  meanwhile go together, next, rather than share the cores with it.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import Any, Collection

from celery.worker.state import revoked as revoked_tasks
from celery_batches import Batches, SimpleRequest, consume_queue
from celery_batches.trace import apply_batches_task
from kombu.asynchronous.timer import to_timestamp

from workers import transport
from workers.batching import AdaptiveBatcher, BatchStats, plan

log = logging.getLogger(__name__)
_LOWEST = 255


def _inputs(request) -> int:
    """How many model inputs a job carries (its weight in a batch)."""
    kwargs = request.kwargs or {}
    try:
        return int(kwargs.get("n_inputs") or len(kwargs.get("inputs") or ())) or 1
    except Exception:
        return 1


def _qos(requests):
    """The kombu QoS of the channel the requests came on (all of a batch come on one)."""
    message = getattr(requests[0], "message", None) if requests else None
    return getattr(getattr(message, "channel", None), "qos", None)


def _ack_now(request) -> None:
    """``request.acknowledge()``, but now: Celery's defers the ack to the event loop's next turn
    (``call_soon``, for pools that call back from other threads), out of ``acks_together``'s reach.
    The prefork pool calls ``on_return`` on the loop's own thread."""
    message = getattr(request, "message", None)
    if message is None or not hasattr(request, "acknowledged"):
        request.acknowledge()
        return
    if request.acknowledged:
        return
    message.ack_log_error(log, getattr(request, "_connection_errors", ()))
    request.acknowledged = True


def _priority(request) -> int:
    value = (request.delivery_info or {}).get("priority")
    return _LOWEST if value is None else int(value)


def is_urgent(request) -> bool:
    """A high-priority job: it goes to the urgent lane, and its batch runs at normal CPU priority."""
    return _priority(request) <= AdaptiveBatcher.URGENT_PRIORITY


class ModelBatches(Batches):
    """A batching task whose batch function returns the ids it finished."""

    abstract = True
    #: Most inputs in one batch (the model's max_batch_size); one job is always taken.
    flush_every = 32
    #: Seconds the first job of a batch may wait for more (the model's max_wait_ms).
    flush_interval = 0.01
    #: A batch no pool process has accepted after this long is taken back and requeued (it is only
    #: handed over when a process is free, so a healthy pool accepts it within milliseconds).
    NOT_ACCEPTED_AFTER_S = 30.0
    #: Learn batch sizes as it runs (the default), or wait for ``flush_every`` as configured.
    adaptive = True
    #: While high-priority jobs are about: how long a returning batch waits for the next fetch.
    URGENT_FETCH_S = 0.005
    #: An urgent lane: the pool has one process more than batches of other jobs may take at once.
    lane = False
    #: While no batch can start (the pool is full), the flush timer ticks this often instead of every
    #: ``flush_interval``: a returning batch flushes by itself, and each tick woke this process,
    #: on the model's core and ahead of it (the batch runs at a lower CPU priority), for nothing.
    #: The ticks that remain look for batches the pool dropped (``_forget_dropped``).
    BUSY_TICK_S = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._running: dict[Any, list] = {}  # the pool's result handle of each batch it holds -> requests
        self._sent_at: dict[Any, float] = {}  # ... -> when it was handed to the pool (monotonic)
        self._urgent: set = set()  # ... of the batches with high-priority jobs
        self._overlapped: set = set()  # ... of other batches a high-priority batch ran beside
        self.stats = BatchStats()
        self.policy = AdaptiveBatcher(self.flush_every)
        self._burst: list = []  # priorities of the bulk fetch being delivered
        self._slow_tick = False  # the flush timer ticks every BUSY_TICK_S (the pool is full)
        self._freed_at: float | None = None  # while a returning batch's flush runs: when it returned

    def configure(self, max_batch_size: int, max_wait_ms: float, adaptive: bool | None = None) -> None:
        """Set the batch limits (and the mode); on a running worker (``celery control
        set_batching``) too: the flush timer restarts with the new wait on the next message."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if not hasattr(self, "policy"):
            self.policy = AdaptiveBatcher(max_batch_size, self._processes())
        elif max_batch_size != self.flush_every:  # what it learnt of the sizes both limits allow stays
            self.policy = self.policy.resized(max_batch_size, self._processes())
        self.flush_every = max_batch_size
        if adaptive is not None:
            self.adaptive = bool(adaptive)
        self.flush_interval = max(max_wait_ms / 1000.0, 0.001)
        if getattr(self, "_tref", None) is not None:
            self._tick(fast=True)

    def _processes(self) -> int:
        return max(1, getattr(getattr(self, "_pool", None), "num_processes", 1) or 1)

    def _busy(self) -> bool:
        self._forget_dropped()
        return len(self._running) >= self._processes()

    def _bulk_full(self) -> bool:
        """No process may start a batch of other than high-priority jobs (with a lane: one process
        is kept for them)."""
        bulk = len(self._running) - len(self._urgent)
        return self._busy() or bulk >= self._processes() - (1 if self.lane else 0)

    def _urgent_slots(self) -> int:
        """How many batches of high-priority jobs may run at once: as many as batches of others may
        (the pool's processes less the lane). All of them share the model's cores at normal CPU
        priority, so two ``high`` batches side by side on a one-process worker would each take
        twice as long; the jobs that arrive while one runs go together, as one batch, next."""
        return max(1, self._processes() - 1)

    def _forget_dropped(self, now: float | None = None) -> None:
        """When the broker connection is lost, Celery flushes the pool: batches no process had
        accepted yet are dropped without a callback. Left counted, they would keep this worker
        "busy" for good; their jobs are put back on the queue instead.

        A batch handed to the pool around such a flush can also be left in the pool's outgoing
        buffer, never written to a process and never called back (seen once in the chaos test: a
        pool process died while the broker was down). A batch no process has accepted within
        ``NOT_ACCEPTED_AFTER_S`` is taken back from the pool the same way; if the pool runs it after
        all, the claim sees its jobs already finished or running and they run at most once more."""
        cache = getattr(getattr(self._pool, "_pool", None), "_cache", None)
        if cache is None:
            return
        now = monotonic() if now is None else now
        for result in list(self._running):
            if result.ready():
                continue
            if cache.get(getattr(result, "_job", None)) is not result:
                why = "the pool dropped it (broker connection lost)"
            elif (not getattr(result, "_accepted", True)
                  and now - self._sent_at.get(result, now) > self.NOT_ACCEPTED_AFTER_S):
                why = f"no pool process took it in {self.NOT_ACCEPTED_AFTER_S:.0f}s"
                cache.pop(result._job, None)  # its callbacks can no longer fire
            else:
                continue
            requests = self._running.pop(result)
            self._sent_at.pop(result, None)
            self._urgent.discard(result)
            self._overlapped.discard(result)
            log.warning("batch of %d: %s; requeueing it", len(requests), why)
            try:
                for request in requests:
                    request.reject(requeue=True)
            except Exception:  # they come back after visibility_timeout
                log.exception("could not requeue a dropped batch")

    def _ready(self, request) -> bool:
        if not request.eta:
            return True
        try:
            eta = to_timestamp(request.eta) if request.utc else to_timestamp(request.eta, self.app.timezone)
        except (OverflowError, ValueError):
            log.error("dropping request %s with an unreadable ETA %r", request.id, request.eta)
            request.reject(requeue=False)
            return False
        return eta <= monotonic()  # to_timestamp maps onto the monotonic clock

    def _revoked(self, request) -> bool:
        """``celery control revoke ID``: a job not started yet ends ``cancelled`` and never runs (one
        already running, a redelivery, runs on: a batch cannot be stopped halfway)."""
        if request.id not in revoked_tasks:
            return False
        from tasks.store import REVOKED, TERMINAL
        from workers import state

        try:
            cancelled, status = state.store().cancel(request.id, error=REVOKED)
        except Exception:  # Redis down: keep it; the next flush looks again
            log.exception("could not cancel revoked job %s", request.id)
            return False
        if cancelled or status in TERMINAL or status is None:
            request.revoked()  # Celery's part: task-revoked event, ack
            return True
        return False

    def _tick(self, fast: bool) -> None:
        """(Re)start the repeating flush timer: every ``flush_interval``, or every ``BUSY_TICK_S``."""
        if self._tref is not None:
            self._tref.cancel()
        self._tref = self._timer.call_repeatedly(self.flush_interval if fast else self.BUSY_TICK_S, self._do_flush)
        self._slow_tick = not fast

    def _nothing_can_start(self) -> None:
        if self._tref is not None and not self._slow_tick:
            self._tick(fast=False)  # a returning batch flushes (and ticks fast again)

    def _do_flush(self) -> None:
        if self._pool is None:
            return
        if self._busy():
            self._nothing_can_start()
            return  # called again when the running batch returns
        if self.lane and self._pending.empty():
            # Nothing can start: a high job waits for the lane's running one (others wait behind it),
            # or no high job waits and only the lane is free. (Else every arrival and timer tick
            # would take the whole buffer out and put it back.) An arriving high job flushes at once.
            high_waits = any(map(is_urgent, list(self._buffer.queue)))
            if (high_waits and len(self._urgent) >= self._urgent_slots()) or (not high_waits and self._bulk_full()):
                self._nothing_can_start()
                return
        waiting = list(consume_queue(self._buffer)) + list(consume_queue(self._pending))
        ready = []
        for request in waiting:
            if request.eta and not self._ready(request):
                self._pending.put(request)
            elif request.acknowledged or self._revoked(request):
                continue
            else:
                ready.append(request)
        if self.lane:
            rest = self._flush_lanes(ready)
        else:
            limit = self.flush_every
            if self.adaptive and ready:
                limit = self.policy.target(sum(_inputs(r) for r in ready), monotonic())
            batch, rest = plan(ready, limit, _priority, _inputs)
            if batch:
                self.flush(batch)
        for request in rest:
            self._buffer.put(request)
        if self._buffer.empty() and self._pending.empty():
            if self._tref is not None:
                self._tref.cancel()
            self._tref, self._slow_tick = None, False

    def _flush_lanes(self, ready: list) -> list:
        """With a lane: high-priority jobs, by themselves, to a free process (one such batch at a
        time, see ``_urgent_slots``); then, if no high job is left waiting and a process may take
        one, a batch of the others at its full size (the pool runs it at the lowest CPU priority, so
        it need not be short). Returns the requests left over."""
        urgent = [r for r in ready if is_urgent(r)]
        others = [r for r in ready if not is_urgent(r)]
        while urgent and not self._busy() and len(self._urgent) < self._urgent_slots():
            limit = self.policy.target(sum(map(_inputs, urgent))) if self.adaptive else self.flush_every
            batch, urgent = plan(urgent, limit, _priority, _inputs)
            self.flush(batch)
        if others and not urgent and not self._bulk_full():  # (high jobs still waiting start first)
            limit = self.policy.target(sum(map(_inputs, others))) if self.adaptive else self.flush_every
            batch, others = plan(others, limit, _priority, _inputs)
            self.flush(batch)
        return urgent + others

    def _after_batch(self, handle: list) -> None:
        if handle:
            self._running.pop(handle[0], None)
            self._sent_at.pop(handle[0], None)
            self._urgent.discard(handle[0])
            self._overlapped.discard(handle[0])
        if not (self._buffer.empty() and self._pending.empty()):
            if (not self.lane and self.adaptive and self.policy.urgent(monotonic())
                    and hasattr(self._timer, "call_after")):
                # The acks just freed prefetch room; a waiting high-priority job is fetched first,
                # but only on the event loop's next turn. Give it URGENT_FETCH_S to arrive (an
                # arrival flushes at once) rather than start a batch without it.
                self._timer.call_after(self.URGENT_FETCH_S, self._do_flush)
            else:
                self._do_flush()
            if (self._tref is None or self._slow_tick) and not (self._buffer.empty() and self._pending.empty()):
                self._tick(fast=True)

    def flush(self, requests: Collection[Any]) -> Any:
        requests = list(requests)
        simple = [SimpleRequest.from_request(r) for r in requests]
        handle: list = []  # the pool's result object, once apply_async returns it
        # Handed over as the batch before it returned (a backlog): its cycle runs from that return.
        cycle_from = self._freed_at

        def on_return(value) -> None:
            returned = monotonic()
            if isinstance(value, dict):  # ids to ack, plus the batch's figures
                self.stats.record(value.get("jobs", 0), value.get("inputs", 0), value.get("run_ms", 0.0),
                                  returned)
                if value.get("jobs") and not (handle and handle[0] in self._overlapped):
                    # (a batch a high-priority one ran beside was slowed by it: not its own cost)
                    self.policy.record(value.get("inputs", 0), value.get("pool_ms", 0.0) / 1000,
                                       None if cycle_from is None else returned - cycle_from)
                value = value.get("ids")
            done = set(value or ())
            try:
                with transport.acks_together(_qos(requests)):  # one round trip for the batch's acks
                    for request in requests:
                        if request.id in done:
                            _ack_now(request)
                        else:
                            request.reject(requeue=True)
            except Exception:  # broker gone: unacked messages come back after visibility_timeout
                log.exception("could not ack/requeue a batch of %d", len(requests))
            finally:
                self._freed_at = returned  # (a batch the flush below starts runs from here)
                try:
                    self._after_batch(handle)
                finally:
                    self._freed_at = None

        def on_error(exc_info) -> None:
            log.error("batch of %d lost (%s); requeueing it", len(requests),
                      getattr(exc_info, "exception", exc_info))
            try:
                for request in requests:
                    request.reject(requeue=True)
            except Exception:
                log.exception("could not requeue a lost batch")
            finally:
                self._after_batch(handle)

        result = self._pool.apply_async(
            apply_batches_task, (self, (simple,), 0, None),
            callback=on_return, error_callback=on_error)
        if result is not None and not result.ready():  # (not already called back)
            handle.append(result)
            if any(map(is_urgent, requests)):
                self._overlapped.update(r for r in self._running if r not in self._urgent)
                self._urgent.add(result)
            elif self._urgent:
                self._overlapped.add(result)
            self._running[result] = requests
            self._sent_at[result] = monotonic()
        return result

    def Strategy(self, task, app, consumer):
        """Called at start and again each time the consumer restarts (a lost broker connection).
        A restart clears the event loop's timers, our flush timer with them: celery-batches would
        keep the dead handle and never flush on time again, so it is dropped and, with requests
        still buffered, started afresh."""
        self._timer = consumer.timer
        if self._tref is not None:
            try:
                self._tref.cancel()
            except Exception:
                pass
            self._tref, self._slow_tick = None, False
        handler = super().Strategy(task, app, consumer)
        self.policy.processes = self._processes()
        transport.on_burst_end(self._after_burst)
        if not (self._buffer.empty() and self._pending.empty()):
            self._tick(fast=True)

        def adaptive_handler(*args: Any, **kwargs: Any) -> None:
            handler(*args, **kwargs)  # buffers the request (and starts the max-wait timer)
            self._on_arrival()

        return adaptive_handler

    def _on_arrival(self) -> None:
        """Adaptive batching, as a request is buffered: with a pool process free, run now unless
        the policy says arrivals outpace batches this small (then the max-wait timer, a later
        arrival or a returning batch flushes)."""
        if not self.adaptive:
            return
        now = monotonic()
        try:
            newest = _priority(self._buffer.queue[-1])
        except IndexError:  # (flushed already)
            newest = None
        if transport.bursting():  # counted and planned once the whole fetch is buffered
            self._burst.append(newest)
            return
        self.policy.arrived(now, newest)
        self._plan(now)

    def _after_burst(self) -> None:
        """The last message of a bulk fetch is buffered: one arrival of that many jobs, one plan."""
        burst, self._burst = self._burst, []
        if not (self.adaptive and burst):
            return
        now = monotonic()
        self.policy.arrived(now, min((p for p in burst if p is not None), default=None), count=len(burst))
        self._plan(now)

    def _plan(self, now: float | None = None) -> None:
        if not self.adaptive or self._busy():
            return  # the running batch's return flushes
        waiting = list(self._buffer.queue)
        if self.lane:
            if any(map(is_urgent, waiting)):
                self._do_flush()  # a high job runs now, in a process of its own
                return
            if self._bulk_full():
                return
        buffered = sum(_inputs(r) for r in waiting)
        if buffered and not self.policy.should_wait(buffered, monotonic() if now is None else now):
            self._do_flush()


