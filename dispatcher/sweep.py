"""The sweep: the database is the source of truth, the broker only carries hints.

Run by beat every SITEMESSAGE_SWEEP_INTERVAL seconds (and by ``manage.py
sitemessage_send_scheduled``). It is idempotent and safe to overlap with itself: publishing an
id twice is harmless because delivery claims rows atomically.

- PROCESSING rows whose lease expired (their worker died) go back to ERROR, due now, or to
  FAILED when they used up their attempts;
- PENDING rows whose ``next_attempt_at`` passed (a publish lost at commit time, a broker that
  lost its queues), PENDING rows published a sweep ago whose queue is empty (a worker died
  holding their task), and ERROR rows whose retry is due are published again, and stay PENDING with
  a new ``next_attempt_at`` so the next sweep does not publish them again while they wait in a
  queue;
- schedule_messages.delay() calls stored but not expanded after SITEMESSAGE_REPUBLISH_AFTER
  seconds (their publish was lost) are expanded here.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from messengers.exceptions import ScheduleError
from workers import broker

from . import conf
from .messages import retry_limit
from .models import Dispatch, DispatchError, ScheduleRequest
from .toolbox import expand_schedule_request, publish_dispatches, republish_after

Status = Dispatch.Status


def sweep(priority: int | None = None) -> dict[str, int]:
    now = timezone.now()
    expanded = expand_stale_requests(now)
    expired, failed = release_expired_leases(now)
    stranded = Q(
        dispatch_status=Status.PENDING,
        messenger__in=stranded_messengers(now),
        next_attempt_at__lte=now + republish_after() - sweep_interval(),
    )
    due = Dispatch.objects.filter(dispatch_status__in=[Status.PENDING, Status.ERROR]).filter(
        Q(next_attempt_at__lte=now) | Q(next_attempt_at__isnull=True) | stranded
    )
    if priority is not None:
        due = due.filter(message__priority=priority)
    rows = list(
        due.order_by("-message__priority", "pk").values_list("pk", "messenger")[
            : conf.SWEEP_LIMIT.get()
        ]
    )
    Dispatch.objects.filter(
        pk__in=[pk for pk, _ in rows], dispatch_status__in=[Status.PENDING, Status.ERROR]
    ).update(dispatch_status=Status.PENDING, next_attempt_at=now + republish_after())
    unpublished = publish_dispatches(rows)
    if unpublished:  # the broker is down: due again at the next sweep, not after REPUBLISH_AFTER
        Dispatch.objects.filter(pk__in=unpublished, dispatch_status=Status.PENDING).update(
            next_attempt_at=now
        )
    return {
        "expanded": expanded,
        "expired": expired,
        "failed": failed,
        "published": len(rows) - len(unpublished),
        "unpublished": len(unpublished),
    }


def sweep_interval() -> timedelta:
    return timedelta(seconds=conf.SWEEP_INTERVAL.get())


def stranded_messengers(now: datetime) -> list[str]:
    """Messengers whose queue is empty while dispatches published more than one sweep ago
    still wait: their task was taken by a worker that died before starting it. Redis gives
    such a task back only after its visibility timeout (an hour), so rather than wait for
    REPUBLISH_AFTER, the sweep publishes those rows again at once (if the task was only
    late, claiming makes the second one a no-op)."""
    published_before = now + republish_after() - sweep_interval()
    waiting = Dispatch.objects.filter(
        dispatch_status=Status.PENDING,
        next_attempt_at__gt=now,
        next_attempt_at__lte=published_before,
    )
    aliases = set(waiting.values_list("messenger", flat=True).distinct())
    if not aliases:
        return []
    lengths = broker.queue_lengths(sorted(aliases))
    return [alias for alias in sorted(aliases) if lengths.get(alias) == 0]


def expand_stale_requests(now: datetime) -> int:
    """Expands the stored .delay() calls whose task never came; returns how many."""
    stale = ScheduleRequest.objects.filter(error="", time_created__lte=now - republish_after())
    expanded = 0
    for pk in stale.order_by("pk").values_list("pk", flat=True)[:STALE_REQUESTS_PER_SWEEP]:
        try:
            expanded += bool(expand_schedule_request(pk))
        except ScheduleError:
            pass  # logged, and kept with its reason for an operator
    return expanded


#: Stale schedule requests one sweep expands (each may hold many recipients).
STALE_REQUESTS_PER_SWEEP = 100


def release_expired_leases(now: datetime) -> tuple[int, int]:
    """Returns the rows a dead worker left PROCESSING to ERROR (or FAILED at the limit). Locks
    them first, so two overlapping sweeps do not both release (and log) the same row."""
    with transaction.atomic():
        rows = list(
            Dispatch.objects.select_for_update()
            .filter(dispatch_status=Status.PROCESSING, lease_expires_at__lt=now)
            .values_list("pk", "retry_count", "message__cls", "lease_owner")
        )
        if not rows:
            return 0, 0
        final = [pk for pk, attempts, cls, _ in rows if attempts >= retry_limit(cls)]
        retry = [pk for pk, attempts, cls, _ in rows if attempts < retry_limit(cls)]
        released = Dispatch.objects.filter(pk__in=retry).update(
            dispatch_status=Status.ERROR, lease_owner="", lease_expires_at=None, next_attempt_at=now
        )
        failed = Dispatch.objects.filter(pk__in=final).update(
            dispatch_status=Status.FAILED,
            lease_owner="",
            lease_expires_at=None,
            next_attempt_at=None,
        )
        DispatchError.objects.bulk_create(
            DispatchError(
                dispatch_id=pk,
                attempt=attempts,
                exc_type="LeaseExpired",
                error_log=f"the worker {owner} did not finish the dispatch before its lease expired",
                time_created=now,
            )
            for pk, attempts, _, owner in rows
        )
    return released, failed
