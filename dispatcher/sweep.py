"""The sweep: the database is the source of truth, the broker only carries hints.

Run by beat every SITEMESSAGE_SWEEP_INTERVAL seconds (and by ``manage.py
sitemessage_send_scheduled``). It is idempotent and safe to overlap with itself: publishing an
id twice is harmless because delivery claims rows atomically.

- PROCESSING rows whose lease expired (their worker died) go back to ERROR, due now, or to
  FAILED when they used up their attempts;
- PENDING and ERROR rows whose ``expires_at`` passed end FAILED unsent ("Expired"), in chunks;
- PENDING rows whose ``next_attempt_at`` passed (a publish lost at commit time, a broker that
  lost its queues, a ``send_at`` that came), PENDING rows published a sweep ago whose queue is
  empty (a worker died holding their task), and ERROR rows whose retry is due are published
  again, each to its lane (urgent or normal), and stay PENDING with a new ``next_attempt_at``
  so the next sweep does not publish them again while they wait in a queue; a row whose
  ``send_at`` is still ahead waits;
- schedule_messages.delay() calls stored but not expanded after SITEMESSAGE_REPUBLISH_AFTER
  seconds (their publish was lost) are expanded here.

``priority`` (``sitemessage_send_scheduled --priority N``) limits what the sweep publishes and
expands (dispatches, .delay() calls, messages waiting for their subscribers) to messages of
that priority; leases and expiry it sees to for every priority.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from messengers.exceptions import ScheduleError
from workers import broker
from workers.queues import queue_for

from . import conf
from .messages import retry_limit
from .models import Dispatch, DispatchError, ScheduleRequest
from .signals import dispatch_failed, send_outcome
from .toolbox import (
    expand_schedule_request,
    is_urgent,
    prepare_dispatches,
    publish_dispatches,
    republish_after,
)
from .types import get_registered_message_type

Status = Dispatch.Status


def sweep(
    priority: int | None = None, progress: Callable[[int, int], None] | None = None
) -> dict[str, int]:
    """Runs every step of the sweep once (see the module docstring); returns how many rows
    each step handled. Calls ``progress`` with (steps done, SWEEP_STEPS) after each step."""
    step = progress or (lambda done, total: None)
    now = timezone.now()
    expanded = expand_stale_requests(now, priority)
    step(1, SWEEP_STEPS)
    prepared = len(prepare_dispatches(limit=conf.SWEEP_LIMIT.get(), priority=priority))
    step(2, SWEEP_STEPS)
    expired, failed = release_expired_leases(now)
    step(3, SWEEP_STEPS)
    expired_unsent = fail_expired_unsent(now)
    step(4, SWEEP_STEPS)
    due = Dispatch.objects.filter(dispatch_status__in=[Status.PENDING, Status.ERROR]).filter(
        Q(next_attempt_at__lte=now) | Q(next_attempt_at__isnull=True) | stranded(now),
        not_early(now),
    )
    if priority is not None:
        due = due.filter(message__priority=priority)
    rows = list(
        due.order_by("-message__priority", "pk").values_list(
            "pk", "messenger", "message__priority"
        )[: conf.SWEEP_LIMIT.get()]
    )
    Dispatch.objects.filter(
        pk__in=[pk for pk, _, _ in rows], dispatch_status__in=[Status.PENDING, Status.ERROR]
    ).update(dispatch_status=Status.PENDING, next_attempt_at=now + republish_after())
    unpublished = publish_dispatches(rows)
    if unpublished:  # the broker is down: due again at the next sweep, not after REPUBLISH_AFTER
        Dispatch.objects.filter(pk__in=unpublished, dispatch_status=Status.PENDING).update(
            next_attempt_at=now
        )
    step(5, SWEEP_STEPS)
    return {
        "expanded": expanded,
        "prepared": prepared,
        "expired": expired,
        "failed": failed,
        "expired_unsent": expired_unsent,
        "published": len(rows) - len(unpublished),
        "unpublished": len(unpublished),
    }


#: The steps of sweep(): expand, prepare, release leases, fail expired rows, publish.
SWEEP_STEPS = 5


def sweep_interval() -> timedelta:
    return timedelta(seconds=conf.SWEEP_INTERVAL.get())


def not_early(now: datetime) -> Q:
    """Rows that may be sent now: no ``send_at``, or one that has come."""
    return Q(send_at__isnull=True) | Q(send_at__lte=now)


def stranded(now: datetime) -> Q:
    """PENDING rows published more than one sweep ago that still wait while their lane's queue
    (``messenger.<alias>`` or ``messenger.<alias>.urgent``) is empty: their task was taken by
    a worker that died before starting it. Redis gives such a task back only after its
    visibility timeout (an hour), so rather than wait for REPUBLISH_AFTER, the sweep
    publishes those rows again at once, to the same lane (if the task was only late, claiming
    makes the second one a no-op)."""
    published_before = now + republish_after() - sweep_interval()
    waiting = Dispatch.objects.filter(
        not_early(now),
        dispatch_status=Status.PENDING,
        next_attempt_at__gt=now,
        next_attempt_at__lte=published_before,
    )
    lanes = {
        (alias, is_urgent(priority))
        for alias, priority in waiting.values_list("messenger", "message__priority").distinct()
    }
    in_empty_lanes = Q(pk__in=[])  # none
    if not lanes:
        return in_empty_lanes
    lengths = broker.queue_lengths(sorted({queue_for(*lane) for lane in lanes}))
    for alias, urgent in sorted(lanes):
        if lengths.get(queue_for(alias, urgent)) == 0:
            in_empty_lanes |= Q(messenger=alias) & lane(urgent)
    return Q(dispatch_status=Status.PENDING, next_attempt_at__lte=published_before) & in_empty_lanes


def lane(urgent: bool) -> Q:
    """Rows whose message priority puts them on the urgent lane, or on the normal one."""
    threshold = conf.URGENT_PRIORITY.get()
    if threshold is None:
        return Q() if not urgent else Q(pk__in=[])
    return Q(message__priority__gte=threshold) if urgent else Q(message__priority__lt=threshold)


def fail_expired_unsent(now: datetime) -> int:
    """Ends PENDING and ERROR rows whose ``expires_at`` passed FAILED, unsent, each with an
    "Expired" error, in chunks of EXPIRE_CHUNK rows per transaction and at most SWEEP_LIMIT
    rows per sweep (the next sweep goes on). Locks each chunk first, as a claim of those rows
    would, so a worker never sends one this fails. Returns how many it failed."""
    failed, limit = 0, conf.SWEEP_LIMIT.get()
    expired = Dispatch.objects.filter(
        dispatch_status__in=[Status.PENDING, Status.ERROR], expires_at__lte=now
    ).order_by("pk")
    while failed < limit:
        size = min(EXPIRE_CHUNK, limit - failed)
        with transaction.atomic():
            rows = list(
                expired.select_for_update().values_list("pk", "retry_count", "expires_at")[:size]
            )
            Dispatch.objects.filter(pk__in=[pk for pk, _, _ in rows]).update(
                dispatch_status=Status.FAILED, next_attempt_at=None
            )
            DispatchError.objects.bulk_create(
                DispatchError.expired(pk, attempts, cast(datetime, expires_at), now)
                for pk, attempts, expires_at in rows  # not None: filtered on
            )
        failed += len(rows)
        _signal_failed([pk for pk, _, _ in rows])
        if len(rows) < EXPIRE_CHUNK:
            break
    return failed


def _signal_failed(pks: list[int]) -> None:
    """Sends dispatch_failed for rows this sweep failed (only when something listens)."""
    if pks and dispatch_failed.has_listeners():
        send_outcome(dispatch_failed, Dispatch.objects.select_related("message").filter(pk__in=pks))


#: Expired rows failed per transaction: short locks, and few parameters per statement.
EXPIRE_CHUNK = 500


def expand_stale_requests(now: datetime, priority: int | None = None) -> int:
    """Expands the stored .delay() calls whose task never came (with a ``priority``, only those
    among the oldest STALE_REQUESTS_PER_SWEEP that schedule a message of that priority; the
    others wait for a sweep without one); returns how many."""
    stale = ScheduleRequest.objects.filter(error="", time_created__lte=now - republish_after())
    oldest = stale.order_by("pk")[:STALE_REQUESTS_PER_SWEEP]
    if priority is None:
        pks = list(oldest.values_list("pk", flat=True))
    else:
        pks = [
            pk
            for pk, payload in oldest.values_list("pk", "payload")
            if priority in request_priorities(payload)
        ]
    expanded = 0
    for pk in pks:
        try:
            expanded += bool(expand_schedule_request(pk))
        except ScheduleError:
            pass  # logged, and kept with its reason for an operator
    return expanded


def request_priorities(payload: dict[str, Any]) -> set[int]:
    """The priorities of the messages a stored .delay() call schedules: the call's, else each
    message type's (a type no longer registered has none: its request fails on expansion)."""
    if payload.get("priority") is not None:
        return {payload["priority"]}
    priorities = set()
    for message in payload["messages"]:
        try:
            priorities.add(get_registered_message_type(message["type"]).priority)
        except LookupError:
            continue
    return priorities


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
    _signal_failed(final)
    return released, failed
