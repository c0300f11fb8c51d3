"""A job's broker message, written by the API in the same Redis transaction as the job's record.

``POST /jobs`` used to write the record, then publish with Celery's ``send_task``: two round trips,
and ``send_task`` was about a quarter of the API's CPU per request (routing, a retry wrapper, an
``AsyncResult``, kombu's producer). When the broker and the job store are the same Redis and no
``task-sent`` event is wanted, :func:`task_message` builds the very message ``send_task`` would
``LPUSH`` (Celery's own ``create_task_message`` for the headers and body, then what kombu's
Producer and Redis channel add), and the API pushes it in the record's ``MULTI``: the job exists
with its message or not at all. ``tests/api/test_messages.py`` compares it with ``send_task``'s.
"""

from __future__ import annotations

import base64
import uuid
from bisect import bisect
from functools import lru_cache
from typing import Any

from kombu.serialization import dumps
from kombu.transport.redis import Channel
from kombu.utils.json import dumps as json_dumps


def direct_publish_possible(app) -> bool:
    """Whether the API may push messages itself: the broker is the result backend's Redis (same URL),
    with no key prefix, and no ``task-sent`` event is asked for (``send_task`` sends it)."""
    conf = app.conf
    broker, backend = conf.broker_url or "", conf.result_backend or ""
    options = conf.broker_transport_options or {}
    return (broker == backend and broker.split("://", 1)[0] in ("redis", "rediss")
            and not options.get("global_keyprefix") and not conf.task_send_sent_event
            and conf.task_serializer == "json" and not conf.task_compression)


#: Stand-ins for the job's id and the delivery tag in a cached message (uppercase: ``str(uuid4())``
#: never is), replaced in each job's copy.
_TASK_ID = "00000000-0000-0000-0000-0000000000AA"
_DELIVERY_TAG = "00000000-0000-0000-0000-0000000000BB"


def task_message(app, name: str, task_id: str, queue: str, priority: int,
                 kwargs: dict[str, Any]) -> tuple[str, str]:
    """(the Redis list, the message) that ``app.send_task(name, task_id=task_id, queue=queue,
    priority=priority, kwargs=kwargs, ignore_result=True)`` would push.

    Celery builds the headers (with ``saferepr`` of the arguments) and kombu encodes the body anew
    for every message: 51-54 us per job here. Only the ids differ between jobs with the same
    arguments, so the message is built once per arguments and copied with the ids put in: 4-5 us."""
    queue_key, message = _message(app, name, queue, priority, tuple(kwargs.items()), app.thread_oid)
    return queue_key, message.replace(_TASK_ID, task_id).replace(_DELIVERY_TAG, str(uuid.uuid4()))


@lru_cache(maxsize=1024)  # (API threads x models x priorities x input counts; past that, built anew)
def _message(app, name: str, queue: str, priority: int, kwargs: tuple, reply_to: str) -> tuple[str, str]:
    kwargs = dict(kwargs)
    headers, properties, body, _ = app.amqp.create_task_message(
        _TASK_ID, name, (), kwargs, reply_to=reply_to, ignore_result=True)
    content_type, content_encoding, data = dumps(body, serializer="json")
    if isinstance(data, str):
        data = data.encode(content_encoding)
    properties = {**properties, "delivery_mode": 2, "priority": priority,
                  "delivery_info": {"exchange": "", "routing_key": queue},  # (Celery's anonymous exchange)
                  "body_encoding": "base64", "delivery_tag": _DELIVERY_TAG}
    message = {"body": base64.b64encode(data).decode("ascii"), "content-encoding": content_encoding,
               "content-type": content_type, "headers": headers, "properties": properties}
    # kombu's Redis channel: _get_message_priority, then _q_for_pri
    options = app.conf.broker_transport_options or {}
    steps = sorted(options.get("priority_steps") or Channel.priority_steps)
    step = steps[bisect(steps, max(0, min(int(priority), 9))) - 1]
    return (f"{queue}{options.get('sep', Channel.sep)}{step}" if step else queue), json_dumps(message)
