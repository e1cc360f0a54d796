"""Later delivery (``send_at``), expiry (``expires_at``) and priority lanes: what scheduling
refuses and stores, what the claim and the sweep do with the window, which queue each dispatch
is published to (read back from the real broker), and, end to end, an urgent e-mail that
overtakes a backlog of 2,000 in a real worker."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from kombu import Queue

from dispatcher import conf, pipeline, sweep, toolbox
from dispatcher.messages import PlainTextMessage
from dispatcher.models import Dispatch, DispatchError, Message, ScheduleRequest
from dispatcher.signals import dispatch_failed
from messengers.exceptions import ScheduleError
from messengers.registry import register_messenger_objects
from sitemessage.messages.email import EmailTextMessage
from sitemessage.toolbox import recipients, schedule_messages
from sitemessage.utils import MessengerBase
from tests.faultsapp.helpers import drain, published_ids
from tests.support import SMTPSink, purge, wait_until
from workers import broker
from workers.lifecycle import consume_urgent_lanes, consumed_aliases
from workers.queues import alias_of_queue, queue_for

Status = Dispatch.Status
NORMAL, URGENT = "messenger.smtp", "messenger.smtp.urgent"
#: Fixed moments, far from now either way.
FUTURE = datetime(2099, 1, 1, 12, tzinfo=UTC)
PAST = datetime(2001, 1, 1, 12, tzinfo=UTC)


def in_(seconds: float) -> datetime:
    return timezone.now() + timedelta(seconds=seconds)


class Recording(MessengerBase):
    """Marks every dispatch sent and remembers the addresses of each batch."""

    alias = "recording"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def send(self, message_cls, message_model, dispatch_models):
        self.batches.append([d.address for d in dispatch_models])
        for dispatch in dispatch_models:
            self.mark_sent(dispatch)


@pytest.fixture
def recording(registries, no_publish):
    messenger = Recording()
    register_messenger_objects(messenger)
    messenger.published = no_publish  # type: ignore[attr-defined]
    return messenger


def schedule_to(addresses: list[str], **window: Any) -> list[Dispatch]:
    [(_, dispatches)] = schedule_messages("hello", recipients("recording", addresses), **window)
    return dispatches


def deliver(dispatches: list[Dispatch]) -> pipeline.BatchResult:
    return pipeline.deliver("recording", [d.pk for d in dispatches], "host:1:task-1")


@pytest.fixture
def lanes():
    purge([NORMAL, URGENT])
    yield
    purge([NORMAL, URGENT])


# Scheduling: what is refused before anything is written


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("window", "problem"),
    [
        ({"send_at": datetime(2099, 1, 1, 12)}, "send_at must be an aware datetime"),
        ({"expires_at": datetime(2099, 1, 1, 12)}, "expires_at must be an aware datetime"),
        ({"send_at": "2099-01-01T12:00:00Z"}, "send_at must be a datetime or None, got str"),
        ({"expires_at": date(2099, 1, 1)}, "expires_at must be a datetime or None, got date"),
        ({"send_at": FUTURE + timedelta(hours=1), "expires_at": FUTURE}, "must come after send_at"),
        ({"send_at": FUTURE, "expires_at": FUTURE}, "must come after send_at"),
        ({"expires_at": PAST}, "has passed: nothing would be delivered"),
    ],
)
def test_a_bad_window_is_refused_naming_the_argument_before_anything_is_written(
    window, problem, recording
):
    with pytest.raises(ScheduleError, match=problem):
        schedule_to(["a"], **window)
    with pytest.raises(ScheduleError, match=problem):
        schedule_messages.delay("hello", recipients("recording", ["a"]), **window)
    assert (Message.objects.count(), Dispatch.objects.count()) == (0, 0)
    assert not ScheduleRequest.objects.exists()


@pytest.mark.django_db
def test_without_time_zones_the_window_must_be_naive(settings):
    settings.USE_TZ = False
    message = [PlainTextMessage("x")]
    toolbox.check_window(message, [], datetime(2030, 1, 1), datetime(2030, 1, 2))
    with pytest.raises(ScheduleError, match=r"send_at must be a naive datetime \(USE_TZ is off\)"):
        toolbox.check_window(message, [], FUTURE, None)


@pytest.mark.django_db
def test_a_window_needs_recipients_and_a_type_without_group_mark(recording):
    class Digest(PlainTextMessage):
        alias = "lanes_digest"
        group_mark = "daily"

    with pytest.raises(ScheduleError, match="need recipients"):
        schedule_messages(PlainTextMessage("x"), send_at=in_(60))
    with pytest.raises(ScheduleError, match="'lanes_digest', which has a group_mark"):
        toolbox.check_window([Digest("x")], [], in_(60), None)
    assert not Message.objects.exists()


# Later delivery


@pytest.mark.django_db
def test_a_later_dispatch_is_stored_due_at_send_at_and_not_published(
    recording, django_capture_on_commit_callbacks
):
    send_at, expires_at = in_(3600), in_(7200)

    with django_capture_on_commit_callbacks(execute=True):
        [dispatch] = schedule_to(["later"], send_at=send_at, expires_at=expires_at)
        [now] = schedule_to(["now"], send_at=in_(-60))

    row = Dispatch.objects.get(pk=dispatch.pk)
    assert (row.dispatch_status, row.send_at, row.expires_at) == (
        Status.PENDING,
        send_at,
        expires_at,
    )
    assert row.next_attempt_at == send_at  # the sweep publishes it then
    assert recording.published == [{"recording": [now.pk]}]  # a past send_at: at once


@pytest.mark.django_db
def test_an_early_task_claims_nothing_and_leaves_the_row_as_it_was(recording):
    [dispatch] = schedule_to(["later"], send_at=in_(3600))
    before = Dispatch.objects.get(pk=dispatch.pk)

    result = deliver([dispatch])  # a duplicate publish, an hour early

    assert (result.claimed, recording.batches) == (0, [])
    after = Dispatch.objects.get(pk=dispatch.pk)
    assert (after.dispatch_status, after.retry_count, after.next_attempt_at, after.lease_owner) == (
        Status.PENDING,
        0,
        before.next_attempt_at,
        "",
    )
    Dispatch.objects.filter(pk=dispatch.pk).update(send_at=in_(-1))
    assert deliver([dispatch]).sent == 1 and recording.batches == [["later"]]


@pytest.mark.django_db
def test_the_sweep_publishes_a_later_dispatch_once_it_is_due_and_not_before(recording):
    [dispatch] = schedule_to(["later"], send_at=in_(60))  # due within REPUBLISH_AFTER

    assert sweep.sweep()["published"] == 0 and recording.published == []

    Dispatch.objects.filter(pk=dispatch.pk).update(send_at=in_(-1), next_attempt_at=in_(-1))
    assert sweep.sweep()["published"] == 1
    assert recording.published == [{"recording": [dispatch.pk]}]


@pytest.mark.django_db
def test_delay_carries_the_window_as_iso_text_and_the_expansion_stores_it(
    recording, django_capture_on_commit_callbacks
):
    send_at, expires_at = in_(3600), in_(7200)

    schedule_messages.delay(
        "hi", recipients("recording", ["a"]), send_at=send_at, expires_at=expires_at
    )

    request = ScheduleRequest.objects.get()
    assert (request.payload["send_at"], request.payload["expires_at"]) == (
        send_at.isoformat(),
        expires_at.isoformat(),
    )
    with django_capture_on_commit_callbacks(execute=True) as published:
        [(_, [dispatch])] = toolbox.expand_schedule_request(request.pk)
    assert (dispatch.send_at, dispatch.expires_at, dispatch.next_attempt_at) == (
        send_at,
        expires_at,
        send_at,
    )
    assert published == [] and recording.published == []  # later: for the sweep


@pytest.mark.django_db
def test_a_delay_call_expanded_after_its_expiry_is_stored_and_fails_as_expired(recording):
    schedule_messages.delay("code 1234", recipients("recording", ["a"]), expires_at=in_(60))
    request = ScheduleRequest.objects.get()
    request.payload["expires_at"] = in_(-5).isoformat()  # its task came late
    request.save()

    [(_, [dispatch])] = toolbox.expand_schedule_request(request.pk)
    result = deliver([dispatch])

    assert (result.claimed, recording.batches) == (0, [])
    assert Dispatch.objects.get(pk=dispatch.pk).dispatch_status == Status.FAILED
    assert DispatchError.objects.get(dispatch=dispatch).exc_type == "Expired"


# Expiry


@pytest.mark.django_db
def test_an_expired_dispatch_is_failed_unsent_by_the_claim_with_the_reason(recording):
    fresh, stale = schedule_to(["fresh", "stale"], expires_at=in_(60))
    Dispatch.objects.filter(pk=stale.pk).update(expires_at=in_(-1))
    failed: list[Dispatch] = []

    def receiver(sender, message, dispatch, **_):
        failed.append(dispatch)

    dispatch_failed.connect(receiver)
    try:
        result = deliver([fresh, stale])
    finally:
        dispatch_failed.disconnect(receiver)

    assert (result.claimed, result.sent) == (1, 1) and recording.batches == [["fresh"]]
    row = Dispatch.objects.get(pk=stale.pk)
    assert (row.dispatch_status, row.retry_count, row.lease_owner) == (Status.FAILED, 0, "")
    error = DispatchError.objects.get(dispatch=stale)
    assert (error.exc_type, error.attempt) == ("Expired", 0)
    assert error.error_log.startswith("expired: not sent by its expires_at")
    assert [d.pk for d in failed] == [stale.pk]  # the signal, once


@pytest.mark.django_db
def test_the_sweep_fails_expired_pending_and_error_rows_in_bounded_chunks(
    recording, settings, monkeypatch
):
    monkeypatch.setattr(sweep, "EXPIRE_CHUNK", 2)
    settings.SITEMESSAGE_SWEEP_LIMIT = 3
    rows = schedule_to([f"r{i}" for i in range(7)], expires_at=in_(60))
    expired = [d.pk for d in rows[:5]]
    Dispatch.objects.update(expires_at=in_(-1))
    Dispatch.objects.filter(pk__in=expired[3:]).update(
        dispatch_status=Status.ERROR, next_attempt_at=in_(600)
    )
    Dispatch.objects.filter(pk=rows[5].pk).update(dispatch_status=Status.PROCESSING)
    Dispatch.objects.filter(pk=rows[6].pk).update(dispatch_status=Status.SENT)

    first, second, third = sweep.sweep(), sweep.sweep(), sweep.sweep()

    assert [r["expired_unsent"] for r in (first, second, third)] == [3, 2, 0]
    statuses = dict(Dispatch.objects.values_list("pk", "dispatch_status"))
    assert [statuses[pk] for pk in expired] == [Status.FAILED] * 5
    # A worker holds one (its claim fails it), the other was sent in time.
    assert (statuses[rows[5].pk], statuses[rows[6].pk]) == (Status.PROCESSING, Status.SENT)
    errors = DispatchError.objects.filter(dispatch_id__in=expired)
    assert sorted(errors.values_list("dispatch_id", "exc_type")) == [
        (pk, "Expired") for pk in expired
    ]


# Priority lanes


def test_queue_names_of_both_lanes_map_back_to_their_messenger():
    assert (queue_for("smtp"), queue_for("smtp", urgent=True)) == (NORMAL, URGENT)
    assert alias_of_queue(NORMAL) == alias_of_queue(URGENT) == "smtp"
    assert alias_of_queue("sitemessage") is None
    assert consumed_aliases([NORMAL, URGENT, "messenger.xmppsleek", "celery"]) == [
        "smtp",
        "xmppsleek",
    ]


@pytest.mark.parametrize(
    ("value", "problem"), [(0, "at least 1"), (40000, "at most 32767"), ("9", "integer")]
)
def test_a_bad_urgent_priority_setting_names_itself(value, problem):
    with pytest.raises(
        ImproperlyConfigured, match=f"SITEMESSAGE_URGENT_PRIORITY must be .*{problem}"
    ):
        conf.URGENT_PRIORITY.check(value)
    conf.URGENT_PRIORITY.check(None)


def test_a_worker_of_a_messenger_queue_consumes_its_urgent_lane_too():
    app = Celery("lanes-test", set_as_current=False)
    app.amqp.queues.select([NORMAL, "sitemessage", "messenger.telegram.urgent"])

    added = consume_urgent_lanes(app.amqp.queues)

    assert added == [URGENT]  # the telegram worker serves its urgent lane only: left so
    assert set(app.amqp.queues.consume_from) == {
        NORMAL,
        URGENT,
        "sitemessage",
        "messenger.telegram.urgent",
    }
    assert consume_urgent_lanes(app.amqp.queues) == []  # once


def test_a_worker_whose_app_declares_no_urgent_lane_starts_and_says_so(caplog):
    app = Celery("lanes-test", set_as_current=False)
    app.conf.task_create_missing_queues = False
    app.conf.task_queues = [Queue(NORMAL)]
    app.amqp.queues.select([NORMAL])

    assert consume_urgent_lanes(app.amqp.queues) == []
    assert f"queue {URGENT} is not declared: smtp's urgent dispatches wait in it" in caplog.text


@pytest.mark.django_db
def test_urgent_messages_are_published_to_the_urgent_lane(
    lanes, settings, django_capture_on_commit_callbacks
):
    settings.SITEMESSAGE_URGENT_PRIORITY = 10
    with django_capture_on_commit_callbacks(execute=True):
        [(_, bulk)] = schedule_messages("news", recipients("smtp", ["a@example.com"]), priority=9)
        [(_, code)] = schedule_messages("code", recipients("smtp", ["b@example.com"]), priority=10)

    assert published_ids(drain(URGENT)) == [code[0].pk]
    assert published_ids(drain(NORMAL)) == [bulk[0].pk]


@pytest.mark.django_db
def test_without_the_setting_every_message_takes_the_normal_lane(
    lanes, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        [(_, high)] = schedule_messages("code", recipients("smtp", ["b@example.com"]), priority=500)

    assert (published_ids(drain(NORMAL)), drain(URGENT)) == ([high[0].pk], [])


@pytest.mark.django_db
def test_the_sweep_republishes_due_and_stranded_urgent_dispatches_to_the_urgent_lane(
    lanes, settings
):
    settings.SITEMESSAGE_URGENT_PRIORITY = 10
    with_priority = {}
    for name, priority in [("bulk", 0), ("code", 10), ("code2", 10), ("bulk2", 0)]:
        [(_, [dispatch])] = toolbox.schedule(
            name, recipients("smtp", [f"{name}@example.com"]), priority=priority, publish=False
        )
        with_priority[name] = dispatch.pk
    due, published_a_while_ago = in_(-1), in_(toolbox.republish_after().total_seconds() - 15)
    Dispatch.objects.filter(pk__in=[with_priority["bulk"], with_priority["code"]]).update(
        next_attempt_at=due
    )
    # Published a sweep ago, their queues are empty: a worker took the task and died.
    Dispatch.objects.filter(pk__in=[with_priority["code2"], with_priority["bulk2"]]).update(
        next_attempt_at=published_a_while_ago
    )

    assert sweep.sweep()["published"] == 4

    assert published_ids(drain(URGENT)) == sorted([with_priority["code"], with_priority["code2"]])
    assert published_ids(drain(NORMAL)) == sorted([with_priority["bulk"], with_priority["bulk2"]])


@pytest.mark.django_db
def test_a_stranded_urgent_dispatch_waits_while_its_lane_holds_a_task(lanes, settings):
    settings.SITEMESSAGE_URGENT_PRIORITY = 10
    [(_, [code])] = toolbox.schedule(
        "code", recipients("smtp", ["b@example.com"]), priority=10, publish=False
    )
    Dispatch.objects.filter(pk=code.pk).update(
        next_attempt_at=in_(toolbox.republish_after().total_seconds() - 15)
    )
    broker.enqueue({"smtp": [code.pk]}, 100, urgent=True)  # its task, still waiting

    assert sweep.sweep()["published"] == 0
    assert published_ids(drain(URGENT)) == [code.pk]


# End to end


class ArrivalSink(SMTPSink):
    """Notes how many e-mails had arrived when the watched address got its first one."""

    def __init__(self, watched: str) -> None:
        super().__init__()
        self.watched = watched
        self.before_it: int | None = None

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            if self.watched in envelope.rcpt_tos and self.before_it is None:
                self.before_it = len(self.messages)
        return await super().handle_DATA(server, session, envelope)


BACKLOG = 2000


def overtake(smtp_servers, start_worker) -> tuple[int, Any]:
    """Fills smtp's normal lane with BACKLOG e-mails while a worker (started with ``-Q
    messenger.smtp`` only) delivers, then schedules one e-mail of priority 10; returns how
    many of the backlog were still undelivered when it arrived, and the worker."""
    sink = ArrivalSink("ann@example.com")
    server = smtp_servers(sink)
    purge([URGENT])
    worker = start_worker([NORMAL], env={"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(server.port)})
    backlog = [f"reader{i}@example.com" for i in range(BACKLOG)]
    started = time.monotonic()

    schedule_messages(EmailTextMessage("Newsletter", "All our news."), recipients("smtp", backlog))
    schedule_messages(
        EmailTextMessage("Your sign-in code", "123456"),
        recipients("smtp", ["ann@example.com"]),
        priority=10,
    )

    sink.wait_for(BACKLOG + 1, timeout=50)
    assert len(sink.messages) == BACKLOG + 1, f"{len(sink.messages)} arrived"
    assert sink.before_it is not None
    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Status.SENT).count() == BACKLOG + 1, 15
    )
    print(f"\n{BACKLOG} + 1 e-mails delivered in {time.monotonic() - started:.1f}s")
    return BACKLOG - sink.before_it, worker


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_an_urgent_email_overtakes_a_backlog_of_two_thousand(smtp_servers, start_worker, settings):
    settings.SITEMESSAGE_URGENT_PRIORITY = 10

    undelivered, worker = overtake(smtp_servers, start_worker)

    print(f"urgent lane: {undelivered} of {BACKLOG} were still undelivered when it arrived")
    assert "also consuming the urgent lanes messenger.smtp.urgent" in worker.text()
    assert undelivered >= BACKLOG // 2  # well before the backlog drained


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_without_an_urgent_lane_the_same_email_waits_behind_the_backlog(smtp_servers, start_worker):
    undelivered, _ = overtake(smtp_servers, start_worker)

    print(f"one lane: {undelivered} of {BACKLOG} were still undelivered when it arrived")
    assert undelivered <= conf.BATCH_SIZE.get()  # at most the batch sent beside it
