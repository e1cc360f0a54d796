"""``manage.py sitemessage_send_scheduled [--priority N]``: runs the sweep now, as beat does.

Publishes what is due for the workers (it sends nothing itself), with a progress bar over the
sweep's steps on a terminal (plain progress lines on stderr otherwise). Exits 1 (CommandError) when the broker cannot be reached, in which case nothing is changed and
the dispatches stay in the database for the next sweep, when publishing fails half-way, or when
the database fails.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from dispatcher.management.progress import Progress
from dispatcher.sweep import sweep
from workers.broker import BrokerUnreachable, check_broker

#: Seconds to wait for the broker before giving up.
BROKER_TIMEOUT = 5


class Command(BaseCommand):
    help = (
        "Runs the sweep now, as beat does every SITEMESSAGE_SWEEP_INTERVAL seconds: dispatches "
        "whose worker died are given back, expired ones fail, and due dispatches (retries, "
        "pending ones whose publish was lost, later deliveries whose time came) are published "
        "to the workers' queues. Exits 1 when the broker or the database fails; unpublished "
        "dispatches stay due for the next sweep."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--priority",
            type=int,
            default=None,
            metavar="N",
            help="only publish dispatches of messages with this priority (leases and expiry "
            "are seen to for every priority)",
        )

    def handle(self, *args: Any, priority: int | None = None, **options: Any) -> None:
        try:
            check_broker(BROKER_TIMEOUT)
        except BrokerUnreachable as exc:
            raise CommandError(
                f"{exc}; nothing was published, the dispatches stay in the database for the "
                "next sweep"
            ) from exc
        try:
            with Progress(self.stderr, "sweep", "steps", options["verbosity"]) as progress:
                result = sweep(priority=priority, progress=progress)
        except DatabaseError as exc:
            raise CommandError(f"the sweep failed on the database: {exc}") from exc
        where = "" if priority is None else f" of priority {priority}"
        self.stdout.write(
            f"expired leases: {result['expired']} given back for a retry, "
            f"{result['failed']} failed at their attempt limit; "
            f"{result['expired_unsent']} failed unsent past their expires_at; "
            f"{result['published']} dispatches{where} published"
        )
        if result["unpublished"]:
            raise CommandError(
                f"publishing failed for {result['unpublished']} dispatches (see the log); they "
                "stay in the database and are due again at the next sweep"
            )
