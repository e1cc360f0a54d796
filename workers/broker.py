"""Everything the rest of the project asks of the broker: publishing tasks, checking that the
broker answers, and its URL (the rate limiter shares a Redis broker).

Tasks are published by name through the current Celery app (ours, or a project's own app that
serves our tasks), so this module never imports the tasks module, and the producer side needs
none of the task code. Task arguments are ids only: dispatch ids, or a schedule request's.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import redis
from celery import current_app
from kombu.exceptions import ChannelError, KombuError

from .queues import DEFAULT_QUEUE, SCHEDULE_MESSAGES, SEND_DISPATCHES, queue_for

logger = logging.getLogger(__name__)

#: What a publish raises when the broker is unreachable; anything else is a bug and propagates.
BROKER_ERRORS = (KombuError, OSError)


class BrokerUnreachable(Exception):
    """The broker did not answer."""


def enqueue(
    ids_by_messenger: dict[str, list[int]],
    batch_size: int,
    urgent: bool = False,
    doorbell: float = 0,
) -> list[int]:
    """Publishes one delivery task per ``batch_size`` ids of each messenger on its queue (its
    urgent lane if ``urgent``: the same task, served by the same workers); returns the ids it
    could not publish. An unreachable broker is logged, not raised: the rows are stored and
    stay pending, and the sweep publishes them again.

    With ``doorbell`` seconds (and a Redis broker), ids that fit in one task are published only
    when no doorbell of the queue is pending (see ring()); else the worker that answers the
    pending one claims them with the rows already waiting."""
    unpublished: list[int] = []
    for alias, ids in ids_by_messenger.items():
        queue = queue_for(alias, urgent)
        bell = doorbell > 0 and len(ids) <= batch_size
        if bell and not _ring(queue, doorbell):
            continue
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            try:
                _publish(alias, batch, queue)
            except BROKER_ERRORS:
                logger.exception(
                    "could not publish %d %s dispatches; they stay pending for the sweep",
                    len(ids) - start,
                    alias,
                )
                if bell:  # the next call rings again
                    silence([queue])
                unpublished += ids[start:]
                break
    return unpublished


def _publish(alias: str, batch: list[int], queue: str) -> None:
    current_app.send_task(
        SEND_DISPATCHES,
        (alias, batch),
        queue=queue,
        # What Flower and the worker log show: the messenger and the batch size.
        shadow=f"{SEND_DISPATCHES}[{alias}]",
        argsrepr=f"({alias!r}, <{len(batch)} dispatch ids>)",
    )


# Doorbells. A delivery task is a doorbell: the worker that runs it also claims the other
# pending dispatches of its messenger (dispatcher.pipeline.claim_waiting). So while one task of
# a queue waits to be answered, publishing another for the next one-recipient message only
# costs a publish (most of a scheduling call) and a task run that finds nothing. The pending
# doorbell is a Redis key: a producer sets it (SET NX) after its rows are committed, and
# publishes only if it was not set; the worker deletes it before it claims. A row committed
# before a failed SET NX is therefore committed before that delete, and the claim after it sees
# the row. A worker whose claim of waiting rows filled its batch rings again, for the rest.
# The key expires after the doorbell's seconds, in case its task is lost with the broker's data.
_BELL_PREFIX = "sitemessage:doorbell:"
_bell_clients: dict[tuple[int, str], Any] = {}


def _bells() -> Any:
    """A Redis client on the broker's database when the broker is Redis, else None."""
    url = broker_url()
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    key = (os.getpid(), url)  # connections must not cross a fork
    if key not in _bell_clients:
        _bell_clients[key] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return _bell_clients[key]


def _ring(queue: str, seconds: float) -> bool:
    """Marks a doorbell of ``queue`` pending; False if one already was (nothing to publish)."""
    bells = _bells()
    if bells is None:
        return True
    try:
        return bool(bells.set(_BELL_PREFIX + queue, 1, nx=True, px=max(1, round(seconds * 1000))))
    except redis.RedisError:
        logger.warning("doorbell of %s unavailable; publishing", queue, exc_info=True)
        return True


def silence(queues: list[str]) -> None:
    """Clears the doorbells of these queues (their tasks were answered, or purged)."""
    bells = _bells()
    if bells is None:
        return
    try:
        bells.delete(*(_BELL_PREFIX + queue for queue in queues))
    except redis.RedisError:  # it expires by itself; until then producers skip publishing
        logger.warning("could not clear the doorbells of %s", queues, exc_info=True)


def answer_doorbell(alias: str) -> None:
    """Called by a delivery task before it claims: the messenger's doorbells (both lanes) are
    answered, and the next producer publishes a task again."""
    silence([queue_for(alias), queue_for(alias, urgent=True)])


def ring(alias: str, seconds: float) -> None:
    """Publishes a delivery task without ids for ``alias`` unless one is pending: a worker that
    claimed a full batch of waiting rows calls it, so the rest do not wait for the sweep.
    Does nothing without doorbells (each row then has a task of its own)."""
    if seconds <= 0 or _bells() is None:
        return
    queue = queue_for(alias)
    if not _ring(queue, seconds):
        return
    try:
        _publish(alias, [], queue)
    except BROKER_ERRORS:
        logger.exception("could not publish a doorbell for %s; the sweep publishes the rest", alias)
        silence([queue])


def publish_schedule_request(request_id: int, **options: Any) -> Any:
    """Publishes the id of a stored schedule_messages() call for a worker of the default queue."""
    options.setdefault("queue", DEFAULT_QUEUE)
    return current_app.send_task(SCHEDULE_MESSAGES, (request_id,), **options)


def result_of(task_id: str) -> Any:
    """The AsyncResult of a task that is (or will be) published with this id."""
    return current_app.AsyncResult(task_id)


def queue_lengths(queues: Iterable[str]) -> dict[str, int | None]:
    """The number of tasks waiting (not taken by a worker) in each of these queues: 0 for a
    queue the broker does not know (Redis drops an empty one), None when it could not tell."""
    lengths: dict[str, int | None] = {}
    try:
        with current_app.connection_for_write() as conn:
            missing: tuple[type[BaseException], ...] = (ChannelError, *conn.channel_errors)
            closing: tuple[type[BaseException], ...] = (*BROKER_ERRORS, *missing)
            for queue in queues:
                # A channel each: RabbitMQ closes a channel whose passive declare fails.
                channel: Any = conn.channel()
                try:
                    lengths[queue] = channel.queue_declare(queue, passive=True).message_count
                except missing:  # no such queue: nothing waits in it
                    lengths[queue] = 0
                except BROKER_ERRORS:
                    lengths[queue] = None
                finally:
                    try:
                        channel.close()
                    except closing:
                        pass
    except BROKER_ERRORS:
        logger.warning("could not ask the broker for its queue lengths", exc_info=True)
    return lengths


def workers_by_queue(timeout: float = 1.0) -> dict[str, list[str]] | None:
    """The workers consuming each queue, as they answer Celery's inspect within ``timeout``
    seconds: {queue: sorted node names}; {} when none answered, None when the broker is
    unreachable."""
    try:
        check_broker(max(1, math.ceil(timeout)))  # one attempt, not the connection retries
        answers = current_app.control.inspect(timeout=timeout).active_queues() or {}
    except (BrokerUnreachable, *BROKER_ERRORS):
        logger.warning("could not ask the workers for their queues", exc_info=True)
        return None
    serving: dict[str, list[str]] = {}
    for node, queues in answers.items():
        for queue in queues or ():
            serving.setdefault(queue["name"], []).append(node)
    return {queue: sorted(nodes) for queue, nodes in sorted(serving.items())}


def check_broker(timeout: int) -> None:
    """Raises BrokerUnreachable unless the broker answers within ``timeout`` seconds."""
    with current_app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        except Exception as exc:
            raise BrokerUnreachable(f"broker {conn.as_uri()} unreachable ({exc})") from exc


def broker_url() -> str:
    """The URL of the (first) broker of the current Celery app."""
    url = current_app.conf.broker_url or ""
    if isinstance(url, list | tuple):
        url = url[0] if url else ""
    return str(url).split(";")[0].strip()
