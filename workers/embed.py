"""Serving sitemessage from a project's own Celery app instead of ``celery -A workers``.

::

    # mysite/celery.py
    app = Celery("mysite")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.autodiscover_tasks()  # finds dispatcher.tasks, the module of the 'sitemessage' app
    serve(app)

``serve(app)`` adds what ``workers.app`` has and a project's app lacks: the worker lifecycle
(each process warms the messengers of the queues it consumes, and consumes their urgent lanes),
the sweep (and the cleanup, when SITEMESSAGE_CLEANUP_AFTER_DAYS is set) in beat, and our tasks'
crash settings. It changes nothing else of the app: our tasks are published by name with an
explicit queue (``workers.broker``), so they need no route, only a worker that consumes
``sitemessage`` and ``messenger.<alias>``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from . import lifecycle
from .queues import (
    CLEANUP,
    CLEANUP_INTERVAL,
    DEFAULT_QUEUE,
    SCHEDULE_MESSAGES,
    SEND_DISPATCHES,
    SWEEP,
)

#: What workers.celeryconfig sets app-wide, for our tasks only: acknowledged after they ran and
#: requeued when their process was killed (the redelivered task takes its rows back at once),
#: and time limits below the broker's visibility timeout (Redis: 3600 s by default).
TASK_OPTIONS = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "time_limit": 300,
    "soft_time_limit": 240,
    "ignore_result": True,
}
#: The beat entries of the sweep and of the cleanup, as in workers.celeryconfig.
SWEEP_ENTRY = "sitemessage-sweep"
CLEANUP_ENTRY = "sitemessage-cleanup"


def serve(app: Celery) -> None:
    """Makes ``app`` (a project's Celery app) serve sitemessage like ``celery -A workers``.

    Call it once where the app is built, before it is configured or finalized (it reads no
    setting now: the sweep interval and the annotations are added when the app loads its
    configuration). The project's own ``task_annotations`` for our task names win over ours.
    """
    lifecycle.connect()
    if app.configured:  # type: ignore[attr-defined]  # (missing from celery-types)
        _configure(app)
    else:
        app.on_after_configure.connect(_on_after_configure, sender=app, weak=False)


def _on_after_configure(sender: Celery, **_: Any) -> None:
    _configure(sender)


def _configure(app: Celery) -> None:
    from dispatcher import conf  # reads Django's settings: only once the app is configured

    ours = {
        name: dict(TASK_OPTIONS) for name in (SEND_DISPATCHES, SCHEDULE_MESSAGES, SWEEP, CLEANUP)
    }
    theirs = app.conf.task_annotations
    if theirs is None:
        theirs = ()
    elif not isinstance(theirs, list | tuple):
        theirs = (theirs,)
    # Celery applies the first annotation that names a task, so the project's come first.
    app.conf.task_annotations = (*theirs, ours)
    app.add_periodic_task(
        conf.SWEEP_INTERVAL.get(),
        app.signature(SWEEP),
        name=SWEEP_ENTRY,
        queue=DEFAULT_QUEUE,
        expires=60,
    )
    if conf.CLEANUP_AFTER_DAYS.get() is not None:
        app.add_periodic_task(
            CLEANUP_INTERVAL,
            app.signature(CLEANUP),
            name=CLEANUP_ENTRY,
            queue=DEFAULT_QUEUE,
            expires=CLEANUP_INTERVAL,
        )
