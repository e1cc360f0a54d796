"""schedule_messages() and recipients(): what is stored, what is refused before anything is
written, and schedule_messages.delay() (a transactional outbox) through a real broker and a
real worker with the JSON serializer."""

import json
import queue
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from dispatcher import types as dispatcher_types
from dispatcher.messages import register_message_types
from dispatcher.models import Dispatch, DispatchError, Message, ScheduleRequest
from dispatcher.sweep import sweep
from dispatcher.tasks import send_dispatches
from dispatcher.toolbox import encode_call, expand_schedule_request, schedule_encoded
from messengers.exceptions import (
    InvalidAddressError,
    InvalidContextError,
    ScheduleError,
    UnknownMessageTypeError,
    UnknownMessengerError,
)
from sitemessage.messages.base import MessageBase
from sitemessage.messages.email import EmailHtmlMessage, EmailTextMessage
from sitemessage.toolbox import recipients, schedule_messages
from tests.support import purge, wait_until
from workers.app import app
from workers.queues import DEFAULT_QUEUE, SCHEDULE_MESSAGES

pytestmark = pytest.mark.django_db


@pytest.fixture
def user():
    return get_user_model().objects.create(username="ann", email="ann@example.com")


def assert_nothing_written():
    assert (Message.objects.count(), Dispatch.objects.count()) == (0, 0)


def test_a_string_becomes_a_plain_text_message_with_one_dispatch_per_recipient(user):
    [(message, dispatches)] = schedule_messages(
        "Hi there", recipients("smtp", [user, "bob@example.com"]), sender=user, priority=3
    )
    assert message.cls == "plain" and message.context == {
        "tpl": None,
        "use_tpl": False,
        "stext_": "Hi there",
    }
    assert (message.sender, message.priority) == (user, 3)
    assert [(d.address, d.recipient) for d in dispatches] == [
        ("ann@example.com", user),
        ("bob@example.com", None),
    ]
    assert {d.dispatch_status for d in Dispatch.objects.all()} == {Dispatch.Status.PENDING}


def test_recipient_lists_add_up_and_duplicates_are_sent_once():
    both = recipients("smtp", ["a@example.com", "b@example.com"]) + recipients(
        "recorder", "a@example.com"
    )
    [(_, dispatches)] = schedule_messages("x", both + recipients("smtp", "a@example.com"))
    assert sorted((d.messenger, d.address) for d in dispatches) == [
        ("recorder", "a@example.com"),
        ("smtp", "a@example.com"),
        ("smtp", "b@example.com"),
    ]


def test_several_messages_at_once():
    created = schedule_messages(
        [EmailTextMessage("S", "text"), EmailHtmlMessage("S", {"stext_": "<b>"})],
        recipients("smtp", "a@example.com"),
    )
    assert [m.cls for m, _ in created] == ["email_plain", "email_html"]


def test_empty_recipients_store_nothing():
    assert schedule_messages("x", []) == []
    assert_nothing_written()


def test_unknown_messenger_lists_the_registered_ones():
    with pytest.raises(UnknownMessengerError) as info:
        recipients("smpt", ["a@example.com"])
    assert "'smtp'" in str(info.value) and "did you mean 'smtp'" in str(info.value)
    assert isinstance(info.value, LookupError)


def test_unknown_message_type_is_refused_before_writing():
    class Unregistered(MessageBase):
        alias = "unregistered"

    with pytest.raises(UnknownMessageTypeError, match="'unregistered' is not registered"):
        schedule_messages(Unregistered({"a": 1}), recipients("smtp", "a@example.com"))
    assert_nothing_written()


@pytest.mark.parametrize(
    "address, problem",
    [
        ("", "empty address"),
        ("   ", "empty address"),
        ("not-an-email", "not a valid e-mail address"),
        ("a@example.com\r\nBcc: x@evil.test", "control characters"),
        ("a" * 250 + "@example.com", "longer than 255"),
    ],
)
def test_bad_addresses_are_refused_before_writing(address, problem):
    with pytest.raises(InvalidAddressError, match=problem):
        schedule_messages("x", recipients("smtp", [address]))
    assert_nothing_written()


def test_a_user_without_an_address_is_named(user):
    user.email = ""
    with pytest.raises(InvalidAddressError, match=r"ann.*has no address"):
        recipients("smtp", [user])


def test_an_unsaved_user_is_refused():
    with pytest.raises(ScheduleError, match="not saved"):
        recipients("smtp", [get_user_model()(username="x", email="x@example.com")])


@pytest.mark.parametrize(
    "context, problem",
    [
        ({"when": object()}, "not JSON"),
        ({"n": float("nan")}, "not JSON"),
        ({"text": "a\x00b"}, "NUL"),
    ],
)
def test_a_context_that_is_not_json_is_refused_before_writing(context, problem):
    with pytest.raises(InvalidContextError, match=problem):
        schedule_messages(EmailTextMessage("s", context), recipients("smtp", "a@example.com"))
    assert_nothing_written()


@pytest.mark.parametrize("priority", [-1, 40000, "high", True])
def test_a_bad_priority_is_refused(priority):
    with pytest.raises(ScheduleError, match="priority"):
        schedule_messages("x", recipients("smtp", "a@example.com"), priority=priority)
    assert_nothing_written()


def test_handmade_recipients_are_refused():
    with pytest.raises(ScheduleError, match="must come from recipients"):
        schedule_messages("x", [("smtp", "a@example.com")])  # type: ignore[list-item]
    assert_nothing_written()


def test_a_later_bad_recipient_leaves_no_row_of_the_good_ones():
    good = recipients("smtp", [f"u{i}@example.com" for i in range(50)])
    bad = recipients("recorder", ["x"])
    object.__setattr__(bad[0], "address", "")
    with pytest.raises(InvalidAddressError):
        schedule_messages(["one", "two"], good + bad)
    assert_nothing_written()


def test_delivery_tasks_carry_ids_only(django_capture_on_commit_callbacks, monkeypatch):
    published = []
    monkeypatch.setattr(
        app, "send_task", lambda name, args, **options: published.append((args, options))
    )
    addresses = [f"u{i}@example.com" for i in range(250)]
    with django_capture_on_commit_callbacks(execute=True):
        [(_, dispatches)] = schedule_messages(
            EmailTextMessage("Secret subject", "secret body"), recipients("smtp", addresses)
        )
    assert [len(ids) for (_, ids), _ in published] == [100, 100, 50]
    assert {o["queue"] for _, o in published} == {"messenger.smtp"}
    assert sorted(i for (_, ids), _ in published for i in ids) == sorted(d.pk for d in dispatches)
    assert "secret" not in repr(published) and "example.com" not in repr(published)


def test_delay_payload_is_plain_json_data(user):
    import json

    payload = encode_call(
        EmailTextMessage("Hi", "body"), recipients("smtp", [user, "a@example.com"]), sender=user
    )
    assert json.loads(json.dumps(payload)) == payload
    assert payload["sender"] == user.pk
    assert payload["recipients"][0] == {
        "messenger": "smtp",
        "user": user.pk,
        "address": "ann@example.com",
    }


def test_delay_refuses_bad_input_in_the_caller():
    with pytest.raises(InvalidContextError):
        schedule_messages.delay(
            EmailTextMessage("s", {"x": object()}), recipients("smtp", "a@example.com")
        )


@pytest.mark.parametrize("priority", [-1, 40000, "high"])
def test_delay_refuses_a_bad_priority_before_publishing(priority):
    with pytest.raises(ScheduleError, match="priority"):
        encode_call("x", recipients("smtp", "a@example.com"), priority=priority)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_schedule_messages_delay_with_a_message_object_a_user_and_an_address(
    start_worker, smtp_server
):
    sink, port = smtp_server
    worker = start_worker(["sitemessage", "messenger.smtp"], env={"EMAIL_PORT": str(port)})
    sender = get_user_model().objects.create(username="boss", email="boss@example.com")
    user = get_user_model().objects.create(username="ann", email="ann@example.com")

    schedule_messages.delay(
        EmailTextMessage("Hello", "Hello {{ user }}"),
        recipients("smtp", [user, "a@example.com"]),
        sender=sender,
    )

    sink.wait_for(2, timeout=30)
    assert sorted(sink.recipients()) == ["a@example.com", "ann@example.com"]
    message = Message.objects.get()
    assert (message.cls, message.sender) == ("email_plain", sender)
    assert Dispatch.objects.get(address="ann@example.com").recipient == user
    assert wait_until(
        lambda: (
            set(Dispatch.objects.values_list("dispatch_status", flat=True))
            == {Dispatch.Status.SENT}
        ),
        10,
    )
    assert not ScheduleRequest.objects.exists()  # expanded, and deleted with it
    log = worker.text()
    assert "dispatcher.schedule_messages" in log and "succeeded" in log
    for private in ("example.com", "Hello"):  # the task's result is counts, not the message
        assert private not in log


def published_requests(timeout: float = 2.0) -> list[tuple[dict, list]]:
    """Takes the schedule requests waiting in the default queue: (headers, [args, kwargs, _])."""
    taken = []
    with app.connection_for_read() as conn:
        inbox = conn.SimpleQueue(DEFAULT_QUEUE)
        try:
            while True:
                message = inbox.get(timeout=timeout)
                message.ack()
                taken.append((message.headers, message.decode()))
                timeout = 0.5
        except queue.Empty:
            pass
        finally:
            inbox.close()
    return [(h, body) for h, body in taken if h.get("task") == SCHEDULE_MESSAGES]


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_delay_publishes_only_the_id_of_the_stored_call_and_only_after_commit(user):
    purge([DEFAULT_QUEUE])
    with transaction.atomic():
        schedule_messages.delay(
            EmailTextMessage("Secret subject", "secret body"),
            recipients("smtp", [user, "bob@example.com"]),
        )
        request = ScheduleRequest.objects.get()
        assert published_requests(timeout=0.5) == []  # not before commit

    [(headers, (args, kwargs, _))] = published_requests()
    assert (args, kwargs) == ([request.pk], {})
    wire = json.dumps([headers, args, kwargs])
    for private in ("Secret", "secret", "example.com", "bob"):
        assert private not in wire
    assert request.payload["recipients"][1]["address"] == "bob@example.com"  # kept in the DB


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_delay_in_a_transaction_that_rolls_back_sends_nothing(user):
    purge([DEFAULT_QUEUE])
    with pytest.raises(RuntimeError), transaction.atomic():
        schedule_messages.delay("Never", recipients("smtp", user))
        raise RuntimeError("the view failed")

    assert not ScheduleRequest.objects.exists()
    assert published_requests(timeout=1.0) == []


@pytest.mark.django_db(transaction=True)
def test_a_schedule_request_is_expanded_once(user, no_publish):
    schedule_messages.delay("Once", recipients("smtp", [user, "b@example.com"]))
    [request] = ScheduleRequest.objects.all()

    [(message, dispatches)] = expand_schedule_request(request.pk)
    assert expand_schedule_request(request.pk) == []  # the task delivered again

    assert Message.objects.get() == message and Dispatch.objects.count() == 2
    assert not ScheduleRequest.objects.exists()
    assert [sorted(ids) for batch in no_publish for ids in batch.values()] == [
        sorted(d.pk for d in dispatches)
    ]


@pytest.mark.django_db(transaction=True)
def test_a_request_that_cannot_be_expanded_keeps_its_reason_out_of_the_logs(
    registries, caplog, no_publish
):
    class Gone(MessageBase):
        alias = "gone_later"

    register_message_types(Gone)
    schedule_messages.delay(Gone({"x": 1}), recipients("smtp", "private@example.com"))
    request = ScheduleRequest.objects.get()
    del dispatcher_types._message_types["gone_later"]  # a deploy removed the type meanwhile

    with pytest.raises(ScheduleError, match=rf"schedule request {request.pk} cannot be expanded"):
        expand_schedule_request(request.pk)

    request.refresh_from_db()
    assert "gone_later" in request.error
    assert not Message.objects.exists() and not Dispatch.objects.exists()
    assert "private@example.com" not in caplog.text
    assert sweep()["expanded"] == 0  # not tried again and again


@pytest.mark.django_db(transaction=True)
def test_the_sweep_expands_a_request_whose_publish_was_lost(user, no_publish, monkeypatch):
    from workers import broker

    def broker_down(*args, **kwargs):
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(broker, "publish_schedule_request", broker_down)
    schedule_messages.delay("Later", recipients("smtp", user))  # logged, kept for the sweep
    assert sweep()["expanded"] == 0  # not stale yet: its task may still be on the way

    ScheduleRequest.objects.update(time_created=timezone.now() - timedelta(hours=1))
    assert sweep()["expanded"] == 1
    assert Dispatch.objects.get().address == "ann@example.com"
    assert not ScheduleRequest.objects.exists()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_task_delivered_twice_sends_nothing_twice(start_worker, smtp_server):
    sink, port = smtp_server
    start_worker(["messenger.smtp"], env={"EMAIL_PORT": str(port)})
    [(_, dispatches)] = schedule_messages(
        "once", recipients("smtp", [f"u{i}@example.com" for i in range(30)])
    )
    ids = [d.pk for d in dispatches]
    for _ in range(3):  # the same batch published again, as a redelivering broker would
        send_dispatches.apply_async(("smtp", ids), queue="messenger.smtp")

    sink.wait_for(30, timeout=30)
    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() == 30, 10
    )
    import time

    time.sleep(1.5)  # give the duplicates time to (not) send
    assert sorted(sink.recipients()) == sorted(d.address for d in dispatches)
    assert set(Dispatch.objects.values_list("retry_count", flat=True)) == {1}
    assert not DispatchError.objects.exists()


@pytest.mark.parametrize("subject", ["Hi\r\nBcc: everyone@example.com", "two\nlines", "cr\r"])
def test_a_subject_that_is_not_one_line_is_refused_before_anything_is_written(subject):
    for message_cls in (EmailTextMessage, EmailHtmlMessage):
        with pytest.raises(InvalidContextError, match=r"'subject' goes into a header"):
            schedule_messages(message_cls(subject, "body"), recipients("smtp", "a@example.com"))
        with pytest.raises(InvalidContextError, match=r"'subject' goes into a header"):
            schedule_messages.delay(message_cls(subject, "body"), recipients("smtp", "a@b.example"))
    assert_nothing_written()


@pytest.mark.parametrize("priority", [99999, -5, 1.5, None])
def test_a_bad_class_level_priority_is_a_schedule_error(priority, registries):
    class Odd(MessageBase):
        alias = "odd_priority"

    Odd.priority = priority  # type: ignore[assignment]
    register_message_types(Odd)
    with pytest.raises(ScheduleError, match=r"priority of message type 'odd_priority' must be"):
        schedule_messages(Odd({"x": 1}), recipients("smtp", "a@example.com"))
    assert_nothing_written()


def test_a_context_nested_too_deeply_is_a_schedule_error():
    deep: list = []
    inner = deep
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    message = EmailTextMessage("s", {"deep": deep})
    with pytest.raises(InvalidContextError, match="nested more than 50 levels deep"):
        schedule_messages(message, recipients("smtp", "a@example.com"))
    assert_nothing_written()
    nested_enough: dict = {"level": {"level": {"level": "fine"}}}
    schedule_messages(EmailTextMessage("s", nested_enough), recipients("smtp", "a@example.com"))


def test_a_recipient_deleted_after_delay_is_skipped_and_the_others_get_it(user, caplog):
    bob = get_user_model().objects.create(username="bob", email="bob@example.com")
    payload = encode_call(
        EmailTextMessage("Hi", "body"), recipients("smtp", [user, bob, "c@example.com"]), sender=bob
    )
    bob_pk = bob.pk
    bob.delete()

    [(message, dispatches)] = schedule_encoded(payload)

    assert sorted(d.address for d in dispatches) == ["ann@example.com", "c@example.com"]
    assert message.sender is None
    assert f"smtp recipient skipped: user {bob_pk} no longer exists" in caplog.text
    assert f"without a sender: user {bob_pk} no longer exists" in caplog.text
    assert "bob@example.com" not in caplog.text
