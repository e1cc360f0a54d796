"""django-sitemessage's toolbox functions and exceptions at their import paths, against the real
test database and a real SMTP server: send_scheduled_messages() delivers in this process through
the workers' claim/lease/outcome code, check_undelivered() counts and e-mails, and
cleanup_sent_messages() deletes exactly the old sent rows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

import sitemessage.exceptions as sm_exceptions
import sitemessage.toolbox as sm_toolbox
import sitemessage.utils as sm_utils
from dispatcher import toolbox as dispatcher_toolbox
from dispatcher.messages import PlainTextMessage, register_message_types
from dispatcher.models import Dispatch, DispatchError, Message
from messengers import exceptions as ours
from messengers import registry
from messengers.base import MessengerBase
from sitemessage.exceptions import (
    MessengerException,
    MessengerWarmupException,
    SiteMessageConfigurationError,
    SiteMessageError,
    UnknownMessageTypeError,
    UnknownMessengerError,
)
from sitemessage.messages.email import EmailTextMessage
from sitemessage.toolbox import (
    check_undelivered,
    cleanup_sent_messages,
    get_message_type_for_app,
    override_message_type_for_app,
    recipients,
    schedule_messages,
    send_scheduled_messages,
)
from tests.faultsapp.helpers import make_dispatch

pytestmark = pytest.mark.django_db
Status = Dispatch.Status


def ago(**delta: float) -> datetime:
    return timezone.now() - timedelta(**delta)


@pytest.fixture
def smtp(smtp_server, settings):
    sink, port = smtp_server
    settings.EMAIL_PORT = port
    return sink


def statuses() -> dict[int, int]:
    return dict(Dispatch.objects.values_list("pk", "dispatch_status"))


# send_scheduled_messages


def test_send_scheduled_messages_delivers_due_rows_in_process_and_leaves_the_rest(smtp, no_publish):
    [(_, scheduled)] = schedule_messages(
        EmailTextMessage("Hello", "Body"), recipients("smtp", ["a@example.com", "b@example.com"])
    )
    due = make_dispatch(Status.ERROR, address="due@example.com", next_attempt_at=ago(seconds=5))
    upgraded = make_dispatch(Status.ERROR, address="old@example.com", next_attempt_at=None)
    later = make_dispatch(Status.ERROR, address="later@example.com", next_attempt_at=ago(hours=-1))
    sent = make_dispatch(Status.SENT, address="sent@example.com")
    failed = make_dispatch(Status.FAILED, address="failed@example.com")
    held = make_dispatch(
        Status.PROCESSING,
        address="held@example.com",
        lease_owner="worker:1:task",
        lease_expires_at=ago(minutes=-10),
    )

    result = send_scheduled_messages()

    assert sorted(smtp.recipients()) == [
        "a@example.com",
        "b@example.com",
        "due@example.com",
        "old@example.com",
    ]
    assert (result.claimed, result.sent, result.errors, result.failed) == (4, 4, 0, 0)
    now = statuses()
    assert {now[d.pk] for d in [*scheduled, due, upgraded]} == {Status.SENT}
    assert (now[later.pk], now[sent.pk], now[failed.pk], now[held.pk]) == (
        Status.ERROR,
        Status.SENT,
        Status.FAILED,
        Status.PROCESSING,
    )
    assert Dispatch.objects.get(pk=due.pk).retry_count == 2  # the claim counted an attempt
    assert send_scheduled_messages().claimed == 0  # nothing is sent twice
    assert len(smtp.messages) == 4


def test_send_scheduled_messages_records_a_failure_for_a_retry(smtp_servers, settings):
    settings.EMAIL_PORT = smtp_servers(start=False).port  # nothing listens there
    pending = make_dispatch(Status.PENDING, retry_count=0)

    result = send_scheduled_messages()

    row = Dispatch.objects.get(pk=pending.pk)
    assert (result.claimed, result.errors) == (1, 1)
    assert row.dispatch_status == Status.ERROR
    assert row.next_attempt_at is not None and row.next_attempt_at > timezone.now()
    assert "cannot connect to SMTP server" in row.errors.get().error_log


def test_send_scheduled_messages_gives_back_expired_leases_and_sends_them(smtp):
    dead = make_dispatch(Status.PROCESSING, lease_owner="gone:1:x", lease_expires_at=ago(seconds=5))

    assert send_scheduled_messages().sent == 1
    assert Dispatch.objects.get(pk=dead.pk).dispatch_status == Status.SENT
    assert smtp.recipients() == [dead.address]


def test_send_scheduled_messages_with_a_priority_sends_only_that_priority(smtp):
    low = make_dispatch(Status.PENDING, address="low@example.com", priority=1)
    high = make_dispatch(Status.PENDING, address="high@example.com", priority=5)

    assert send_scheduled_messages(priority=5).sent == 1
    assert smtp.recipients() == ["high@example.com"]
    assert (statuses()[low.pk], statuses()[high.pk]) == (Status.PENDING, Status.SENT)
    with pytest.raises(ours.ScheduleError, match="priority must be an integer"):
        send_scheduled_messages(priority="5")  # type: ignore[arg-type]


def test_send_scheduled_messages_in_batches_of_batch_size(smtp, settings):
    settings.SITEMESSAGE_BATCH_SIZE = 2
    rows = [make_dispatch(Status.PENDING, address=f"r{n}@example.com") for n in range(5)]

    assert send_scheduled_messages().sent == 5
    assert {statuses()[d.pk] for d in rows} == {Status.SENT}


def test_an_unknown_messenger_raises_before_anything_is_sent_unless_ignored(smtp):
    known = make_dispatch(Status.PENDING, address="a@example.com")
    unknown = make_dispatch(Status.PENDING, messenger="gone", address="b@example.com")

    with pytest.raises(UnknownMessengerError, match="'gone' is not registered"):
        send_scheduled_messages()
    assert smtp.messages == [] and statuses()[known.pk] == Status.PENDING

    assert send_scheduled_messages(ignore_unknown_messengers=True).sent == 1
    assert smtp.recipients() == ["a@example.com"]
    row = Dispatch.objects.get(pk=unknown.pk)
    assert (row.dispatch_status, row.retry_count, row.errors.count()) == (Status.PENDING, 1, 0)


def test_an_unknown_message_type_raises_before_anything_is_sent_unless_ignored(smtp):
    known = make_dispatch(Status.PENDING, address="a@example.com")
    unknown = make_dispatch(Status.PENDING, address="b@example.com")
    Message.objects.filter(pk=unknown.message_id).update(cls="no_such_type")

    with pytest.raises(UnknownMessageTypeError, match="'no_such_type' is not registered"):
        send_scheduled_messages()
    assert smtp.messages == [] and statuses()[known.pk] == Status.PENDING

    assert send_scheduled_messages(ignore_unknown_message_types=True).sent == 1
    assert smtp.recipients() == ["a@example.com"]
    assert statuses()[unknown.pk] == Status.PENDING and not DispatchError.objects.exists()


class ColdMessenger(MessengerBase):
    """Cannot warm up, as django-sitemessage messengers signal it."""

    alias = "cold"

    def before_send(self) -> None:
        raise MessengerWarmupException("cannot log in")

    def send(self, message_cls, message_model, dispatch_models) -> None:
        raise AssertionError("send() after a failed warm-up")


def test_a_warmup_exception_is_a_temporary_failure(registries):
    registry.register_messenger_objects(ColdMessenger())
    row = make_dispatch(Status.PENDING, messenger="cold", address="anyone", retry_count=0)

    result = send_scheduled_messages()

    row.refresh_from_db()
    assert (result.errors, row.dispatch_status) == (1, Status.ERROR)
    assert row.errors.get().exc_type == "MessengerWarmupException"


# exceptions


def test_upstream_exception_hierarchy_catches_ours():
    with pytest.raises(MessengerException):
        sm_toolbox.get_registered_messenger_object("nosuch")
    with pytest.raises(SiteMessageError):
        sm_toolbox.get_registered_message_type("nosuch")
    with pytest.raises(SiteMessageError):
        recipients("smtp", "not an address")
    assert issubclass(ours.DeliveryError, MessengerException)
    assert issubclass(ours.PermanentDeliveryError, SiteMessageError)
    assert issubclass(MessengerWarmupException, MessengerException)
    assert issubclass(MessengerWarmupException, ours.TemporaryDeliveryError)
    assert issubclass(SiteMessageConfigurationError, SiteMessageError)
    assert issubclass(SiteMessageConfigurationError, ImproperlyConfigured)
    # Ours: an unknown messenger option stays outside the root a delivery loop catches.
    assert not issubclass(ours.MessengerConfigurationError, SiteMessageError)
    assert ours.SitemessageError is SiteMessageError
    assert UnknownMessengerError is ours.UnknownMessengerError
    assert issubclass(UnknownMessengerError, LookupError)
    assert sm_exceptions.UnknownMessageTypeError is ours.UnknownMessageTypeError


# check_undelivered


def undelivered() -> None:
    make_dispatch(Status.FAILED, errors=["SMTP 550 5.1.1 no such user"])
    make_dispatch(Status.PROCESSING, lease_owner="gone:1:x", lease_expires_at=ago(seconds=5))
    make_dispatch(Status.ERROR, errors=["SMTP 421 closing"])  # will be retried: not counted
    make_dispatch(Status.SENT)


def test_check_undelivered_returns_the_count_and_emails_to(smtp):
    undelivered()

    assert check_undelivered(to="ops@example.com") == 2

    [(rcpts, email)] = smtp.messages
    assert rcpts == ["ops@example.com"]
    assert email["Subject"] == "[sitemessage] 2 undelivered dispatches"
    assert "Undelivered dispatches count: 2." in email.get_payload()


def test_check_undelivered_without_to_emails_admins(smtp, settings):
    settings.ADMINS = [("Ops", "ops@example.com"), ("Dev", "dev@example.com")]
    undelivered()

    assert check_undelivered() == 2
    assert sorted(smtp.recipients()) == ["dev@example.com", "ops@example.com"]


def test_check_undelivered_sends_nothing_when_all_is_well_or_nobody_to_tell(smtp, settings):
    settings.ADMINS = [("Ops", "ops@example.com")]
    make_dispatch(Status.SENT)
    assert check_undelivered() == 0

    settings.ADMINS = []
    undelivered()
    assert check_undelivered() == 2
    assert smtp.messages == []


def test_check_undelivered_raises_when_the_report_cannot_be_sent(smtp):
    smtp.reject["ops@example.com"] = "550 5.1.1 no such user"
    undelivered()

    with pytest.raises(ours.DeliveryError, match="failed for 1 of 1 addresses"):
        check_undelivered(to="ops@example.com")
    with pytest.raises(ours.InvalidAddressError):
        check_undelivered(to="not an address")


# cleanup_sent_messages


def sent_dispatch(days: float, *, message: Message | None = None, upgraded: bool = False):
    when = ago(days=days)
    row = make_dispatch(Status.SENT, sent_at=None if upgraded else when, time_dispatched=when)
    if message is not None:
        orphan = row.message_id
        Dispatch.objects.filter(pk=row.pk).update(message=message)
        Message.objects.filter(pk=orphan).delete()
        row.refresh_from_db()
    return row


def test_cleanup_deletes_exactly_the_old_sent_dispatches_and_their_bare_messages():
    old = sent_dispatch(10)
    old_upgraded = sent_dispatch(10, upgraded=True)
    recent = sent_dispatch(1)
    pending = make_dispatch(Status.PENDING)
    shared = sent_dispatch(10, message=pending.message)  # its message still has a dispatch
    failed = make_dispatch(Status.FAILED, errors=["550"])

    result = cleanup_sent_messages(ago=5)

    assert result == (3, 2)
    assert set(Dispatch.objects.values_list("pk", flat=True)) == {recent.pk, pending.pk, failed.pk}
    assert set(Message.objects.values_list("pk", flat=True)) == {
        recent.message_id,
        pending.message_id,
        failed.message_id,
    }
    assert not Message.objects.filter(pk__in=[old.message_id, old_upgraded.message_id]).exists()
    assert shared.message_id == pending.message_id  # kept: it still has a pending dispatch


def test_cleanup_without_ago_deletes_every_sent_one_and_dispatches_only_keeps_messages():
    rows = [sent_dispatch(10), sent_dispatch(0)]
    pending = make_dispatch(Status.PENDING)

    assert cleanup_sent_messages(dispatches_only=True) == (2, 0)
    assert list(Dispatch.objects.values_list("pk", flat=True)) == [pending.pk]
    assert Message.objects.filter(pk__in=[r.message_id for r in rows]).count() == 2

    with pytest.raises(ValueError, match="0 or more"):
        cleanup_sent_messages(ago=-1)
    with pytest.raises(TypeError, match="number of days"):
        cleanup_sent_messages(ago="5")  # type: ignore[arg-type]


# per-app message types, constants and the facades


@pytest.fixture
def overrides() -> Iterator[None]:
    saved = {app: dict(m) for app, m in dispatcher_toolbox._message_types_for_apps.items()}
    yield
    dispatcher_toolbox._message_types_for_apps.clear()
    dispatcher_toolbox._message_types_for_apps.update(saved)


class ShoutMessage(PlainTextMessage):
    alias = "shout"


def test_a_project_overrides_the_message_type_of_an_app(registries, overrides):
    register_message_types(ShoutMessage)
    assert get_message_type_for_app("blog", "plain") is PlainTextMessage

    override_message_type_for_app("blog", "plain", "shout")

    assert get_message_type_for_app("blog", "plain") is ShoutMessage
    assert sm_utils.get_message_type_for_app("forum", "plain") is PlainTextMessage
    override_message_type_for_app("blog", "email_plain", "missing")
    with pytest.raises(UnknownMessageTypeError, match="'missing'"):
        get_message_type_for_app("blog", "email_plain")
    with pytest.raises(TypeError, match="new_message_type_alias"):
        override_message_type_for_app("blog", "plain", None)  # type: ignore[arg-type]


def test_toolbox_names_are_upstreams():
    assert (sm_toolbox._ALIAS_SEP, sm_toolbox._PREF_POST_KEY) == ("|", "sm_user_pref")
    assert sm_toolbox.override_message_type_for_app is sm_utils.override_message_type_for_app
    assert sm_toolbox.register_messenger_objects is registry.register_messenger_objects
    assert sm_toolbox.get_registered_messenger_objects is registry.get_registered_messenger_objects
    assert sm_toolbox.register_message_types is register_message_types
    sm_toolbox.register_builtin_message_types()
    assert sm_toolbox.get_registered_message_type("email_plain") is EmailTextMessage
