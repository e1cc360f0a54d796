"""Operations run in the calling process, for cron deployments, the management commands and
tests: ``send_scheduled_messages()``, ``check_undelivered()``, ``cleanup_sent_messages()``
(django-sitemessage's toolbox functions, with its names and meaning).

Delivery here goes through the same claim -> render -> send -> persist code the workers run
(``dispatcher.pipeline.deliver``) under a lease of this process, so a worker and a cron job
delivering at the same time never send a dispatch twice.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from messengers.base import MessengerBase, cool_down
from messengers.exceptions import DeliveryError, UnknownMessageTypeError, UnknownMessengerError
from messengers.registry import get_registered_messenger_object

from . import conf
from .messages import EmailTextMessage, get_registered_message_type
from .models import Dispatch, DispatchError, Message
from .pipeline import BatchResult, deliver, lease_owner
from .sweep import release_expired_leases
from .toolbox import recipients, schedule
from .validation import MAX_PRIORITY, check_priority

Status = Dispatch.Status
#: Characters of an error message the undelivered report shows.
ERROR_PREVIEW = 300
#: Ids per DELETE statement (SQLite limits the parameters of one statement).
DELETE_CHUNK = 500


def send_scheduled_messages(
    priority: int | None = None,
    ignore_unknown_messengers: bool = False,
    ignore_unknown_message_types: bool = False,
) -> BatchResult:
    """Delivers the due dispatches (PENDING, and ERROR whose retry is due) in this process, in
    batches of SITEMESSAGE_BATCH_SIZE per messenger, after giving back the rows of workers
    whose lease expired. ``priority`` limits it to messages of that priority. Returns the
    totals of what was claimed, sent, errored and failed; sent and failed rows are left alone,
    and rows a worker holds are skipped.

    Raises UnknownMessengerError (UnknownMessageTypeError) before sending anything when a due
    dispatch names a messenger (message type) that is not registered, unless
    ``ignore_unknown_messengers`` (``ignore_unknown_message_types``) is set: then those
    dispatches are left as they are. Raises ScheduleError for a priority that is not an
    integer from 0 to 32767."""
    if priority is not None:
        check_priority(priority, "priority")
    now = timezone.now()
    release_expired_leases(now)
    due = Dispatch.objects.filter(
        Q(dispatch_status=Status.PENDING)
        | Q(dispatch_status=Status.ERROR)
        & (Q(next_attempt_at__lte=now) | Q(next_attempt_at__isnull=True))
    )
    if priority is not None:
        due = due.filter(message__priority=priority)
    rows = list(
        due.order_by("-message__priority", "pk").values_list("pk", "messenger", "message__cls")
    )

    # Everything is checked before the first send, so an error leaves every row as it was.
    messengers: dict[str, MessengerBase] = {}
    for alias in sorted({alias for _, alias, _ in rows}):
        try:
            messengers[alias] = get_registered_messenger_object(alias)
        except UnknownMessengerError:
            if not ignore_unknown_messengers:
                raise
    unknown_types = set()
    for cls in sorted({cls for _, _, cls in rows}):
        try:
            get_registered_message_type(cls)
        except UnknownMessageTypeError:
            if not ignore_unknown_message_types:
                raise
            unknown_types.add(cls)
    ids_by_messenger: dict[str, list[int]] = defaultdict(list)
    for pk, alias, cls in rows:
        if alias in messengers and cls not in unknown_types:
            ids_by_messenger[alias].append(pk)

    # ERROR rows from a django-sitemessage database have no retry time; claim() takes only
    # due ones.
    due.filter(dispatch_status=Status.ERROR, next_attempt_at__isnull=True).update(
        next_attempt_at=now
    )
    total = BatchResult()
    owner = lease_owner(f"send_scheduled_messages-{uuid.uuid4().hex[:12]}")
    batch_size = conf.BATCH_SIZE.get()
    for alias, ids in ids_by_messenger.items():
        try:
            for start in range(0, len(ids), batch_size):
                result = deliver(alias, ids[start : start + batch_size], owner)
                total.claimed += result.claimed
                total.sent += result.sent
                total.errors += result.errors
                total.failed += result.failed
        finally:
            # This process is not a worker: nothing else would close the connection.
            cool_down(messengers[alias])
    return total


@dataclass
class Undelivered:
    messenger: str
    failed: int = 0
    stuck: int = 0
    last_error: str = ""


@dataclass
class UndeliveredReport:
    """FAILED dispatches, and PROCESSING ones whose lease expired (their worker died and no
    sweep has given them back yet), per messenger with the most recent error of each."""

    rows: list[Undelivered] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(row.failed + row.stuck for row in self.rows)

    @property
    def subject(self) -> str:
        return f"[sitemessage] {self.total} undelivered dispatches"

    @property
    def text(self) -> str:
        # The first line is django-sitemessage's, which scripts parse.
        lines = [f"Undelivered dispatches count: {self.total}."]
        for row in self.rows:
            lines.append(
                f"  {row.messenger}: {row.failed} failed, {row.stuck} stuck past their lease"
            )
            if row.last_error:
                lines.append(f"    most recent error: {row.last_error}")
        return "\n".join(lines)


def undelivered_report(
    now: datetime | None = None, progress: Callable[[int, int], None] | None = None
) -> UndeliveredReport:
    """Reads the undelivered dispatches (see UndeliveredReport); calls ``progress`` with
    (messengers read, messengers) after each messenger."""
    now = now or timezone.now()
    stuck = Q(dispatch_status=Status.PROCESSING, lease_expires_at__lt=now)
    queryset = Dispatch.objects.filter(Q(dispatch_status=Status.FAILED) | stuck)
    counts = queryset.values("messenger").annotate(
        failed=Count("pk", filter=Q(dispatch_status=Status.FAILED)),
        stuck=Count("pk", filter=stuck),
    )
    report = UndeliveredReport()
    per_messenger = list(counts.order_by("messenger"))
    for count in per_messenger:
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
        report.rows.append(row)
        if progress:
            progress(len(report.rows), len(per_messenger))
    return report


def report_recipients(to: str | Iterable[str] | None) -> list[str]:
    """The addresses a report goes to: ``to`` (one address or several), or, when it is None,
    the e-mail addresses of the ADMINS setting, as django-sitemessage does."""
    if to is None:
        return [admin if isinstance(admin, str) else admin[1] for admin in settings.ADMINS]
    return [to] if isinstance(to, str) else list(to)


def send_report(to: list[str], report: UndeliveredReport) -> None:
    """Stores the report as a message to ``to`` and delivers it now through the registered
    smtp messenger. Stored like any message but not published: this process delivers it, and
    if that fails the sweep retries it.

    Raises ScheduleError (nothing stored) when smtp is not registered or an address is
    invalid, DeliveryError unless every address accepted the report, DatabaseError when the
    database fails."""
    messenger = get_registered_messenger_object("smtp")
    [(_, dispatches)] = schedule(
        EmailTextMessage(report.subject, report.text),
        recipients(messenger, to),
        priority=MAX_PRIORITY,
        publish=False,
    )
    ids = [d.pk for d in dispatches]
    try:
        result = deliver("smtp", ids, lease_owner("check_undelivered"))
    finally:
        cool_down(messenger)
    if result.sent < len(ids):
        errors = DispatchError.objects.filter(dispatch_id__in=ids).order_by("pk")
        reasons = "; ".join(f"{e.exc_type}: {e.error_log[:ERROR_PREVIEW]}" for e in errors)
        raise DeliveryError(
            f"sending the report failed for {len(ids) - result.sent} of {len(ids)} "
            f"addresses: {reasons or 'no error recorded'}",
            alias="smtp",
        )


def check_undelivered(to: str | Iterable[str] | None = None) -> int:
    """Returns how many dispatches are undelivered (failed, or stuck past their lease); when
    there are any, e-mails the report to ``to`` (or to ADMINS when ``to`` is None; nobody
    when that is empty) through the smtp messenger, in this process. Raises as send_report()."""
    report = undelivered_report()
    if report.total:
        addresses = report_recipients(to)
        if addresses:
            send_report(addresses, report)
    return report.total


class Cleanup(NamedTuple):
    dispatches: int
    messages: int


def cleanup_sent_messages(
    ago: int | None = None,
    dispatches_only: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Cleanup:
    """Deletes SENT dispatches (those sent at least ``ago`` days ago, or all of them when
    ``ago`` is None or 0) with their error logs, and then the messages they belonged to that
    have no dispatch left, unless ``dispatches_only``. Returns how many of each it deleted.
    Deletes in chunks, each in its own transaction (see cleanup_for), and calls ``progress``
    with (dispatches deleted, dispatches to delete) after each.

    Raises TypeError or ValueError for an ``ago`` that is not a non-negative integer."""
    return cleanup_for(math.inf, ago, dispatches_only, progress)[0]


def cleanup_for(
    seconds: float,
    ago: int | None = None,
    dispatches_only: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Cleanup, bool]:
    """cleanup_sent_messages() for about ``seconds``: it stops after the chunk that used them
    up. Returns what it deleted, and True when it stopped so, with sent rows maybe left for
    the next run (the beat task's time limit bounds a run; the rows do not).

    The sent rows are taken DELETE_CHUNK ids at a time, each chunk selected with a LIMIT after
    the last id of the one before and deleted in a transaction of its own, so a table of
    millions is never loaded into memory nor locked for long, no statement names more than a
    chunk of ids, and what was deleted stays deleted when a run is interrupted."""
    if ago is not None:
        if not isinstance(ago, int) or isinstance(ago, bool):
            raise TypeError(f"ago must be a number of days (an integer), got {ago!r}")
        if ago < 0:
            raise ValueError(f"ago must be a number of days, 0 or more, got {ago}")
    sent = Dispatch.objects.filter(dispatch_status=Status.SENT)
    if ago:
        cutoff = timezone.now() - timedelta(days=ago)
        # sent_at is ours; time_dispatched is all a django-sitemessage row has.
        sent = sent.filter(
            Q(sent_at__lte=cutoff) | Q(sent_at__isnull=True, time_dispatched__lte=cutoff)
        )
    deadline = time.monotonic() + seconds
    total = sent.count() if progress else 0  # one count, only for a progress bar
    dispatches = messages = last = 0
    while True:
        with transaction.atomic():
            chunk = list(
                sent.filter(pk__gt=last)
                .order_by("pk")
                .values_list("pk", "message_id")[:DELETE_CHUNK]
            )
            if not chunk:
                return Cleanup(dispatches, messages), False
            Dispatch.objects.filter(pk__in=[pk for pk, _ in chunk]).delete()
            if not dispatches_only:
                orphans = Message.objects.filter(
                    pk__in={message_id for _, message_id in chunk}, dispatches__isnull=True
                )
                messages += orphans.delete()[1].get(Message._meta.label, 0)
        dispatches += len(chunk)
        last = chunk[-1][0]
        if progress:
            progress(dispatches, total)
        if len(chunk) < DELETE_CHUNK:
            return Cleanup(dispatches, messages), False
        if time.monotonic() >= deadline:
            return Cleanup(dispatches, messages), True
