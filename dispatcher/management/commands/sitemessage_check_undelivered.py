"""``manage.py sitemessage_check_undelivered [--to ADDRESS ...]``: reports undelivered dispatches.

Undelivered: FAILED dispatches, and PROCESSING dispatches whose lease expired (their worker died
and no sweep has given them back yet). The report gives counts per messenger and the most recent
error of each; with ``--to`` it is also e-mailed, in this process, through the registered
``smtp`` messenger (stored as a message like any other, so the sweep retries it if this fails).

Exits 0 when nothing is undelivered, 1 when something is or when the report cannot be sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.db.models import Count, Q
from django.utils import timezone

from dispatcher.messages import EmailTextMessage
from dispatcher.models import Dispatch, DispatchError
from dispatcher.pipeline import deliver, lease_owner
from dispatcher.toolbox import MAX_PRIORITY, recipients, schedule
from messengers.base import cool_down
from messengers.exceptions import SitemessageError
from messengers.registry import get_registered_messenger_object

Status = Dispatch.Status
#: Characters of an error message the report shows.
ERROR_PREVIEW = 300


@dataclass
class Undelivered:
    messenger: str
    failed: int = 0
    stuck: int = 0
    last_error: str = ""


class Command(BaseCommand):
    help = (
        "Reports failed dispatches and dispatches stuck past their lease; with --to, e-mails "
        "the report. Exits 1 when there are any."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--to",
            nargs="+",
            action="extend",
            default=[],
            metavar="ADDRESS",
            help="e-mail the report to these addresses (through the smtp messenger)",
        )

    def handle(self, *args: Any, to: list[str], **options: Any) -> None:
        try:
            rows = undelivered(timezone.now())
        except DatabaseError as exc:
            raise CommandError(f"cannot read the dispatches: {exc}") from exc
        if not rows:
            self.stdout.write("No undelivered dispatches.")
            return
        total = sum(row.failed + row.stuck for row in rows)
        report = format_report(rows, total)
        self.stdout.write(report)
        if to:
            send_report(to, f"[sitemessage] {total} undelivered dispatches", report)
            self.stdout.write(f"Report e-mailed to {', '.join(to)}.")
        raise CommandError(f"{total} undelivered dispatches")


def undelivered(now: datetime) -> list[Undelivered]:
    """Counts per messenger, with the most recent error of each."""
    stuck = Q(dispatch_status=Status.PROCESSING, lease_expires_at__lt=now)
    queryset = Dispatch.objects.filter(Q(dispatch_status=Status.FAILED) | stuck)
    counts = queryset.values("messenger").annotate(
        failed=Count("pk", filter=Q(dispatch_status=Status.FAILED)),
        stuck=Count("pk", filter=stuck),
    )
    rows = []
    for count in counts.order_by("messenger"):
        row = Undelivered(count["messenger"], count["failed"], count["stuck"])
        error = (
            DispatchError.objects.filter(dispatch__in=queryset.filter(messenger=row.messenger))
            .order_by("-time_created", "-pk")
            .first()
        )
        if error is not None:
            row.last_error = (
                f"dispatch {error.dispatch_id}, attempt {error.attempt}, "
                f"{error.time_created:%Y-%m-%d %H:%M:%S}: "
                f"{error.exc_type + ': ' if error.exc_type else ''}{error.error_log[:ERROR_PREVIEW]}"
            )
        elif row.stuck:
            row.last_error = "no error recorded: the worker died before writing an outcome"
        rows.append(row)
    return rows


def format_report(rows: list[Undelivered], total: int) -> str:
    lines = [f"Undelivered dispatches: {total}"]
    for row in rows:
        lines.append(f"  {row.messenger}: {row.failed} failed, {row.stuck} stuck past their lease")
        if row.last_error:
            lines.append(f"    most recent error: {row.last_error}")
    return "\n".join(lines)


def send_report(to: list[str], subject: str, text: str) -> None:
    """Stores the report as a message to ``to`` and delivers it now through the registered
    smtp messenger; raises CommandError unless every address accepted it."""
    # Stored like any message but not published: this process delivers it, and if that fails
    # the sweep retries it.
    try:
        messenger = get_registered_messenger_object("smtp")
        [(_, dispatches)] = schedule(
            EmailTextMessage(subject, text),
            recipients(messenger, to),
            priority=MAX_PRIORITY,
            publish=False,
        )
    except SitemessageError as exc:
        raise CommandError(f"cannot send the report: {exc}") from exc
    except DatabaseError as exc:
        raise CommandError(f"cannot store the report: {exc}") from exc
    ids = [d.pk for d in dispatches]
    try:
        result = deliver("smtp", ids, lease_owner("check_undelivered"))
    except DatabaseError as exc:
        raise CommandError(f"cannot deliver the report: {exc}") from exc
    finally:
        cool_down(messenger)
    if result.sent < len(ids):
        errors = DispatchError.objects.filter(dispatch_id__in=ids).order_by("pk")
        reasons = "; ".join(f"{e.exc_type}: {e.error_log[:ERROR_PREVIEW]}" for e in errors)
        raise CommandError(
            f"sending the report failed for {len(ids) - result.sent} of {len(ids)} "
            f"addresses: {reasons or 'no error recorded'}"
        )
