"""The delivery pipeline and the sweep, in process on real rows: claims, outcomes, retries,
backoff, leases."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from dispatcher import pipeline, sweep, toolbox
from dispatcher.messages import PlainTextMessage, register_message_types
from dispatcher.models import Dispatch, DispatchError
from messengers import registry
from messengers.exceptions import (
    InvalidContextError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from messengers.registry import register_messenger_objects
from sitemessage.utils import MessengerBase

pytestmark = pytest.mark.django_db
Status = Dispatch.Status


class TwiceMessage(PlainTextMessage):
    alias = "twice"
    send_retry_limit = 2


register_message_types(TwiceMessage)


def mark_all_sent(messenger: MessengerBase, dispatches: list[Dispatch]) -> None:
    for dispatch in dispatches:
        messenger.mark_sent(dispatch)


class Scripted(MessengerBase):
    """Runs ``script(messenger, dispatches)`` as its send()."""

    alias = "scripted"

    def __init__(self) -> None:
        self.script: Callable[[Scripted, list[Dispatch]], Any] = mark_all_sent
        self.batches: list[list[str]] = []

    def send(self, message_cls, message_model, dispatch_models):
        self.batches.append([d.address for d in dispatch_models])
        self.script(self, dispatch_models)


@pytest.fixture
def scripted(registries, no_publish):
    messenger = Scripted()
    register_messenger_objects(messenger)
    messenger.published = no_publish  # type: ignore[attr-defined]
    return messenger


def schedule(addresses: list[str], message=None) -> list[int]:
    [(_, dispatches)] = toolbox.schedule(
        message or PlainTextMessage("hello"), toolbox.recipients("scripted", addresses)
    )
    return [d.pk for d in dispatches]


def rows(ids: list[int]) -> list[Dispatch]:
    return list(Dispatch.objects.filter(pk__in=ids).order_by("pk"))


def test_sent_outcomes_are_stored_before_the_batch_ends(scripted):
    ids = schedule(["a", "b", "c"])
    seen_in_db = []

    def script(messenger, dispatches):
        for dispatch in dispatches:
            messenger.mark_sent(dispatch, provider_id=f"id-{dispatch.address}")
            seen_in_db.append(Dispatch.objects.get(pk=dispatch.pk).dispatch_status)

    scripted.script = script
    result = pipeline.deliver("scripted", ids, owner="w1")
    assert seen_in_db == [Status.SENT] * 3  # a crash after any send loses no earlier record
    assert (result.claimed, result.sent) == (3, 3)
    assert [r.provider_message_id for r in rows(ids)] == ["id-a", "id-b", "id-c"]
    assert all(r.sent_at and not r.lease_owner for r in rows(ids))


def test_a_second_run_of_the_same_ids_sends_nothing(scripted):
    ids = schedule(["a", "b"])
    pipeline.deliver("scripted", ids, owner="w1")
    result = pipeline.deliver("scripted", ids, owner="w2")
    assert result.claimed == 0 and scripted.batches == [["a", "b"]]


def test_an_exception_marks_only_the_dispatches_not_marked_yet(scripted):
    ids = schedule(["a", "b", "c"])

    def script(messenger, dispatches):
        messenger.mark_sent(dispatches[0])
        raise TemporaryDeliveryError("connection reset")

    scripted.script = script
    pipeline.deliver("scripted", ids, owner="w1")
    assert [r.dispatch_status for r in rows(ids)] == [Status.SENT, Status.ERROR, Status.ERROR]
    assert (
        list(DispatchError.objects.values_list("exc_type", flat=True))
        == ["TemporaryDeliveryError"] * 2
    )


def test_a_permanent_exception_fails_at_once(scripted):
    ids = schedule(["a"])
    scripted.script = lambda m, ds: (_ for _ in ()).throw(PermanentDeliveryError("refused"))
    pipeline.deliver("scripted", ids, owner="w1")
    [row] = rows(ids)
    assert (row.dispatch_status, row.retry_count, row.next_attempt_at) == (Status.FAILED, 1, None)


def test_a_dispatch_left_unmarked_is_an_error_not_processing(scripted):
    ids = schedule(["a", "b"])
    scripted.script = lambda m, ds: m.mark_sent(ds[0])
    pipeline.deliver("scripted", ids, owner="w1")
    assert [r.dispatch_status for r in rows(ids)] == [Status.SENT, Status.ERROR]
    assert "returned without marking" in DispatchError.objects.get().error_log


def test_errors_back_off_and_end_failed_at_the_retry_limit(scripted, settings):
    settings.SITEMESSAGE_RETRY_BACKOFF = 100
    ids = schedule(["a"], TwiceMessage("x"))
    scripted.script = lambda m, ds: [m.mark_error(d, "busy") for d in ds]
    before = timezone.now()
    pipeline.deliver("scripted", ids, owner="w1")
    [row] = rows(ids)
    assert row.dispatch_status == Status.ERROR
    assert row.next_attempt_at is not None
    assert before + timedelta(seconds=50) <= row.next_attempt_at <= before + timedelta(seconds=101)
    assert pipeline.deliver("scripted", ids, owner="w2").claimed == 0  # not due yet

    Dispatch.objects.filter(pk__in=ids).update(next_attempt_at=timezone.now())
    pipeline.deliver("scripted", ids, owner="w2")
    [row] = rows(ids)
    assert (row.dispatch_status, row.retry_count) == (Status.FAILED, 2)
    assert DispatchError.objects.filter(dispatch=row).count() == 2


def test_the_provider_retry_after_wins_over_a_shorter_backoff(scripted, settings):
    settings.SITEMESSAGE_RETRY_BACKOFF = 1
    ids = schedule(["a"])
    scripted.script = lambda m, ds: m.mark_error(
        ds[0], TemporaryDeliveryError("429", retry_after=900)
    )
    before = timezone.now()
    pipeline.deliver("scripted", ids, owner="w1")
    next_attempt_at = rows(ids)[0].next_attempt_at
    assert next_attempt_at is not None and next_attempt_at >= before + timedelta(seconds=900)


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(settings):
    settings.SITEMESSAGE_RETRY_BACKOFF = 10
    settings.SITEMESSAGE_RETRY_BACKOFF_MAX = 300
    for attempts, full in [(1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (30, 300)]:
        delays = [pipeline.backoff(attempts) for _ in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full
        assert max(delays) - min(delays) > full / 10  # jittered, not one value


def test_an_outcome_is_dropped_when_another_run_took_the_row(scripted):
    ids = schedule(["a"])

    def script(messenger, dispatches):
        # The lease expired and another run claimed the row meanwhile.
        Dispatch.objects.filter(pk=dispatches[0].pk).update(lease_owner="w2")
        messenger.mark_sent(dispatches[0])

    scripted.script = script
    result = pipeline.deliver("scripted", ids, owner="w1")
    assert result.sent == 0
    assert (rows(ids)[0].dispatch_status, rows(ids)[0].lease_owner) == (Status.PROCESSING, "w2")


def test_sweep_releases_expired_leases_and_republishes(scripted, settings):
    ids = schedule(["a", "b", "c", "d"], TwiceMessage("x"))
    past = timezone.now() - timedelta(seconds=1)
    Dispatch.objects.filter(pk=ids[0]).update(
        dispatch_status=Status.PROCESSING, retry_count=1, lease_owner="dead", lease_expires_at=past
    )
    Dispatch.objects.filter(pk=ids[1]).update(
        dispatch_status=Status.PROCESSING, retry_count=2, lease_owner="dead", lease_expires_at=past
    )
    Dispatch.objects.filter(pk=ids[2]).update(dispatch_status=Status.PENDING, next_attempt_at=past)
    Dispatch.objects.filter(pk=ids[3]).update(
        dispatch_status=Status.ERROR, next_attempt_at=timezone.now() + timedelta(hours=1)
    )
    scripted.published.clear()

    assert sweep.sweep() == {
        "expanded": 0,
        "prepared": 0,
        "expired": 1,
        "failed": 1,
        "expired_unsent": 0,
        "published": 2,
        "unpublished": 0,
    }
    assert scripted.published == [{"scripted": [ids[0], ids[2]]}]
    statuses = [r.dispatch_status for r in rows(ids)]
    assert statuses == [Status.PENDING, Status.FAILED, Status.PENDING, Status.ERROR]
    assert set(DispatchError.objects.values_list("exc_type", flat=True)) == {"LeaseExpired"}
    # Published rows wait REPUBLISH_AFTER before the next sweep publishes them again.
    scripted.published.clear()
    assert sweep.sweep()["published"] == 0 and scripted.published == []


def test_sweep_by_priority(scripted):
    low = schedule(["a"])
    [(_, high)] = toolbox.schedule(
        PlainTextMessage("urgent"), toolbox.recipients("scripted", ["b"]), priority=5
    )
    Dispatch.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    scripted.published.clear()
    assert sweep.sweep(priority=5)["published"] == 1
    assert scripted.published == [{"scripted": [high[0].pk]}]
    # The low-priority row was not published, so it is still due.
    due_at = rows(low)[0].next_attempt_at
    assert due_at is not None and due_at < timezone.now()


def test_a_messenger_not_registered_in_the_worker_fails_its_dispatches_naming_it(scripted):
    ids = schedule(["a", "b"])
    registry._registry.pop("scripted")  # the worker was started without it

    result = pipeline.deliver("scripted", ids, owner="host:123:task-1")

    assert (result.claimed, result.sent, result.failed) == (2, 0, 2)
    assert [(r.dispatch_status, r.retry_count) for r in rows(ids)] == [(Status.FAILED, 1)] * 2
    errors = DispatchError.objects.filter(dispatch_id__in=ids)
    assert errors.count() == 2
    assert {e.exc_type for e in errors} == {"UnknownMessengerError"}
    for error in errors:
        assert "messenger 'scripted' is not registered in worker host:123:task-1" in error.error_log
        assert "'smtp'" in error.error_log  # what it does know
    assert sweep.sweep()["published"] == 0  # nothing left for the sweep to publish forever


class Counted(PlainTextMessage):
    """Counts its renderings; per recipient when ``has_dynamic_context`` says so."""

    alias = "counted"
    renders: list[str | None] = []

    @classmethod
    def compile(cls, message, messenger, dispatch=None):
        cls.renders.append(dispatch.address if dispatch else None)
        return f"body for {dispatch.address}" if dispatch else "one body for all"


class CountedPerRecipient(Counted):
    alias = "counted_dynamic"
    has_dynamic_context = True


register_message_types(Counted, CountedPerRecipient)


def test_a_body_without_dynamic_context_is_rendered_once_shared_and_not_stored(scripted):
    Counted.renders = []
    ids = schedule([f"u{i}" for i in range(30)], Counted("x"))
    bodies: list[str] = []
    messages: list[Any] = []

    def script(messenger, dispatches):
        bodies.extend(d.message_cache for d in dispatches)
        messages.extend(d.message for d in dispatches)
        for dispatch in dispatches[:10]:
            messenger.mark_sent(dispatch)
        for dispatch in dispatches[10:]:
            messenger.mark_error(dispatch, "try later")

    scripted.script = script
    pipeline.deliver("scripted", ids, "run-1")

    assert Counted.renders == [None]  # once, and without any recipient's dispatch
    assert bodies == ["one body for all"] * 30
    assert len({id(body) for body in bodies}) == 1  # one string in memory, not 30
    assert len({id(message) for message in messages}) == 1  # one Message, not 30 copies
    assert {d.message_cache for d in rows(ids)} == {""}  # nothing stored per dispatch
    assert Counter(d.dispatch_status for d in rows(ids)) == {Status.SENT: 10, Status.ERROR: 20}


def test_a_body_with_dynamic_context_is_rendered_and_kept_per_recipient(scripted):
    Counted.renders = []
    ids = schedule(["a", "b"], CountedPerRecipient("x"))
    scripted.script = lambda messenger, ds: [messenger.mark_error(d, "later") for d in ds]

    pipeline.deliver("scripted", ids, "run-1")
    assert Counted.renders == ["a", "b"]
    assert [d.message_cache for d in rows(ids)] == ["body for a", "body for b"]

    Dispatch.objects.filter(pk__in=ids).update(next_attempt_at=timezone.now())
    pipeline.deliver("scripted", ids, "run-2")
    assert Counted.renders == ["a", "b"]  # a retry sends the stored text, not a new one


def test_a_message_larger_than_the_limit_is_refused_before_anything_is_written(settings):
    settings.SITEMESSAGE_MAX_MESSAGE_SIZE = 1000
    toolbox.schedule(PlainTextMessage("é" * 400), toolbox.recipients("smtp", "a@example.com"))
    with pytest.raises(InvalidContextError, match=r"is 1\d\d\d bytes of JSON, more than "
                       r"SITEMESSAGE_MAX_MESSAGE_SIZE \(1000\)"):  # fmt: skip
        toolbox.schedule(PlainTextMessage("é" * 500), toolbox.recipients("smtp", "a@b.example"))
    assert Dispatch.objects.count() == 1


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_redelivered_run_takes_back_at_once_what_its_dead_process_held(scripted):
    import os

    ids = schedule(["a", "b", "c", "d", "e"])
    host = pipeline.lease_owner("x").split(":")[0]
    holders = [
        f"{host}:{dead_pid()}:task-1",  # this run's first delivery, killed: taken back
        f"{host}:{dead_pid()}:task-1",
        f"{host}:{os.getppid()}:task-1",  # same run, but its process still runs: kept
        f"elsewhere:{dead_pid()}:task-1",  # another host: cannot tell, left to the lease
        f"{host}:{dead_pid()}:task-2",  # another run: not this task's to take
    ]
    lease = timezone.now() + timedelta(minutes=5)
    for pk, holder in zip(ids, holders, strict=True):
        Dispatch.objects.filter(pk=pk).update(
            dispatch_status=Status.PROCESSING,
            lease_owner=holder,
            lease_expires_at=lease,
            retry_count=1,
        )

    result = pipeline.deliver("scripted", ids, pipeline.lease_owner("task-1"))

    assert (result.claimed, result.sent) == (2, 2)
    after = rows(ids)
    assert [d.dispatch_status for d in after] == [Status.SENT] * 2 + [Status.PROCESSING] * 3
    assert [d.retry_count for d in after[:2]] == [2, 2]
    assert [d.lease_owner for d in after[2:]] == holders[2:]
    lost = DispatchError.objects.filter(exc_type="WorkerLost")
    assert sorted(lost.values_list("dispatch_id", "attempt")) == [(ids[0], 1), (ids[1], 1)]
    assert holders[0] in lost.values_list("error_log", flat=True)[0]


@pytest.mark.django_db(transaction=True)
def test_a_running_batch_renews_its_short_lease_so_the_sweep_leaves_it_alone(scripted, settings):
    import time

    settings.SITEMESSAGE_LEASE_SECONDS = 0.6
    ids = schedule(["slow"])
    seen: list[Any] = []

    def script(messenger, dispatches):
        time.sleep(1.5)  # a slow send: more than two leases
        seen.append(sweep.release_expired_leases(timezone.now()))
        lease_end = Dispatch.objects.get(pk=ids[0]).lease_expires_at
        assert lease_end is not None
        seen.append(lease_end - timezone.now())
        messenger.mark_sent(dispatches[0])

    scripted.script = script
    result = pipeline.deliver("scripted", ids, pipeline.lease_owner("slow-run"))

    assert seen[0] == (0, 0)  # nothing expired: the lease was renewed meanwhile
    assert timedelta(0) < seen[1] <= timedelta(seconds=0.6)
    assert result.sent == 1 and rows(ids)[0].dispatch_status == Status.SENT
    assert not DispatchError.objects.exists()


@pytest.mark.e2e
def test_pending_rows_whose_queue_is_empty_are_published_again_after_one_sweep(scripted):
    """A worker that took a task and died before starting it: on Redis the task stays hidden
    for the visibility timeout, so the sweep publishes rows a sweep old whose queue is empty,
    not only those past REPUBLISH_AFTER."""
    from tests.support import purge
    from workers.app import app

    purge(["messenger.scripted"])
    ids = schedule(["a", "b"])
    published_a_while_ago = timezone.now() + toolbox.republish_after() - timedelta(seconds=15)
    Dispatch.objects.filter(pk__in=ids).update(next_attempt_at=published_a_while_ago)
    with app.connection_for_write() as conn:  # a task still waiting in the queue
        conn.SimpleQueue("messenger.scripted").put({"waiting": True})

    assert sweep.sweep()["published"] == 0  # its task may be that one: wait for it
    purge(["messenger.scripted"])
    assert sweep.sweep()["published"] == 2  # nothing queued: the task is lost
    assert scripted.published == [{"scripted": ids}]
    fresh = schedule(["c"])  # published just now, its queue empty: not yet
    assert sweep.sweep()["published"] == 0 and len(scripted.published) == 1 and fresh


@pytest.mark.pg  # PostgreSQL claims waiting rows in one statement of its own
def test_a_workers_task_also_claims_the_dispatches_waiting_up_to_a_batch(scripted, settings):
    settings.SITEMESSAGE_BATCH_SIZE = 4
    ids = schedule(["a", "b", "c", "d", "e", "f"])
    later = schedule(["later"])
    Dispatch.objects.filter(pk=later[0]).update(send_at=timezone.now() + timedelta(hours=1))
    retry = schedule(["retry"])
    Dispatch.objects.filter(pk=retry[0]).update(dispatch_status=Status.ERROR)

    result = pipeline.deliver("scripted", [ids[5]], "host:1:task-1", waiting=True)
    assert result.claimed == result.sent == 4  # its id and the oldest waiting, one batch
    assert sorted(scripted.batches[0]) == ["a", "b", "c", "f"]
    assert pipeline.deliver("scripted", ids[:3], "host:1:task-2").claimed == 0  # their tasks
    assert [d.dispatch_status for d in rows(later + retry)] == [Status.PENDING, Status.ERROR]
    assert pipeline.deliver("scripted", [ids[3]], "host:1:task-3").claimed == 1  # not waiting
    assert rows([ids[4]])[0].dispatch_status == Status.PENDING


def test_a_batch_costs_a_fixed_number_of_queries_plus_one_write_per_sent_dispatch(
    scripted, settings
):
    """The claim, the reads and the bookkeeping do not grow with the batch; each SENT outcome
    is its own UPDATE, written the moment the messenger reports it (the one-duplicate window
    in README's delivery guarantees)."""
    settings.SITEMESSAGE_BATCH_SIZE = 100
    counts = []
    for size in (5, 50):
        ids = schedule([f"{size}-{i}" for i in range(size)])
        with CaptureQueriesContext(connection) as queries:
            assert pipeline.deliver("scripted", ids, f"host:1:run-{size}").sent == size
        writes = [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
        counts.append((len(queries.captured_queries) - size, len(writes) - size))
    assert counts[0] == counts[1]


def test_a_redelivered_task_takes_back_what_its_dead_run_claimed_beyond_its_ids(scripted):
    ids = schedule(["mine", "waiting"])
    host = pipeline.lease_owner("x").split(":")[0]
    Dispatch.objects.filter(pk__in=ids).update(
        dispatch_status=Status.PROCESSING,
        lease_owner=f"{host}:{dead_pid()}:task-1",
        lease_expires_at=timezone.now() + timedelta(minutes=5),
        retry_count=1,
    )
    result = pipeline.deliver("scripted", [ids[0]], pipeline.lease_owner("task-1"), waiting=True)
    assert (result.claimed, result.sent) == (2, 2)


@pytest.mark.pg  # there the rows of a run are found with LIKE
def test_a_run_id_with_like_wildcards_takes_back_only_its_own_rows(scripted):
    ids = schedule(["other run's", "mine"])
    host = pipeline.lease_owner("x").split(":")[0]
    Dispatch.objects.filter(pk=ids[0]).update(
        dispatch_status=Status.PROCESSING,
        lease_owner=f"{host}:{dead_pid()}:taskX1",  # "task_1" as a LIKE pattern matches it
        lease_expires_at=timezone.now() + timedelta(minutes=5),
    )
    result = pipeline.deliver("scripted", [ids[1]], pipeline.lease_owner("task_1"), waiting=True)
    assert (result.claimed, result.sent) == (1, 1)
    assert rows([ids[0]])[0].dispatch_status == Status.PROCESSING  # left to its lease


@pytest.mark.pg  # a worker's claim is one statement there
def test_a_workers_task_reads_and_claims_in_one_round_trip_on_postgresql(scripted):
    if connection.vendor != "postgresql":
        pytest.skip("the claim in one statement is PostgreSQL's (make test runs it there)")
    [first] = schedule(["a"])
    [second] = schedule(["b"])
    with CaptureQueriesContext(connection) as queries:
        result = pipeline.deliver("scripted", [first], pipeline.lease_owner("t1"), waiting=True)
    assert (result.claimed, result.sent) == (2, 2)  # its id and the one waiting
    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    # The claim, the messages, the opt-outs of the batch, then one UPDATE per SENT.
    assert statements == ["WITH", "SELECT", "SELECT", "UPDATE", "UPDATE"], statements
    with CaptureQueriesContext(connection) as queries:  # the task that carries the other id
        result = pipeline.deliver("scripted", [second], pipeline.lease_owner("t2"), waiting=True)
    assert result.claimed == 0 and len(queries.captured_queries) == 1


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("value", ["off", None])
def test_worker_connections_commit_without_waiting_for_the_flush_unless_told(settings, value):
    from django.db.backends.signals import connection_created

    settings.SITEMESSAGE_WORKER_SYNCHRONOUS_COMMIT = value
    connection.ensure_connection()
    try:
        pipeline.relax_commits()
        opened_before = show_synchronous_commit()
        connection.close()
        opened_after = show_synchronous_commit()  # a new connection, as a pool child opens
    finally:
        connection_created.disconnect(dispatch_uid="sitemessage.relax_commits")
        connection.close()
    if connection.vendor != "postgresql":
        assert opened_before is opened_after is None  # nothing to set on SQLite
    elif value == "off":
        assert (opened_before, opened_after) == ("off", "off")
    else:
        assert (opened_before, opened_after) == ("on", "on")


def show_synchronous_commit() -> str | None:
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return str(cursor.fetchone()[0])
