"""Celery tasks: thin wrappers, ids or plain data in, one function call, a summary out.

Together with ``workers`` the only code that touches Celery. Tasks are published by name
(``workers.broker``); their arguments are ids only: dispatch ids, or for
schedule_messages.delay() the id of the stored call. What they return is counts only: Celery
logs it, and Flower shows it.
"""

from __future__ import annotations

import logging

from celery import Task, shared_task

from workers.queues import SCHEDULE_MESSAGES, SEND_DISPATCHES, SWEEP

from . import pipeline, toolbox
from . import sweep as sweeping

logger = logging.getLogger(__name__)


@shared_task(name=SEND_DISPATCHES, ignore_result=True, bind=True)
def send_dispatches(self: Task, alias: str, dispatch_ids: list[int]) -> dict[str, int]:
    """Delivers one batch of one messenger's dispatches."""
    result = pipeline.deliver(alias, dispatch_ids, pipeline.lease_owner(self.request.id))
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


@shared_task(name=SCHEDULE_MESSAGES, ignore_result=True)
def schedule_messages(request_id: int) -> dict[str, int]:
    """Expands a stored schedule_messages.delay() call into its messages and dispatches."""
    created = toolbox.expand_schedule_request(request_id)
    return {"messages": len(created), "dispatches": sum(len(d) for _, d in created)}


@shared_task(name=SWEEP, ignore_result=True)
def sweep(priority: int | None = None) -> dict[str, int]:
    """Re-enqueues due retries and lost or stuck dispatches (run by beat)."""
    return sweeping.sweep(priority=priority)
