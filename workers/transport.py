"""A worker's messages fetched and acked in bulk on kombu's Redis transport.

kombu fetches one message per ``BRPOP`` and then records it as unacked with a ``MULTI`` of its own;
each ack is one more ``MULTI``. Three round trips and an event-loop turn per job, in the worker's
main process, on the core the model runs on: about 0.66 ms a job, a tenth of MiniLM's own time.

With :func:`enable` (a worker serving a model calls it):

* after a ``BRPOP`` returns a message, one script (:data:`FETCH`) pops up to as many more as the
  prefetch window has room for, in the same priority order, and records each as unacked in the same
  step: the unacked index and hash entries kombu's ``QoS.append`` writes, so redelivery after the
  visibility timeout, ``restore_unacked`` at shutdown and the lost-message sweep see them as they
  see any other. (The popped and the recorded cannot part, as kombu's pop-then-record can.)
* the messages of one fetch are delivered one after the other; :func:`bursting` is true meanwhile
  and :func:`on_burst_end` callbacks run after the last, so a batch is planned once for all of them;
* :func:`acks_together` sends the acks of a finished batch in one ``MULTI`` of two commands (a
  ``ZREM`` and an ``HDEL`` of all their tags; kombu sends the two for each message);
* an item on the queue that is not a kombu message (not JSON, no delivery tag) is set aside in
  :data:`MALFORMED_KEY` with an error in the log; kombu's own path raises on it and stops the worker;
* with :func:`reserve` (a worker with an urgent lane), the last part of the prefetch window is kept
  for the first priority step (``high``): once the rest is full, ``BRPOP`` reads only the ``high``
  lists and a fetch takes other messages only up to that point. Without it a backlog of ``low`` jobs
  fills the window, and a ``high`` job stays in Redis until a batch finishes and is acked. When a
  batch's acks (:func:`acks_together`) make room, a ``CLIENT UNBLOCK`` ends that ``BRPOP`` at once,
  and the next one reads all lists again. Before, that ``BRPOP`` timed out every 20 ms to look: 50
  wake-ups a second of this process, on the model's core, whenever the window was full.

Consumers that do not ack (``no_ack``) never reach this: the worker's task queues are the only
``BRPOP`` queues it enables it for. With a global key prefix kombu's own path is kept.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from queue import Empty
from typing import Callable

log = logging.getLogger(__name__)

#: KEYS: the unacked index, the unacked hash, the list for malformed items, then the lists in the
#: order BRPOP reads them.
#: ARGV: the most messages to take, the time to record them under, and (optional) the most to take
#: from the lists after the first ``ARGV[4]`` ones (the first priority step's lists).
FETCH = """
local want, now, out = tonumber(ARGV[1]), ARGV[2], {}
local want_later, first_lists, later = tonumber(ARGV[3] or ARGV[1]), tonumber(ARGV[4] or 0), 0
for i = 4, #KEYS do
  while #out < 2 * want and (i - 3 <= first_lists or later < want_later) do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local ok, message = pcall(cjson.decode, item)
    local props = ok and type(message) == 'table' and message['properties']
    local info = type(props) == 'table' and props['delivery_info']
    if type(info) ~= 'table' or type(props['delivery_tag']) ~= 'string' then
      redis.call('LPUSH', KEYS[3], item)  -- not a kombu message: set aside, not delivered
      redis.call('LTRIM', KEYS[3], 0, 999)
    else
      redis.call('ZADD', KEYS[1], now, props['delivery_tag'])
      redis.call('HSET', KEYS[2], props['delivery_tag'],
                 '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
      out[#out + 1] = KEYS[i]
      out[#out + 1] = item
      if i - 3 > first_lists then later = later + 1 end
    end
  end
end
return out
"""

#: Where items on a queue that are not kombu messages (not JSON, or no delivery tag) are set aside,
#: the newest 1,000; kombu would raise on one and stop the worker.
MALFORMED_KEY = "malformed-messages"

#: The most messages one fetch takes beyond the BRPOP's (the prefetch window bounds it too).
MAX_FETCH = 256

#: While the window is full up to the reserve, BRPOP waits at most this long on the ``high`` lists
#: alone before it reads all lists again. Acks end it sooner (:func:`acks_together`); this bounds
#: the wait when room comes another way (a message acked or rejected by itself, a failed unblock).
RESERVED_BRPOP_TIMEOUT_S = 0.5

_enabled = False
_bursting = False
_reserve = 0
_burst_end: list[Callable[[], None]] = []


def enable() -> None:
    """Fetch in bulk and allow batched acks in this process (a model's worker, before it consumes)."""
    global _enabled
    install()
    _enabled = True


def disable() -> None:
    """kombu's own path again (tests)."""
    global _enabled
    _enabled = False


def reserve(messages: int) -> None:
    """Keep the last ``messages`` of the prefetch window (at most half of it) for messages of the
    first priority step (0, ``high``); 0 turns it off."""
    global _reserve
    if messages < 0:
        raise ValueError(f"messages must be >= 0, got {messages}")
    _reserve = messages


def _reserved(qos) -> tuple[int, int]:
    """(the messages held, the most of them that may be of a later priority step) on ``qos``; the
    second is None without a reserve."""
    held = len(qos._delivered) - len(qos._dirty)
    window = qos.prefetch_count or 0
    if not (_enabled and _reserve and window >= 2):
        return held, None
    return held, window - min(_reserve, window // 2)


def bursting() -> bool:
    """True while the messages of one bulk fetch are being delivered."""
    return _bursting


def on_burst_end(callback: Callable[[], None]) -> None:
    """Call ``callback`` after each bulk fetch's messages are all delivered (once per callback)."""
    if callback not in _burst_end:
        _burst_end.append(callback)


@contextmanager
def acks_together(qos):
    """Inside, ``QoS.ack`` on this channel only notes the message's tag; on leaving (also when the
    body raised: those messages count as acked here already) one ``MULTI`` removes all of them from
    the unacked index and hash, a ``ZREM`` and an ``HDEL`` of many tags, where kombu would send
    both commands for each message. Packing and parsing those per message cost a sixth of the
    worker's main process at 64-job batches. If sending fails the exception propagates: the
    messages come back after the visibility timeout."""
    from kombu.transport import redis as kombu_redis

    if not _enabled or not isinstance(qos, kombu_redis.QoS) or qos.__dict__.get("_ack_tags") is not None:
        yield
        return
    tags: list = []
    qos._ack_tags = tags
    try:
        yield
    finally:
        qos._ack_tags = None
        if tags:
            with qos.channel.conn_or_acquire() as client:
                client.pipeline().zrem(qos.unacked_index_key, *tags).hdel(qos.unacked_key, *tags).execute()
            _end_reserved_brpop(qos.channel)


def _end_reserved_brpop(channel) -> None:
    """If ``channel``'s BRPOP reads the ``high`` lists alone and the window has room again, end it
    now (``CLIENT UNBLOCK``: it returns as if timed out, and the next BRPOP reads all lists)."""
    client_id = channel.__dict__.get("_reserved_brpop")
    if client_id is None:
        return
    held, later_max = _reserved(channel.qos)
    if later_max is not None and held >= later_max:
        return
    channel._reserved_brpop = None
    try:
        with channel.conn_or_acquire() as client:
            client.client_unblock(client_id)
    except Exception as exc:  # (a Redis that refuses CLIENT): the BRPOP's timeout ends it instead
        log.debug("could not end the reserved BRPOP early: %s", exc)


def _client_id(connection) -> int | None:
    """The Redis client id of ``connection`` (asked once per socket: a reconnection gets a new one)."""
    if getattr(connection, "_sock", None) is None:
        connection.connect()
    sock = connection._sock
    known = connection.__dict__.get("_bulk_client_id")
    if known is not None and known[0] is sock:
        return known[1]
    try:
        connection.send_command("CLIENT", "ID")
        client_id = int(connection.read_response())
    except Exception as exc:
        log.debug("no client id for the reserved BRPOP: %s", exc)
        return None
    connection._bulk_client_id = (sock, client_id)
    return client_id


def _readable(raw: bytes | str):
    """The kombu message in ``raw``, or None if it is not one (the same test as the script's)."""
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import loads

    try:
        message = loads(bytes_to_str(raw))
    except ValueError:
        return None
    props = message.get("properties") if isinstance(message, dict) else None
    if not (isinstance(props, dict) and isinstance(props.get("delivery_info"), dict)
            and isinstance(props.get("delivery_tag"), str)):
        return None
    return message


def _fetch_more(channel, queues: list[str]) -> list[tuple[str, dict]]:
    """Up to the prefetch window's room (less the message just read) more messages, recorded as
    unacked by the script: ``[(queue, message)]`` in delivery order."""
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import loads

    qos = channel.qos
    room = min(qos.can_consume_max_estimate() - 1, MAX_FETCH)
    if room <= 0 or not queues:
        return []
    keys = [channel._q_for_pri(queue, pri) for pri in channel.priority_steps for queue in queues]
    held, later_max = _reserved(qos)
    later_room = room if later_max is None else max(0, later_max - held - 1)  # (the BRPOP's message: 1)
    with channel.conn_or_acquire() as client:
        script = channel.__dict__.get("_fetch_script")
        if script is None:
            script = channel.__dict__["_fetch_script"] = client.register_script(FETCH)
        flat = script(keys=[qos.unacked_index_key, qos.unacked_key, MALFORMED_KEY, *keys],
                      args=[room, time.time(), later_room, len(queues)], client=client)
    out = []
    for i in range(0, len(flat), 2):
        message = loads(bytes_to_str(flat[i + 1]))
        qos.__dict__.setdefault("_recorded", set()).add(message["properties"]["delivery_tag"])
        out.append((bytes_to_str(flat[i]).rsplit(channel.sep, 1)[0], message))
    return out


def install() -> None:
    """Patch kombu's Redis ``Channel._brpop_start``, ``_brpop_read``, ``QoS.append`` and ``QoS.ack``
    (idempotent); they behave as kombu's own until :func:`enable` is called."""
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual
    from kombu.utils.encoding import bytes_to_str

    Channel, QoS = kombu_redis.Channel, kombu_redis.QoS
    if getattr(Channel._brpop_read, "fetches_in_bulk", False):
        return
    brpop_start, brpop_read, append, ack = Channel._brpop_start, Channel._brpop_read, QoS.append, QoS.ack

    def _brpop_start(self, timeout=None):
        """kombu's, but on the ``high`` lists alone once the window is full up to the
        reserve (:func:`reserve`)."""
        held, later_max = _reserved(self.qos) if _enabled and not self.global_keyprefix else (0, None)
        self._reserved_brpop = None
        if later_max is None or held < later_max:
            return brpop_start(self, timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, self.priority_steps[0]) for queue in queues]
        self._reserved_brpop = _client_id(self.client.connection)  # (acks end it: _end_reserved_brpop)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command("BRPOP", *keys, RESERVED_BRPOP_TIMEOUT_S)

    def _brpop_read(self, **options):
        """kombu's ``_brpop_read`` (same reply handling), then :func:`_fetch_more`, then delivery."""
        global _bursting
        self._reserved_brpop = None
        if not _enabled or self.global_keyprefix:
            return brpop_read(self, **options)
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            first = _readable(item)
            if first is None:  # kombu's loads would raise and stop the worker
                log.error("set aside an item on %s that is not a kombu message (in %r): %r",
                          dest, MALFORMED_KEY, bytes(item[:200]))
                with self.conn_or_acquire() as client:
                    client.pipeline().lpush(MALFORMED_KEY, item).ltrim(MALFORMED_KEY, 0, 999).execute()
            try:
                more = _fetch_more(self, self._queue_cycle.consume(len(self.active_queues)))
            except Exception as exc:  # Redis went away: the one BRPOP returned, as kombu would
                log.warning("bulk fetch failed (%s); delivering the one message BRPOP returned", exc)
                more = []
            if first is not None and not more:
                self.connection._deliver(first, dest)
                return True
            _bursting = True
            error = None
            try:
                # Each one is delivered even if one before it raised: they are all unacked in Redis,
                # and one never delivered here would only come back after the visibility timeout.
                for queue, message in ([(dest, first)] if first is not None else []) + more:
                    try:
                        self.connection._deliver(message, queue)
                    except Exception as exc:
                        error = error or exc
                if error is not None:
                    raise error
            finally:
                _bursting = False
                for callback in list(_burst_end):
                    try:
                        callback()
                    except Exception:
                        log.exception("after a bulk fetch")
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _append(self, message, delivery_tag):
        recorded = self.__dict__.get("_recorded")
        if recorded and delivery_tag in recorded:  # the fetch script has written the unacked entries
            recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            append(self, message, delivery_tag)

    def _ack(self, delivery_tag):
        tags = self.__dict__.get("_ack_tags")
        if tags is None:
            return ack(self, delivery_tag)
        tags.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    _brpop_read.fetches_in_bulk = True
    Channel._brpop_start, Channel._brpop_read, QoS.append, QoS.ack = _brpop_start, _brpop_read, _append, _ack
