"""Housekeeping: ``sitemessage_send_scheduled --priority N`` limits the whole sweep (publishing
and expanding) to that priority, and ``sitemessage_cleanup`` / the beat cleanup delete sent
rows in bounded chunks, each statement and each transaction small."""

from __future__ import annotations

import io
import re
from datetime import timedelta

import pytest
from celery import Celery
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import dispatcher.tasks  # noqa: F401  (registers the shared tasks serve() annotates)
from dispatcher import operations, tasks
from dispatcher.messages import PlainTextMessage
from dispatcher.models import Dispatch, DispatchError, Message, ScheduleRequest, Subscription
from sitemessage.toolbox import recipients, schedule_messages
from tests.faultsapp.helpers import drain, make_dispatch, published_ids
from tests.support import purge, run_python, wait_until
from workers.app import app
from workers.embed import serve

Status = Dispatch.Status
QUEUE = "messenger.smtp"


@pytest.fixture
def queue():
    purge([QUEUE])
    yield QUEUE
    purge([QUEUE])


def run(command: str, *args: str) -> str:
    out = io.StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


def sent_days_ago(days: float, message: Message | None = None) -> Dispatch:
    when = timezone.now() - timedelta(days=days)
    if message is None:
        return make_dispatch(Status.SENT, sent_at=when, time_dispatched=when)
    return Dispatch.objects.create(
        message=message,
        messenger="smtp",
        address="x@example.com",
        dispatch_status=Status.SENT,
        sent_at=when,
    )


# sitemessage_send_scheduled --priority


def stale_request(priority: int | None) -> ScheduleRequest:
    """A .delay() call whose task never came (stored long enough ago for the sweep)."""
    schedule_messages.delay(
        PlainTextMessage("from .delay()"), recipients("smtp", ["r@example.com"]), priority=priority
    )
    request = ScheduleRequest.objects.order_by("-pk").first()
    assert request is not None
    ScheduleRequest.objects.filter(pk=request.pk).update(
        time_created=timezone.now() - timedelta(hours=1)
    )
    return request


@pytest.mark.django_db
def test_send_scheduled_with_priority_publishes_and_expands_only_that_priority(queue):
    due = {
        p: make_dispatch(Status.ERROR, priority=p, next_attempt_at=timezone.now()) for p in (0, 5)
    }
    requests = {p: stale_request(p) for p in (None, 5)}  # None: the type's priority, 0
    Subscription.create("sub@example.com", "plain", "smtp")
    [(waiting0, _)] = schedule_messages(PlainTextMessage("to subscribers"))
    [(waiting5, _)] = schedule_messages(PlainTextMessage("to subscribers"), priority=5)

    out = run("sitemessage_send_scheduled", "--priority", "5")

    assert set(ScheduleRequest.objects.values_list("pk", flat=True)) == {requests[None].pk}
    expanded = Message.objects.get(context__stext_="from .delay()")
    assert expanded.priority == 5
    prepared = Dispatch.objects.get(message=waiting5)
    assert not Dispatch.objects.filter(message=waiting0).exists()
    assert published_ids(drain(queue)) == sorted([due[5].pk, prepared.pk])
    assert "2 dispatches of priority 5 published" in out
    assert Dispatch.objects.get(pk=due[0].pk).dispatch_status == Status.ERROR

    run("sitemessage_send_scheduled")  # without a priority: the rest

    assert not ScheduleRequest.objects.exists()
    assert Dispatch.objects.filter(message=waiting0).count() == 1
    assert due[0].pk in published_ids(drain(queue))


# sitemessage_cleanup


@pytest.mark.django_db
@pytest.mark.parametrize("flag", ["--dispatches-only", "--dispatches_only"])
def test_cleanup_dispatches_only_keeps_the_messages_with_either_spelling(flag):
    old, recent = sent_days_ago(10), sent_days_ago(1)

    out = run("sitemessage_cleanup", "--ago", "5", flag)

    assert out.splitlines() == [
        "Cleaning up dispatches sent 5 days ago ...",
        "Deleted 1 dispatches and 0 messages.",
        "Cleanup done.",
    ]
    assert list(Dispatch.objects.values_list("pk", flat=True)) == [recent.pk]
    assert Message.objects.filter(pk__in=[old.message_id, recent.message_id]).count() == 2


@pytest.mark.django_db
def test_cleanup_selects_and_deletes_in_chunks_each_in_its_own_transaction(monkeypatch):
    monkeypatch.setattr(operations, "DELETE_CHUNK", 3)
    singles = [sent_days_ago(10) for _ in range(4)]
    shared = Message.objects.create(cls="plain", context={})
    for _ in range(4):  # one message whose sent dispatches span two chunks
        sent_days_ago(10, shared)
    DispatchError.objects.create(dispatch=singles[0], attempt=1, error_log="a first try failed")
    unsent = make_dispatch(Status.FAILED)
    Dispatch.objects.create(message=shared, messenger="smtp", address="y@example.com")
    sent_days_ago(10, unsent.message)
    recent = sent_days_ago(1)

    with CaptureQueriesContext(connection) as queries:
        result = operations.cleanup_sent_messages(ago=5)

    assert result == (9, 4)
    left = set(Dispatch.objects.values_list("pk", flat=True))
    assert len(left) == 3 and recent.pk in left and unsent.pk in left
    assert set(Message.objects.filter(pk=shared.pk)) == {shared}  # it has a pending dispatch
    assert not DispatchError.objects.exists()
    table = Dispatch._meta.db_table
    sql = [q["sql"] for q in queries.captured_queries]
    selects = [s for s in sql if s.startswith("SELECT") and f'"{table}"."dispatch_status" = ' in s]
    assert len(selects) == 4 and all(s.endswith("LIMIT 3") for s in selects)
    in_lists = [m.count(",") + 1 for s in sql for m in re.findall(r" IN \(([^()]*)\)", s)]
    assert in_lists and max(in_lists) <= 3  # no statement names more than a chunk of ids
    assert sum(s.startswith("SAVEPOINT") for s in sql) == 4  # a transaction per chunk


@pytest.mark.django_db
def test_cleanup_with_a_budget_stops_after_a_chunk_and_the_next_run_goes_on(monkeypatch):
    monkeypatch.setattr(operations, "DELETE_CHUNK", 3)
    for _ in range(7):
        sent_days_ago(10)

    runs = [operations.cleanup_for(0) for _ in range(3)]

    assert runs == [((3, 3), True), ((3, 3), True), ((1, 1), False)]
    assert not Dispatch.objects.exists()


# The beat cleanup


@pytest.mark.django_db
def test_the_cleanup_task_deletes_what_is_older_than_the_retention_and_is_off_without_it(
    settings,
):
    old, recent = sent_days_ago(10), sent_days_ago(1)

    settings.SITEMESSAGE_CLEANUP_AFTER_DAYS = None
    assert tasks.cleanup() == {"dispatches": 0, "messages": 0, "more": 0}
    assert Dispatch.objects.count() == 2

    settings.SITEMESSAGE_CLEANUP_AFTER_DAYS = 5
    assert tasks.cleanup() == {"dispatches": 1, "messages": 1, "more": 0}
    assert list(Dispatch.objects.values_list("pk", flat=True)) == [recent.pk]
    assert not Message.objects.filter(pk=old.message_id).exists()


def beat_entries(env: dict[str, str]) -> list[str]:
    done = run_python(
        "-c", "import workers.celeryconfig as c; print(*sorted(c.beat_schedule))", env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.django_db
def test_beat_schedules_the_cleanup_only_with_a_retention_setting():
    assert beat_entries({}) == ["sitemessage-sweep"]
    assert beat_entries({"SITEMESSAGE_CLEANUP_AFTER_DAYS": "30"}) == [
        "sitemessage-cleanup",
        "sitemessage-sweep",
    ]
    done = run_python("manage.py", "check", env={"SITEMESSAGE_CLEANUP_AFTER_DAYS": "-1"})
    assert done.returncode == 1 and "SITEMESSAGE_CLEANUP_AFTER_DAYS must be at least 0" in (
        done.stderr
    )


def test_serve_adds_the_cleanup_to_a_projects_beat_with_a_retention_setting(settings):
    settings.SITEMESSAGE_CLEANUP_AFTER_DAYS = 30
    project = Celery("project", set_as_current=False)
    serve(project)

    entry = project.conf.beat_schedule["sitemessage-cleanup"]
    assert (entry["task"], entry["schedule"], entry["options"]["queue"]) == (
        "dispatcher.cleanup",
        3600,
        "sitemessage",
    )
    assert project.tasks["dispatcher.cleanup"].acks_late


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_worker_runs_the_cleanup_with_its_own_retention_setting(start_worker):
    old, recent = sent_days_ago(10), sent_days_ago(1)
    worker = start_worker(["sitemessage"], env={"SITEMESSAGE_CLEANUP_AFTER_DAYS": "5"})

    app.send_task("dispatcher.cleanup", queue="sitemessage")

    assert wait_until(lambda: not Dispatch.objects.filter(pk=old.pk).exists(), 20)
    assert list(Dispatch.objects.values_list("pk", flat=True)) == [recent.pk]
    assert wait_until(lambda: "'dispatches': 1, 'messages': 1" in worker.text(), 10)
