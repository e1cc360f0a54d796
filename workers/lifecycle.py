"""Worker process lifecycle: warm messengers at process start, cool them at process stop.

A worker warms only the messengers whose queues it consumes (``-Q messenger.smtp``), and a
worker that consumes a messenger's queue consumes its urgent lane too (``messenger.smtp.urgent``,
see consume_urgent_lanes). With the
prefork pool every child process does it on ``worker_process_init``; with the solo pool the
worker process does it on ``worker_ready``. Celery kills a child whose init takes 4 s, so the
warm-up runs in a thread that is given WARM_UP_BUDGET seconds; a messenger that is not warm by
then (server down, slow login) is logged and connected by its first batch. Shutdown signals are
best effort: a killed process runs nothing. At ``worker_init`` the worker also prepares the
directory of its delivery counters (dispatcher.metrics), before the pool forks.

A solo worker runs Celery's synchronous consumer loop instead of the kombu event loop. Under the
event loop a solo worker queues its acks (``task_acks_late``) with ``hub.call_soon`` from inside
the loop, and the hub then polls up to 10 s before running them; with RabbitMQ and a full prefetch
window nothing else arrives, so every few batches the worker sat idle for 10 s (measured: 50
one-dispatch batches took 20-70 s instead of under 1 s). The synchronous loop acks at once.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import signals
from celery.concurrency import get_implementation

from dispatcher import metrics
from messengers.base import MessengerBase, cool_down, warm_up
from messengers.registry import get_registered_messenger_objects

from .queues import alias_of_queue, queue_for

logger = logging.getLogger(__name__)

#: Seconds the process start may spend warming messengers (Celery's limit is 4).
WARM_UP_BUDGET = 3.0

#: Messenger aliases of the queues this worker consumes; set in the worker's main process at
#: worker_init, inherited by the prefork children.
_consumed: list[str] = []


def connect() -> None:
    """Connects the lifecycle to Celery's worker signals (once, however often called)."""
    for signal, handler in [
        (signals.worker_init, _on_worker_init),
        (signals.worker_process_init, _on_process_init),
        (signals.worker_process_shutdown, _on_process_shutdown),
        (signals.worker_ready, _on_worker_ready),
        (signals.worker_shutdown, _on_worker_shutdown),
    ]:
        signal.connect(handler, weak=False, dispatch_uid=f"sitemessage.{handler.__name__}")


def consumed_aliases(queues: Any) -> list[str]:
    """The messengers of the queues consumed (either lane), each once, in order."""
    aliases = (alias_of_queue(queue) for queue in queues or {})
    return list(dict.fromkeys(alias for alias in aliases if alias is not None))


def consume_urgent_lanes(queues: Any) -> list[str]:
    """Makes the worker consume the urgent lane of each messenger queue it consumes, and
    returns the lanes it added. A worker started with ``-Q messenger.smtp`` (as before lanes
    existed, or with the lane forgotten) would otherwise leave every urgent dispatch of smtp
    waiting in a queue nobody reads; a worker for the urgent lane alone (``-Q
    messenger.smtp.urgent``) stays that. ``queues`` is the app's ``amqp.queues``."""
    consumed = queues.consume_from
    added = []
    for name in list(consumed or {}):
        alias = alias_of_queue(name)
        urgent = None if alias is None else queue_for(alias, urgent=True)
        if urgent is None or urgent == name or urgent in consumed:
            continue
        try:
            queue = queues[urgent]  # created like a -Q queue the app does not know
        except KeyError:  # task_create_missing_queues is off and the app does not declare it
            logger.error(
                "queue %s is not declared: %s's urgent dispatches wait in it", urgent, alias
            )
            continue
        queues.select_add(queue)
        added.append(urgent)
    if added:
        logger.info("also consuming the urgent lanes %s", ", ".join(added))
    return added


def consumed_messengers(aliases: list[str]) -> list[MessengerBase]:
    registered = get_registered_messenger_objects()
    for alias in aliases:
        if alias not in registered:
            logger.error(
                "queue %s has no registered messenger %r: its dispatches will fail",
                queue_for(alias),
                alias,
            )
    return [registered[alias] for alias in aliases if alias in registered]


def warm_messengers(messengers: list[MessengerBase], budget: float = WARM_UP_BUDGET) -> None:
    thread = threading.Thread(
        target=_warm_all, args=(messengers,), name="sitemessage-warm-up", daemon=True
    )
    thread.start()
    thread.join(budget)
    if thread.is_alive():
        logger.warning("messenger warm-up takes longer than %ss; batches wait for it", budget)


def _warm_all(messengers: list[MessengerBase]) -> None:
    for messenger in messengers:
        try:
            warm_up(messenger)
        except Exception as exc:
            logger.warning(
                "messenger %s did not warm up (%s); its first batch connects", messenger, exc
            )


def cool_messengers() -> None:
    for messenger in get_registered_messenger_objects().values():
        try:
            cool_down(messenger)
        except Exception:
            logger.exception("messenger %s failed to cool down", messenger)


def _is_solo(pool_cls: type) -> bool:
    return pool_cls.__module__ == "celery.concurrency.solo"


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Sent after WorkController chose its queues and the event loop, before its bootsteps.
    consume_urgent_lanes(sender.app.amqp.queues)
    _consumed[:] = consumed_aliases(sender.app.amqp.queues.consume_from)
    # Before the pool forks: the children inherit the counters' directory (dispatcher.metrics).
    metrics.start_worker(sender.hostname, _consumed)
    from dispatcher import pipeline  # not at import: it loads the models, Django is not set up

    pipeline.relax_commits()
    if _is_solo(get_implementation(sender.pool_cls)):
        sender.use_eventloop = False


def _on_process_init(**_: Any) -> None:
    warm_messengers(consumed_messengers(_consumed))


def _on_process_shutdown(**_: Any) -> None:
    cool_messengers()
    metrics.process_exited(os.getpid())


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    if _is_solo(type(getattr(sender, "pool", None))):
        warm_messengers(consumed_messengers(_consumed))


def _on_worker_shutdown(**_: Any) -> None:
    cool_messengers()  # a no-op in a prefork parent: nothing warms there
