"""``manage.py sitemessage_health [--timeout SECONDS] [--grace SECONDS]``: is delivery running?

For container health checks and monitoring scripts. Healthy means: every registered messenger's
queue (``messenger.<alias>``, and its urgent lane ``messenger.<alias>.urgent`` when
SITEMESSAGE_URGENT_PRIORITY is set) has a worker consuming it, as the workers answer Celery's
inspect within ``--timeout``; and no dispatch is stuck past its lease (PROCESSING, its lease
expired more than ``--grace`` seconds ago: its worker died and no sweep gave it back, so beat is
down or the sweep fails). The grace defaults to two sweep intervals, because a lease that
expired a moment ago is normal until the next sweep.

Prints one line per problem on stderr and exits 1, or prints one ``OK`` line on stdout and
exits 0. A broker or a database that does not answer is a problem too.
"""

from __future__ import annotations

import argparse
import math
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import DatabaseError
from django.db.models import Count, Min
from django.utils import timezone

from dispatcher import conf
from dispatcher.models import Dispatch
from messengers.registry import get_registered_messenger_objects
from workers.broker import BrokerUnreachable, check_broker, workers_by_queue
from workers.queues import queue_for

#: Exit status when something is wrong (argparse exits 2 on bad arguments).
UNHEALTHY = 1


def seconds(text: str) -> float:
    """An argparse type: a number of seconds, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def expected_queues() -> list[str]:
    """The queues that need a worker: each registered messenger's, both lanes when the urgent
    lane is on."""
    urgent = conf.URGENT_PRIORITY.get() is not None
    queues = []
    for alias in sorted(get_registered_messenger_objects()):
        queues.append(queue_for(alias))
        if urgent:
            queues.append(queue_for(alias, urgent=True))
    return queues


def queue_problems(queues: list[str], timeout: float) -> list[str]:
    """One line per queue without a worker; one line in all when the broker does not answer
    (checked first, within the timeout: an inspect would retry the connection for seconds)."""
    try:
        check_broker(max(1, math.ceil(timeout)))
    except BrokerUnreachable as exc:
        return [f"{exc}: cannot ask the workers which queues they consume"]
    serving = workers_by_queue(timeout)
    if serving is None:  # it went away meanwhile; workers.broker logged why
        return ["broker unreachable: cannot ask the workers which queues they consume"]
    return [
        f"queue {queue}: no worker consumes it (none answered within {timeout:g} s)"
        for queue in queues
        if not serving.get(queue)
    ]


def lease_problems(grace: float) -> list[str]:
    """One line per messenger with dispatches stuck past their lease (plus the grace)."""
    now = timezone.now()
    stuck = (
        Dispatch.objects.filter(
            dispatch_status=Dispatch.Status.PROCESSING,
            lease_expires_at__lt=now - timedelta(seconds=grace),
        )
        .order_by("messenger")
        .values_list("messenger")
        .annotate(n=Count("pk"), oldest=Min("lease_expires_at"))
    )
    return [
        f"messenger {alias}: {n} dispatches stuck past their lease (the oldest expired "
        f"{(now - oldest).total_seconds():.0f} s ago; is beat running the sweep?)"
        for alias, n, oldest in stuck
    ]


class Command(BaseCommand):
    help = (
        "Checks that every registered messenger's queue (and its urgent lane, when "
        "SITEMESSAGE_URGENT_PRIORITY is set) has a live worker, and that no dispatch is stuck "
        "past its lease (PROCESSING with a lease that expired more than --grace seconds ago). "
        "Prints one line per problem on stderr, or one OK line. Exit status: 0 healthy, 1 a "
        "problem (also when the broker or the database does not answer), 2 bad arguments."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--timeout",
            type=seconds,
            default=1.0,
            metavar="SECONDS",
            help="how long to wait for the workers to answer (default: %(default)s)",
        )
        parser.add_argument(
            "--grace",
            type=seconds,
            default=None,
            metavar="SECONDS",
            help="seconds an expired lease may wait for the sweep before it counts as stuck "
            "(default: two sweep intervals, 2 x SITEMESSAGE_SWEEP_INTERVAL)",
        )

    def handle(self, *args: Any, timeout: float, grace: float | None, **options: Any) -> None:
        if grace is None:
            grace = 2 * conf.SWEEP_INTERVAL.get()
        queues = expected_queues()
        problems = queue_problems(queues, timeout)
        try:
            problems += lease_problems(grace)
        except DatabaseError as exc:
            problems.append(f"database unreachable: {exc}")
        for problem in problems:
            self.stderr.write(problem)
        if problems:
            raise SystemExit(UNHEALTHY)
        self.stdout.write(
            f"OK: {len(queues)} queues have a worker, no dispatch is stuck past its lease"
        )
