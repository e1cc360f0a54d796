"""Celery tasks. The only module that touches Celery; each task is a thin wrapper around a
plain function.

Task arguments are data only: dispatch ids for delivery; for schedule_messages.delay(), message
types with their JSON contexts, addresses and user primary keys. No model instance, body or
secret ever reaches the broker.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Task, shared_task
from django.contrib.auth import get_user_model

from messengers.exceptions import ScheduleError
from workers.queues import DEFAULT_QUEUE, queue_for

from . import toolbox
from .messages import MessageBase

logger = logging.getLogger(__name__)


@shared_task(name="dispatcher.send_dispatches", ignore_result=True, bind=True)
def send_dispatches(self: Task, alias: str, dispatch_ids: list[int]) -> dict[str, int]:
    """Delivers one batch of one messenger's dispatches."""
    from .pipeline import deliver

    owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{self.request.id or 'local'}"[:100]
    result = deliver(alias, dispatch_ids, owner)
    logger.info(
        "%s batch of %d ids: %d claimed, %d sent, %d to retry, %d failed",
        alias,
        len(dispatch_ids),
        result.claimed,
        result.sent,
        result.errors,
        result.failed,
    )
    return vars(result)


def enqueue_dispatches(alias: str, dispatch_ids: list[int]) -> None:
    """Publishes one send_dispatches task per batch of ids on the messenger's queue."""
    size = toolbox.batch_size()
    for start in range(0, len(dispatch_ids), size):
        send_dispatches.apply_async(
            (alias, dispatch_ids[start : start + size]), queue=queue_for(alias)
        )


class ScheduleTask(Task):
    """Turns message objects, recipients and users into plain data before they are published
    (the JSON serializer is the only one accepted), and back in the worker."""

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:  # type: ignore[override]
        payload = encode_schedule_call(*(args or ()), **(kwargs or {}))
        options.setdefault("queue", DEFAULT_QUEUE)
        return super().apply_async((), {"payload": payload}, **options)


@shared_task(name="dispatcher.schedule_messages", base=ScheduleTask, ignore_result=True)
def schedule_messages(
    messages: Any = None,
    recipients: Any = None,
    sender: Any = None,
    priority: int | None = None,
    payload: dict[str, Any] | None = None,
) -> Any:
    """Schedules messages for recipients: stores one message and one dispatch per recipient,
    then enqueues delivery. Call it directly, or with .delay() to do it in a worker."""
    if payload is not None:
        messages, recipients, sender, priority = decode_schedule_call(payload)
    return toolbox.schedule(messages, recipients, sender=sender, priority=priority)


def encode_schedule_call(
    messages: Any, recipients: Any = None, sender: Any = None, priority: int | None = None
) -> dict[str, Any]:
    """Validates and flattens a schedule_messages() call; raises before anything is published."""
    message_objs, recipient_list, _ = toolbox.checked_call(messages, recipients, sender, priority)
    return {
        "messages": [m.to_wire() for m in message_objs],
        "recipients": [r.to_wire() for r in recipient_list],
        "sender": None if sender is None else sender.pk,
        "priority": priority,
    }


def decode_schedule_call(payload: dict[str, Any]) -> tuple[Any, ...]:
    user_model = get_user_model()
    pks = {r["user"] for r in payload["recipients"] if r["user"] is not None}
    if payload["sender"] is not None:
        pks.add(payload["sender"])
    users = user_model._default_manager.in_bulk(list(pks))
    missing = pks - set(users)
    if missing:
        raise ScheduleError(f"users no longer exist: {sorted(missing)}")
    recipients = [
        toolbox.Recipient(r["messenger"], users.get(r["user"]), r["address"])
        for r in payload["recipients"]
    ]
    messages = [MessageBase.from_wire(m) for m in payload["messages"]]
    return messages, recipients, users.get(payload["sender"]), payload["priority"]


@shared_task(name="dispatcher.sweep", ignore_result=True)
def sweep(priority: int | None = None) -> dict[str, int]:
    """Re-enqueues due retries and lost or stuck dispatches (run by beat)."""
    from .sweep import sweep as run_sweep

    return run_sweep(priority=priority)
