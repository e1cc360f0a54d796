"""The delivery pipeline: claim -> render -> send -> persist, for one batch of one messenger.

Claiming is one UPDATE: only PENDING rows, and ERROR rows whose retry is due, become PROCESSING
under this run's lease. Rows claimed by another run or already sent are skipped, so a task that
the broker delivers twice sends nothing twice; rows a dead process held for the same task id are
taken back at once. The lease is short and renewed while the batch runs (LeaseKeeper), so the
rows of a worker that died are free again within one lease. A SENT outcome is written the moment the
messenger marks it, so a worker killed mid-batch loses the record of at most the dispatch it was
sending (the one duplicate a receiver may see); failures are written in small chunks, since
losing one of those costs only an extra attempt. Database errors (a restart, a locked SQLite)
are retried for a while instead of failing the batch.

A messenger with a ``rate_limit`` is sent one dispatch at a time, each after taking a slot from
the limiter all its workers share.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any, TypeVar

import redis
from django.db import (
    InterfaceError,
    OperationalError,
    connection,
    connections,
    router,
    transaction,
)
from django.db.backends.signals import connection_created
from django.db.models import F, Q, prefetch_related_objects
from django.utils import timezone

from messengers.base import Outcome, outcome_listener, record_outcome, unmarked, warm_up
from messengers.exceptions import UnknownMessengerError
from messengers.registry import get_registered_messenger_object

from . import conf, inflight, metrics
from .messages import MessageBase, get_registered_message_type, retry_limit
from .models import Dispatch, DispatchError, Message, OptOut
from .ratelimit import RateLimiter
from .signals import dispatch_failed, dispatch_sent, send_outcome

logger = logging.getLogger(__name__)
Status = Dispatch.Status
T = TypeVar("T")


@dataclass
class BatchResult:
    claimed: int = 0
    sent: int = 0
    errors: int = 0
    failed: int = 0
    #: 1 when the claim of waiting rows filled the batch: more may be waiting.
    more: int = 0


def lease_owner(run: str | None) -> str:
    """The lease owner of one delivery run in this process: host, pid and the run's name (the
    Celery task id), so an operator can tell which worker holds a dispatch."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{run or 'local'}"[:100]


def relax_commits() -> None:
    """Gives every PostgreSQL connection this process opens (and those open now)
    SITEMESSAGE_WORKER_SYNCHRONOUS_COMMIT; called once at worker start, before the pool forks.

    A worker writes one SENT mark per dispatch, and with synchronous_commit on each waits for
    a disk flush (about 0.5 ms here, more on most disks), which bounds one-at-a-time delivery.
    Every worker transaction is a state change the sweep recovers from when it is lost: a lost
    SENT mark re-sends that dispatch, a lost claim or error mark is redone. So "off" risks only
    duplicates after a PostgreSQL crash, never a message; a crashed worker process loses
    nothing more, since the server has each commit."""
    value = conf.WORKER_SYNCHRONOUS_COMMIT.get()
    if value is None:
        return

    def apply(connection: Any, **_: Any) -> None:
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('synchronous_commit', %s, false)", [value])

    connection_created.connect(apply, weak=False, dispatch_uid="sitemessage.relax_commits")
    for open_connection in connections.all(initialized_only=True):
        if open_connection.connection is not None:
            apply(open_connection)


def task_of(owner: str) -> str:
    """The Celery task id in a lease_owner() name ("" for an in-process run)."""
    run = owner.split(":", 2)[-1]
    return "" if run == "local" or ":" not in owner else run


def deliver(alias: str, dispatch_ids: list[int], owner: str, waiting: bool = False) -> BatchResult:
    """Delivers the given dispatches of one messenger (with ``waiting``, a worker's task, also
    other due ones, up to a batch: see claim_waiting); returns what happened to them."""
    recorder = Recorder(owner, alias)
    dispatches = with_db_retry(
        lambda: claim(alias, dispatch_ids, owner, waiting, result=recorder.result)
    )
    recorder.result.claimed = len(dispatches)
    if not dispatches:
        return recorder.result
    token = outcome_listener.set(recorder)
    keeper = LeaseKeeper(owner)
    try:
        try:
            messenger = get_registered_messenger_object(alias)
        except UnknownMessengerError as exc:
            # A worker configured without the messenger of a queue it consumes: retrying in
            # the same worker cannot help, so the dispatches fail where an operator sees them.
            error = UnknownMessengerError(alias, exc.registered, f"worker {owner}")
            logger.error("%s; %d dispatches failed", error, len(dispatches))
            for dispatch in dispatches:
                record_outcome(dispatch, Outcome("failed", error))
            return recorder.result
        recorder.overlap = _can_overlap(messenger)
        try:
            warm_up(messenger)
        except Exception as exc:
            logger.warning("messenger %s could not start: %s", alias, exc)
            for dispatch in dispatches:
                messenger.mark_exception(dispatch, exc)
        else:
            limiter = RateLimiter.of(messenger, max_wait=conf.RATE_LIMIT_MAX_WAIT.get())
            sendable = _without_opted_out(messenger, dispatches)
            for _, group in groupby(sendable, key=lambda d: d.message_id):
                _send_message(messenger, list(group), limiter)
                recorder.settle()  # the next message is rendered: its templates may query
        for dispatch in unmarked(dispatches):
            messenger.mark_error(
                dispatch, f"messenger {alias} returned without marking the dispatch"
            )
    finally:
        keeper.stop()
        outcome_listener.reset(token)
        recorder.flush()
    return recorder.result


def claim(
    alias: str,
    dispatch_ids: list[int],
    owner: str,
    waiting: bool = False,
    result: BatchResult | None = None,
) -> list[Dispatch]:
    """Takes the claimable rows among ``dispatch_ids`` for ``owner``, and those a dead process
    of this host held for the same run (see take_back); returns them, less those that expired
    (see fail_expired). With ``waiting``, also other due rows (claim_waiting), and
    ``result.more`` says whether they filled the batch. A row whose ``send_at`` is still ahead
    is not claimable: a task that arrives early sends nothing, and the sweep publishes the row
    when it is due."""
    now = timezone.now()
    db = connections[router.db_for_write(Dispatch)]
    if waiting and db.vendor == "postgresql":
        dispatches = _claim_in_one_statement(db.alias, alias, dispatch_ids, owner, now, result)
    else:
        dispatches = _claim_in_steps(alias, dispatch_ids, owner, now, waiting, result)
    # One Message object per message, not one copy of its context per dispatch.
    messages = Message.objects.in_bulk({d.message_id for d in dispatches})
    for dispatch in dispatches:
        dispatch.message = messages[dispatch.message_id]
    return fail_expired(dispatches, owner, now)


def _claim_in_steps(
    alias: str,
    dispatch_ids: list[int],
    owner: str,
    now: datetime,
    waiting: bool,
    result: BatchResult | None,
) -> list[Dispatch]:
    claimable = Dispatch.objects.filter(pk__in=dispatch_ids, messenger=alias).filter(
        Q(dispatch_status=Status.PENDING)
        | Q(dispatch_status=Status.ERROR, next_attempt_at__lte=now),
        Q(send_at__isnull=True) | Q(send_at__lte=now),
    )
    taken = claimable.update(
        dispatch_status=Status.PROCESSING,
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=conf.LEASE_SECONDS.get()),
        retry_count=F("retry_count") + 1,
        task_id=task_of(owner),
    )
    if taken < len(dispatch_ids):  # only rows left unclaimed can be a dead run's
        taken += take_back(alias, None if waiting else dispatch_ids, owner, now)
    room = conf.BATCH_SIZE.get() - taken
    if waiting and room > 0:
        extra = claim_waiting(alias, owner, now, room)
        taken += extra
        if result is not None:
            result.more = int(extra == room)
    logger.debug("%s: claimed %d for %d ids", alias, taken, len(dispatch_ids))
    return _held_by(owner, None if waiting else dispatch_ids)


def _held_by(owner: str, dispatch_ids: list[int] | None) -> list[Dispatch]:
    mine = Dispatch.objects.filter(dispatch_status=Status.PROCESSING, lease_owner=owner)
    if dispatch_ids is not None:
        mine = mine.filter(pk__in=dispatch_ids)
    return list(mine.select_related("recipient").order_by("message_id", "pk"))


def _claim_in_one_statement(
    db: str,
    alias: str,
    dispatch_ids: list[int],
    owner: str,
    now: datetime,
    result: BatchResult | None,
) -> list[Dispatch]:
    """A worker's claim on PostgreSQL (what _claim_in_steps does, with ``waiting``) as one
    statement that returns the claimed rows: the ids, the other due rows up to a batch (room
    for all the ids is kept, whether or not they are claimable), and the rows other processes
    hold for this run, which only then go to take_back. A lone task's claim took four round
    trips to the database, each on the latency path of its message; a task whose ids another
    worker already sent took three to claim nothing."""
    expires = now + timedelta(seconds=conf.LEASE_SECONDS.get())
    room = max(conf.BATCH_SIZE.get() - len(dispatch_ids), 0)
    parts = owner.split(":", 2)
    run = parts[2] if len(parts) == 3 else None
    # LIKE's own characters escaped; no lease_owner() name: a pattern no lease owner matches.
    held = "%:" + re.sub(r"([\\%_])", r"\\\1", run) if run else ""
    claimed = [Status.PROCESSING, owner, expires, task_of(owner)]
    params: list[Any] = [*claimed, dispatch_ids, alias, Status.PENDING, Status.ERROR, now, now]
    params += [alias, Status.PENDING, now, dispatch_ids, room, *claimed, Status.PENDING]
    params += [alias, Status.PROCESSING, held, owner]
    rows = list(Dispatch.objects.db_manager(db).raw(_claim_sql(db), params))
    kinds = [getattr(row, "claim_kind") for row in rows]  # noqa: B009 (the raw SQL's column)
    dispatches = [row for row, kind in zip(rows, kinds, strict=True) if kind != _HELD]
    extra = kinds.count(_WAITING)
    if result is not None and room:
        result.more = int(extra == room)
    if len(dispatches) < len(rows) and take_back(alias, None, owner, now):
        return _held_by(owner, None)  # rare: a dead process's rows came back
    prefetch_related_objects(dispatches, "recipient")
    dispatches.sort(key=lambda d: (d.message_id, d.pk))
    logger.debug("%s: claimed %d for %d ids", alias, len(dispatches), len(dispatch_ids))
    return dispatches


_BY_ID, _WAITING, _HELD = 1, 2, 3


@functools.cache
def _claim_sql(db: str) -> str:
    table = connections[db].ops.quote_name(Dispatch._meta.db_table)
    claim = (
        "SET dispatch_status = %s, lease_owner = %s, lease_expires_at = %s, "
        "retry_count = d.retry_count + 1, task_id = %s"
    )
    # Only the model's own table and column names go in; every value is a parameter. The
    # waiting rows are picked once, in a materialized CTE: as an IN (subquery) the planner may
    # run the LIMIT again per row and take more than the room.
    return (
        f"WITH by_id AS (UPDATE {table} AS d {claim} "  # noqa: S608
        "WHERE d.id = ANY(%s::bigint[]) AND d.messenger = %s AND (d.dispatch_status = %s "
        "OR (d.dispatch_status = %s AND d.next_attempt_at <= %s)) "
        "AND (d.send_at IS NULL OR d.send_at <= %s) RETURNING d.*), "
        f"picked AS MATERIALIZED (SELECT id FROM {table} "
        "WHERE messenger = %s AND dispatch_status = %s AND (send_at IS NULL OR send_at <= %s) "
        "AND id <> ALL(%s::bigint[]) ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED), "
        f"waiting AS (UPDATE {table} AS d {claim} FROM picked "
        "WHERE d.id = picked.id AND d.dispatch_status = %s RETURNING d.*), "
        f"held AS (SELECT * FROM {table} WHERE messenger = %s AND dispatch_status = %s "
        "AND lease_owner LIKE %s AND lease_owner <> %s) "
        f"SELECT {_BY_ID} AS claim_kind, * FROM by_id "
        f"UNION ALL SELECT {_WAITING}, * FROM waiting UNION ALL SELECT {_HELD}, * FROM held"
    )


def claim_waiting(alias: str, owner: str, now: datetime, room: int) -> int:
    """Also takes up to ``room`` other pending dispatches of this messenger that are due (the
    oldest first, whichever task carries their ids): a task is a doorbell, and a warm worker
    handed one id of a stream of one-recipient messages sends the ones already waiting in the
    same batch instead of one task each; the tasks that carry their ids then claim nothing.
    Rows another run is claiming right now are skipped (SKIP LOCKED where the database has
    it), so workers do not queue behind each other; the claim itself stays the one UPDATE that
    only a PENDING row passes. (On PostgreSQL a worker's claim is one statement with this in
    it: _claim_in_one_statement.)"""
    lease_expires_at = now + timedelta(seconds=conf.LEASE_SECONDS.get())
    with transaction.atomic():
        waiting = Dispatch.objects.filter(
            Q(send_at__isnull=True) | Q(send_at__lte=now),
            messenger=alias,
            dispatch_status=Status.PENDING,
        )
        pks = list(
            waiting.select_for_update(skip_locked=True)
            .order_by("pk")
            .values_list("pk", flat=True)[:room]
        )
        if not pks:
            return 0
        return Dispatch.objects.filter(pk__in=pks, dispatch_status=Status.PENDING).update(
            dispatch_status=Status.PROCESSING,
            lease_owner=owner,
            lease_expires_at=lease_expires_at,
            retry_count=F("retry_count") + 1,
            task_id=task_of(owner),
        )


def fail_expired(dispatches: list[Dispatch], owner: str, now: datetime) -> list[Dispatch]:
    """Ends the claimed dispatches whose ``expires_at`` has passed FAILED without sending them
    (a late one-time code or sale is worse than none), each with an "Expired" error and the
    dispatch_failed signal; returns the others. Expiring is no attempt: the claim's count is
    given back."""
    expiry = {d.pk: d.expires_at for d in dispatches if d.expires_at and d.expires_at <= now}
    if not expiry:
        return dispatches
    expired = [d for d in dispatches if d.pk in expiry]
    with transaction.atomic():
        Dispatch.objects.filter(
            pk__in=list(expiry), dispatch_status=Status.PROCESSING, lease_owner=owner
        ).update(
            dispatch_status=Status.FAILED,
            retry_count=F("retry_count") - 1,
            lease_owner="",
            lease_expires_at=None,
            next_attempt_at=None,
        )
        for dispatch in expired:
            dispatch.dispatch_status = Status.FAILED
            dispatch.retry_count -= 1
            dispatch.lease_owner, dispatch.lease_expires_at = "", None
            dispatch.next_attempt_at = None
        DispatchError.objects.bulk_create(
            DispatchError.expired(d.pk, d.retry_count, expiry[d.pk], now) for d in expired
        )
    logger.info("%s: %d claimed dispatches had expired: failed unsent", owner, len(expired))
    send_outcome(dispatch_failed, expired)
    return [d for d in dispatches if d.pk not in expiry]


def take_back(alias: str, dispatch_ids: list[int] | None, owner: str, now: datetime) -> int:
    """Takes over the rows that a process which died mid-batch held for this same run.

    A task whose worker process was killed is delivered again with the same task id (acks_late
    with task_reject_on_worker_lost, or a broker that requeues a dead consumer's messages); the
    rows its first run claimed carry that id in their lease owner. Waiting for their lease to
    expire would keep those recipients waiting; instead the new run takes them back at once,
    but only from a process of this host that is gone, so a live run never loses its rows.
    Rows held on another host are left to the lease and the sweep. Each is an interrupted
    attempt, logged as WorkerLost. ``dispatch_ids``: only those of them (None: every row the
    dead run held, also those it claimed beyond the ids of its task).
    """
    parts = owner.split(":", 2)
    if len(parts) != 3:  # not a lease_owner() name: nothing to recognise
        return 0
    host, _, run = parts
    held = Dispatch.objects.filter(
        messenger=alias,
        dispatch_status=Status.PROCESSING,
        lease_owner__endswith=f":{run}",
    ).exclude(lease_owner=owner)
    if dispatch_ids is not None:  # None: all the dead run held, also beyond its ids
        held = held.filter(pk__in=dispatch_ids)
    dead = {
        previous
        for previous in held.values_list("lease_owner", flat=True).distinct()
        if previous.split(":", 2)[0] == host and not _process_alive(previous.split(":", 2)[1])
    }
    if not dead:
        return 0
    rows = list(held.filter(lease_owner__in=dead).values_list("pk", "retry_count", "lease_owner"))
    taken = held.filter(pk__in=[pk for pk, _, _ in rows], lease_owner__in=dead).update(
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=conf.LEASE_SECONDS.get()),
        retry_count=F("retry_count") + 1,
        task_id=task_of(owner),
    )
    DispatchError.objects.bulk_create(
        DispatchError(
            dispatch_id=pk,
            attempt=attempts,
            exc_type="WorkerLost",
            error_log=f"{previous} died mid-batch; its run was delivered again and took it back",
            time_created=now,
        )
        for pk, attempts, previous in rows
    )
    logger.warning("%s: took back %d dispatches from a dead process of this run", alias, taken)
    return taken


def _process_alive(pid: str) -> bool:
    """Whether a process of this host runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # no /proc: ask the kernel
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError):
            return True
        return True


class LeaseKeeper:
    """Renews this run's lease every third of SITEMESSAGE_LEASE_SECONDS while the batch runs,
    from a thread of its own, so a slow send never loses the lease, and a lease can be short:
    when the process dies, renewal stops and its rows are free again within one lease."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.seconds = conf.LEASE_SECONDS.get()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        # Inside a transaction (a test's, or a caller's), other connections cannot see the
        # claimed rows, so a renewal could not find them; it would only wait for the lock.
        if not connection.in_atomic_block:
            self.thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.wait(self.seconds / 3):
                with_db_retry(self.renew)
        except Exception:
            logger.exception("lease renewal of %s stopped", self.owner)
        finally:
            connection.close()  # this thread's own connection

    def renew(self) -> int:
        return Dispatch.objects.filter(
            dispatch_status=Status.PROCESSING, lease_owner=self.owner
        ).update(lease_expires_at=timezone.now() + timedelta(seconds=self.seconds))

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()


def _can_overlap(messenger: Any) -> bool:
    """Whether SENT marks may be sent ahead for this messenger (see Recorder)."""
    if not getattr(messenger, "settles_outcomes", False):
        return False
    return inflight.supported(connections[router.db_for_write(Dispatch)])


def _send_message(messenger: Any, dispatches: list[Dispatch], limiter: RateLimiter | None) -> None:
    message_model = dispatches[0].message
    try:
        message_cls = get_registered_message_type(message_model.cls)
    except LookupError as exc:
        for dispatch in dispatches:
            messenger.mark_error(dispatch, exc)
        return
    ready = _render(messenger, message_cls, message_model, dispatches)
    if limiter is None:
        _send(messenger, message_cls, message_model, ready)
        return
    for index, dispatch in enumerate(ready):
        try:
            wait = limiter.acquire()
        except redis.RedisError as exc:
            for rest in ready[index:]:
                messenger.mark_error(rest, f"rate limiter unavailable: {exc!r}")
            return
        if wait:  # no slot soon enough: give the rest back, without spending an attempt
            logger.info("%s: rate limit, %d dispatches deferred", messenger, len(ready) - index)
            for rest in ready[index:]:
                record_outcome(rest, Outcome("deferred", retry_after=wait))
            return
        _send(messenger, message_cls, message_model, [dispatch])


def _without_opted_out(messenger: Any, dispatches: list[Dispatch]) -> list[Dispatch]:
    """Fails the dispatches whose recipient unsubscribed from their message type through this
    messenger (also those addressed explicitly), with one query for the batch; returns the
    others."""
    checked = [d for d in dispatches if _can_unsubscribe(d.message.cls)]
    opted_out = OptOut.opted_out(checked)
    for dispatch in checked:
        if dispatch.pk in opted_out:
            messenger.mark_failed(
                dispatch,
                f"unsubscribed: the recipient opted out of {dispatch.message.cls!r} "
                f"through {dispatch.messenger!r}",
            )
    return [d for d in dispatches if d.pk not in opted_out]


def _can_unsubscribe(alias: str) -> bool:
    try:
        return get_registered_message_type(alias).allow_user_subscription
    except LookupError:
        return False  # failed as unknown when its message is sent


def _render(
    messenger: Any, message_cls: type[MessageBase], message_model: Any, dispatches: list[Dispatch]
) -> list[Dispatch]:
    """Gives each dispatch its body (kept from an earlier attempt, compiled for it, or the one
    body of a type without a dynamic context with this recipient's links put in) and, for a
    type one can unsubscribe from, its ``unsubscribe_url`` (List-Unsubscribe); returns those
    that have a body."""
    shared: str | None = None
    ready = []
    for dispatch in dispatches:
        try:
            # Signed once per dispatch, for the body's link and for List-Unsubscribe.
            url = message_cls.get_unsubscribe_directive(message_model, dispatch)
            if not dispatch.message_cache:
                if message_cls.has_dynamic_context:
                    dispatch.message_cache = message_cls.compile(message_model, messenger, dispatch)
                else:
                    if shared is None:
                        shared = message_cls.compile(message_model, messenger, None)
                    body = message_cls.personalise(shared, message_model, dispatch, url)
                    dispatch.message_cache, dispatch.body_shared = body, True
            dispatch.unsubscribe_url = url if url.startswith("https://") else ""
        except Exception as exc:
            logger.warning("rendering dispatch %s failed: %r", dispatch.pk, exc)
            messenger.mark_error(dispatch, exc)
            continue
        ready.append(dispatch)
    return ready


def _send(
    messenger: Any, message_cls: type[MessageBase], message_model: Any, dispatches: list[Dispatch]
) -> None:
    if not dispatches:
        return
    try:
        messenger.send(message_cls, message_model, dispatches)
    except Exception as exc:
        logger.warning(
            "messenger %s raised while sending message %s: %r", messenger, message_model.pk, exc
        )
        for dispatch in unmarked(dispatches):
            messenger.mark_exception(dispatch, exc)


class Recorder:
    """Persists outcomes while the batch is being sent, only while this run still owns the rows:
    SENT at once, the others in chunks of SITEMESSAGE_OUTCOME_CHUNK.

    With ``overlap`` (a messenger that calls settle_outcomes() before each delivery, on
    PostgreSQL), a SENT mark is sent without waiting for its answer, which is read when the
    messenger settles before the next delivery, or before any other query: one mark at most is
    in flight, and it is stored before the next message goes out."""

    def __init__(self, owner: str, alias: str) -> None:
        self.owner = owner
        self.alias = alias
        self.pending: list[Dispatch] = []
        self.result = BatchResult()
        self.chunk = conf.OUTCOME_CHUNK.get()
        self.clock = time.perf_counter()
        self.overlap = False
        self.in_flight: tuple[Dispatch, inflight.InFlight] | None = None

    def __call__(self, dispatch: Dispatch) -> None:
        self.add(dispatch)

    def add(self, dispatch: Dispatch) -> None:
        # The messenger's time for this dispatch: since the previous outcome, or the start.
        now = time.perf_counter()
        metrics.observe_send(self.alias, now - self.clock)
        self.clock = now
        if dispatch.outcome.status == "sent":
            self._write_sent(dispatch)
            return
        self.pending.append(dispatch)
        if len(self.pending) >= self.chunk:
            self.flush()

    def _write_sent(self, dispatch: Dispatch) -> None:
        apply_outcome(dispatch, dispatch.outcome, timezone.now())
        self.settle()
        if self.overlap:
            try:
                self.in_flight = (dispatch, send_sent(dispatch, self.owner))
                return
            except Exception as exc:  # a broken connection: the usual write retries it
                logger.debug("SENT mark of dispatch %s not sent ahead: %r", dispatch.pk, exc)
        self._count(dispatch, self._write_again(dispatch))

    def _write_again(self, dispatch: Dispatch) -> int:
        """write_sent(), retried while the database is unavailable. A write whose answer was
        lost may have been stored: a row found SENT at this dispatch's own sent_at is ours."""
        owned = with_db_retry(lambda: write_sent(dispatch, self.owner))
        if owned:
            return owned
        return int(
            Dispatch.objects.filter(
                pk=dispatch.pk, dispatch_status=Status.SENT, sent_at=dispatch.sent_at
            ).exists()
        )

    def settle(self) -> None:
        """Waits for the SENT mark in flight, if any; one that failed is written again."""
        if self.in_flight is None:
            return
        dispatch, write = self.in_flight
        self.in_flight = None
        owned = write.rowcount()
        self._count(dispatch, self._write_again(dispatch) if owned is None else owned)

    def flush(self) -> None:
        self.settle()
        pending, self.pending = self.pending, []
        if not pending:
            return
        now = timezone.now()
        errors = {}
        for dispatch in pending:
            error = apply_outcome(dispatch, dispatch.outcome, now)
            if error is not None:
                errors[dispatch.pk] = error

        def write() -> set[int]:
            with transaction.atomic():
                owned = set(
                    Dispatch.objects.select_for_update()
                    .filter(
                        pk__in=[d.pk for d in pending],
                        dispatch_status=Status.PROCESSING,
                        lease_owner=self.owner,
                    )
                    .values_list("pk", flat=True)
                )
                for shared in (False, True):
                    rows = [d for d in pending if d.pk in owned and d.body_shared is shared]
                    if rows:
                        Dispatch.objects.bulk_update(rows, outcome_fields(rows[0]))
                DispatchError.objects.bulk_create([e for pk, e in errors.items() if pk in owned])
            return owned

        owned = with_db_retry(write)
        for dispatch in pending:
            self._count(dispatch, dispatch.pk in owned)

    def _count(self, dispatch: Dispatch, owned: bool | int) -> None:
        if not owned:
            logger.warning(
                "outcome of dispatch %s dropped: its lease expired and another run took it",
                dispatch.pk,
            )
        elif dispatch.dispatch_status in _COUNTER:
            name = _COUNTER[dispatch.dispatch_status]
            setattr(self.result, name, getattr(self.result, name) + 1)
            metrics.count_outcome(self.alias, _METRIC[dispatch.dispatch_status])
            signal = _SIGNALS.get(dispatch.dispatch_status)
            if signal is not None:
                send_outcome(signal, [dispatch])


def write_sent(dispatch: Dispatch, owner: str) -> int:
    """Stores a SENT outcome (set on ``dispatch`` by apply_outcome) if ``owner`` still holds
    the row; returns the number of rows written (0 or 1). One prepared UPDATE: it is written
    once per delivered dispatch, and building it with the ORM cost more than running it."""
    db, sql, params = _sent_statement(dispatch, owner)
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount)


def send_sent(dispatch: Dispatch, owner: str) -> inflight.InFlight:
    """write_sent()'s statement, sent without waiting for its answer (PostgreSQL)."""
    return inflight.InFlight(*_sent_statement(dispatch, owner))


def _sent_statement(dispatch: Dispatch, owner: str) -> tuple[Any, str, list[Any]]:
    db = connections[router.db_for_write(Dispatch)]
    fields = _fields_of(tuple(outcome_fields(dispatch)))
    params = [field.get_db_prep_save(getattr(dispatch, field.attname), db) for field in fields]
    return db, _sent_sql(db.alias, fields), [*params, dispatch.pk, Status.PROCESSING, owner]


@functools.cache
def _fields_of(names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(Dispatch._meta.get_field(name) for name in names)


@functools.cache
def _sent_sql(db: str, fields: tuple[Any, ...]) -> str:
    quote = connections[db].ops.quote_name
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in fields)
    # Only the model's own table and column names go in; every value is a parameter.
    return (
        f"UPDATE {quote(Dispatch._meta.db_table)} SET {assignments} "  # noqa: S608
        f"WHERE {quote('id')} = %s AND {quote('dispatch_status')} = %s "
        f"AND {quote('lease_owner')} = %s"
    )


def with_db_retry(operation: Callable[[], T]) -> T:
    """Runs a database operation, retrying it while the database is unreachable or locked, for
    up to SITEMESSAGE_DB_RETRY_SECONDS (the task's time limit still applies)."""
    deadline = time.monotonic() + conf.DB_RETRY_SECONDS.get()
    delay = 0.1
    while True:
        try:
            return operation()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline or connection.in_atomic_block:
                raise
            logger.warning("database unavailable (%s); retrying in %.1f s", exc, delay)
            connection.close()  # a broken connection is replaced by the next query
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


_COUNTER: dict[int, str] = {Status.SENT: "sent", Status.ERROR: "errors", Status.FAILED: "failed"}
_METRIC: dict[int, str] = {Status.SENT: "sent", Status.ERROR: "retried", Status.FAILED: "failed"}
_SIGNALS: dict[int, Any] = {Status.SENT: dispatch_sent, Status.FAILED: dispatch_failed}
_OUTCOME_FIELDS = [
    "dispatch_status",
    "retry_count",
    "sent_at",
    "provider_message_id",
    "next_attempt_at",
    "lease_owner",
    "lease_expires_at",
    "message_cache",
]
_SHARED_BODY_FIELDS = [name for name in _OUTCOME_FIELDS if name != "message_cache"]


def outcome_fields(dispatch: Dispatch) -> list[str]:
    """The fields an outcome writes: a body shared by all recipients is not stored per row."""
    return _SHARED_BODY_FIELDS if dispatch.body_shared else _OUTCOME_FIELDS


def apply_outcome(dispatch: Dispatch, outcome: Outcome, now: datetime) -> DispatchError | None:
    """Sets the row fields for an outcome; returns the error record to store, if any."""
    dispatch.lease_owner = ""
    dispatch.lease_expires_at = None
    dispatch.next_attempt_at = None
    if outcome.status == "deferred":  # not an attempt: no slot was free to make one
        dispatch.dispatch_status = Status.ERROR
        dispatch.retry_count -= 1
        dispatch.next_attempt_at = now + timedelta(seconds=outcome.retry_after or 0)
        return None
    if outcome.status == "sent":
        dispatch.dispatch_status = Status.SENT
        dispatch.sent_at = now
        dispatch.provider_message_id = outcome.provider_id[:255]
        return None
    limit = retry_limit(dispatch.message.cls)
    if outcome.status == "failed" or dispatch.retry_count >= limit:
        dispatch.dispatch_status = Status.FAILED
    else:
        dispatch.dispatch_status = Status.ERROR
        delay = max(backoff(dispatch.retry_count), outcome.retry_after or 0)
        dispatch.next_attempt_at = now + timedelta(seconds=delay)
    error = outcome.error
    return DispatchError(
        dispatch=dispatch,
        attempt=dispatch.retry_count,
        exc_type=type(error).__name__ if isinstance(error, BaseException) else "",
        error_log=str(error),
        time_created=now,
    )


def backoff(attempts: int) -> float:
    """Seconds before the next attempt: exponential in the attempts made, capped, with jitter
    (between half and all of it) so a burst of failures does not come back as one burst."""
    base = conf.RETRY_BACKOFF.get()
    cap = conf.RETRY_BACKOFF_MAX.get()
    delay = min(cap, base * 2 ** max(attempts - 1, 0))
    return delay / 2 + random.uniform(0, delay / 2)
