"""Helpers shared by the tests of the commands, the admin and the faults."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from typing import Any

from django.utils import timezone
from kombu import Queue

from dispatcher.messages import EmailTextMessage
from dispatcher.models import Dispatch, DispatchError, Message
from tests.support import run_python
from workers.app import app


def drain(queue: str = "messenger.smtp", limit: int = 10000) -> list[tuple[str, list[Any]]]:
    """Takes every task off a broker queue; returns their (task name, args)."""
    tasks = []
    with app.connection_for_write() as conn:
        bound = Queue(queue, channel=conn.default_channel)
        bound.declare()
        for _ in range(limit):
            message = bound.get(no_ack=True)
            if message is None:
                break
            args, _kwargs, _embed = message.decode()
            tasks.append((message.headers["task"], args))
    return tasks


def published_ids(tasks: list[tuple[str, list[Any]]]) -> list[int]:
    return sorted(
        pk for name, (_, ids) in tasks if name == "dispatcher.send_dispatches" for pk in ids
    )


def make_dispatch(
    status: int,
    address: str = "someone@example.com",
    messenger: str = "smtp",
    retry_count: int = 1,
    priority: int = 0,
    errors: list[str] | None = None,
    **fields: Any,
) -> Dispatch:
    """A dispatch row of an EmailTextMessage in any state, with its error log."""
    message = EmailTextMessage("Subject", "Body")
    message_model = Message.objects.create(
        cls=message.get_alias(), context=message.context, priority=priority
    )
    dispatch = Dispatch.objects.create(
        message=message_model,
        messenger=messenger,
        address=address,
        dispatch_status=status,
        retry_count=retry_count,
        **fields,
    )
    for n, error in enumerate(errors or [], start=1):
        DispatchError.objects.create(
            dispatch=dispatch,
            attempt=n,
            exc_type="PermanentDeliveryError",
            error_log=error,
            time_created=timezone.now() - timedelta(seconds=len(errors or []) - n),
        )
    return dispatch


def manage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``manage.py`` in a subprocess against the test database."""
    return run_python("manage.py", *args, env=env)
