"""Celery tasks: thin wrappers, ids or plain data in, one function call, a summary out.

Together with ``workers`` the only code that touches Celery. Tasks are published by name
(``workers.broker``); their arguments are ids only: dispatch ids, or for
schedule_messages.delay() the id of the stored call. What they return is counts only: Celery
logs it, and Flower shows it.
"""

from __future__ import annotations

import logging

from celery import Task, shared_task

from workers import broker
from workers.queues import CLEANUP, SCHEDULE_MESSAGES, SEND_DISPATCHES, SWEEP

from . import conf, operations, pipeline, toolbox
from . import sweep as sweeping

logger = logging.getLogger(__name__)


@shared_task(name=SEND_DISPATCHES, ignore_result=True, bind=True)
def send_dispatches(self: Task, alias: str, dispatch_ids: list[int]) -> dict[str, int]:
    """Delivers one batch of one messenger's dispatches."""
    owner = pipeline.lease_owner(self.request.id)
    broker.answer_doorbell(alias)  # before the claim: see workers.broker's doorbells
    result = pipeline.deliver(alias, dispatch_ids, owner, waiting=True)
    if result.more:
        broker.ring(alias, conf.DOORBELL_SECONDS.get())
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


#: Seconds one cleanup run deletes for, well inside the task's soft time limit (240 s); a
#: table left with more sent rows is deleted further by the next runs.
CLEANUP_BUDGET = 120


@shared_task(name=CLEANUP, ignore_result=True)
def cleanup() -> dict[str, int]:
    """Deletes the dispatches sent more than SITEMESSAGE_CLEANUP_AFTER_DAYS days ago and the
    messages left without any (run by beat, hourly); does nothing when the setting is None."""
    days = conf.CLEANUP_AFTER_DAYS.get()
    if days is None:
        return {"dispatches": 0, "messages": 0, "more": 0}
    result, more = operations.cleanup_for(CLEANUP_BUDGET, ago=days)
    if more:
        logger.info("cleanup stopped after %d dispatches; the next run goes on", result.dispatches)
    return {"dispatches": result.dispatches, "messages": result.messages, "more": int(more)}
