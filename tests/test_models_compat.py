"""django-sitemessage 1.4's model API (``sitemessage.models``) against the real test database:
upstream's names and meanings, with our corrections (bad input raises before anything is
written; grouping merges only into a message for the same sender and recipients)."""

import pytest
from django.contrib.auth import get_user_model

from dispatcher import models as dispatcher_models
from messengers.base import Outcome
from messengers.exceptions import (
    InvalidAddressError,
    InvalidContextError,
    ScheduleError,
    UnknownMessageTypeError,
    UnknownMessengerError,
)
from sitemessage.messages.base import MessageBase
from sitemessage.messages.email import EmailTextMessage
from sitemessage.messengers.smtp import SMTPMessenger
from sitemessage.models import Dispatch, DispatchError, Message, Subscription
from sitemessage.toolbox import recipients

pytestmark = pytest.mark.django_db


@pytest.fixture
def user():
    return get_user_model().objects.create(username="ann", email="ann@example.com")


def nothing_written() -> bool:
    return not (Message.objects.exists() or Dispatch.objects.exists())


def test_the_facade_exports_the_real_models():
    assert (Message, Dispatch, DispatchError, Subscription) == (
        dispatcher_models.Message,
        dispatcher_models.Dispatch,
        dispatcher_models.DispatchError,
        dispatcher_models.Subscription,
    )


def test_upstream_status_constants_keep_upstream_numbers():
    assert (
        Dispatch.DISPATCH_STATUS_PENDING,
        Dispatch.DISPATCH_STATUS_SENT,
        Dispatch.DISPATCH_STATUS_ERROR,
        Dispatch.DISPATCH_STATUS_FAILED,
        Dispatch.DISPATCH_STATUS_PROCESSING,
    ) == (1, 2, 3, 4, 5)
    assert (Dispatch.READ_STATUS_UNREAD, Dispatch.READ_STATUS_READ) == (0, 1)


def test_str_is_upstreams(user):
    message, [dispatch] = Message.create("plain", {"stext_": "hi"}, recipients("smtp", user))
    error = DispatchError.objects.create(dispatch=dispatch, error_log="boom")
    by_user = Subscription.create(user, "plain", "smtp")
    by_address = Subscription.create("bob@example.com", "plain", "smtp")
    assert str(message) == "plain"
    assert str(dispatch) == "ann@example.com [smtp]"
    assert str(error) == f"Dispatch ID {dispatch.pk} error entry"
    assert str(by_user) == f"{user.pk} [plain - smtp]"
    assert str(by_address) == "bob@example.com [plain - smtp]"


def test_message_create_stores_the_message_and_its_dispatches(user):
    _, dispatches = Message.create(
        "plain", {"stext_": "hi"}, recipients("smtp", [user, "bob@example.com"]), user, 7
    )
    stored = Message.objects.get()
    assert (stored.cls, stored.context, stored.sender, stored.priority) == (
        "plain",
        {"stext_": "hi"},
        user,
        7,
    )
    assert stored.dispatches_ready and stored.group_mark == ""
    assert [(d.pk, d.address, d.recipient_id) for d in dispatches] == list(
        Dispatch.objects.order_by("pk").values_list("pk", "address", "recipient")
    )
    assert [d.address for d in dispatches] == ["ann@example.com", "bob@example.com"]
    assert {d.dispatch_status for d in Dispatch.objects.all()} == {Dispatch.DISPATCH_STATUS_PENDING}


def test_message_dispatch_set_is_upstreams_name_of_its_dispatches(user):
    message, dispatches = Message.create(
        "plain", {"stext_": "hi"}, recipients("smtp", [user, "b@example.com"])
    )
    assert sorted(d.pk for d in message.dispatch_set.all()) == sorted(d.pk for d in dispatches)
    assert message.dispatch_set.filter(address="b@example.com").count() == 1


def test_message_create_without_recipients_waits_for_its_dispatches():
    message, dispatches = Message.create("plain", {"stext_": "later"})
    assert dispatches == [] and not Message.objects.get(pk=message.pk).dispatches_ready


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "text"),
    [
        (("", {}), {}, ScheduleError, "message_class"),
        (("plain", {"x": object()}), {}, InvalidContextError, "not JSON"),
        (("plain", ["x"]), {}, InvalidContextError, "must be a dict"),
        (("plain", {}), {"priority": -1}, ScheduleError, "priority"),
        (("plain", {}), {"priority": True}, ScheduleError, "priority"),
        (("plain", {}), {"sender": "ann"}, ScheduleError, "sender"),
        (("plain", {}), {"group_mark": 5}, ScheduleError, "group_mark"),
        (("plain", {}), {"recipients": [("smtp", None, "a@x.org")]}, ScheduleError, "recipients()"),
    ],
)
def test_message_create_refuses_bad_input_before_writing(args, kwargs, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        Message.create(*args, **kwargs)
    assert nothing_written()


def test_message_create_checks_every_address_before_writing(user):
    good = recipients("smtp", "bob@example.com")[0]
    bad = type(good)("smtp", None, "not an address")
    with pytest.raises(InvalidAddressError):
        Message.create("plain", {}, [good, bad])
    with pytest.raises(UnknownMessengerError):
        Message.create("plain", {}, [good, type(good)("no_such", None, "x")])
    assert nothing_written()


def test_group_mark_merges_into_the_unsent_message_of_the_same_recipients(user):
    to = recipients("smtp", [user, "bob@example.com"])
    first, first_dispatches = Message.create("plain", {"n": [1]}, to, group_mark="g")
    Dispatch.objects.update(message_cache="stale body")

    def merge(old, new):
        return {"n": old["n"] + new["n"]}

    again, dispatches = Message.create(
        "plain", {"n": [2]}, list(reversed(to)), group_mark="g", context_merge_hook=merge
    )
    assert again.pk == first.pk and Message.objects.count() == 1
    assert Message.objects.get().context == {"n": [1, 2]}
    assert sorted(d.pk for d in dispatches) == sorted(d.pk for d in first_dispatches)
    assert set(Dispatch.objects.values_list("message_cache", flat=True)) == {""}
    # Upstream's default hook: the new context replaces the old one.
    Message.create("plain", {"n": [3]}, to, group_mark="g")
    assert Message.objects.get().context == {"n": [3]}


def test_group_mark_merges_into_a_message_waiting_for_subscribers():
    first, _ = Message.create("plain", {"a": 1}, group_mark="g")
    again, dispatches = Message.create("plain", {"b": 2}, group_mark="g")
    assert (again.pk, dispatches, Message.objects.get().context) == (first.pk, [], {"b": 2})


def test_group_mark_never_merges_across_recipients_senders_or_sent_messages(user):
    Message.create("plain", {"a": 1}, recipients("smtp", user), group_mark="g")
    # Other recipients: upstream merged and dropped these; here they get a message of their own.
    _, [bob] = Message.create(
        "plain", {"a": 2}, recipients("smtp", "bob@example.com"), group_mark="g"
    )
    assert bob.address == "bob@example.com" and Dispatch.objects.count() == 2
    # Another sender: upstream merged into any sender's message.
    Message.create("plain", {"a": 3}, recipients("smtp", user), user, group_mark="g")
    # A message already being delivered is not changed under its worker.
    Dispatch.objects.update(dispatch_status=Dispatch.DISPATCH_STATUS_PROCESSING)
    Message.create("plain", {"a": 4}, recipients("smtp", user), group_mark="g")
    assert sorted(Message.objects.values_list("context", flat=True), key=str) == [
        {"a": 1},
        {"a": 2},
        {"a": 3},
        {"a": 4},
    ]


def test_a_merged_context_that_cannot_be_stored_changes_nothing(user):
    Message.create("plain", {"a": 1}, recipients("smtp", user), group_mark="g")
    with pytest.raises(InvalidContextError):
        Message.create(
            "plain",
            {},
            recipients("smtp", user),
            group_mark="g",
            context_merge_hook=lambda o, n: {"x": {1, 2}},
        )
    assert Message.objects.get().context == {"a": 1}


def test_get_type_returns_the_registered_message_type():
    message, _ = Message.create("plain", {"stext_": "hi"})
    assert issubclass(message.get_type(), MessageBase) and message.get_type().alias == "plain"
    message.cls = "gone"
    with pytest.raises(UnknownMessageTypeError):
        message.get_type()


def test_dispatch_create_stores_each_pair_once_and_marks_the_message_ready(user):
    message, _ = Message.create("plain", {"stext_": "hi"})
    twice = recipients("smtp", [user, "ann@example.com", "bob@example.com"])
    dispatches = Dispatch.create(message, twice)
    assert [d.address for d in dispatches] == ["ann@example.com", "bob@example.com"]
    assert all(d.pk for d in dispatches) and Message.objects.get().dispatches_ready
    one = Dispatch.create(message, recipients("smtp", "eve@example.com")[0])  # not in a list
    assert [d.address for d in one] == ["eve@example.com"]


def test_dispatch_create_refuses_an_unsaved_message_or_a_bad_address(user):
    with pytest.raises(ScheduleError, match="not saved"):
        Dispatch.create(Message(cls="plain"), recipients("smtp", user))
    message, _ = Message.create("plain", {})
    good = recipients("smtp", user)[0]
    with pytest.raises(InvalidAddressError):
        Dispatch.create(message, [good, type(good)("smtp", None, "bad")])
    assert not Dispatch.objects.exists() and not Message.objects.get().dispatches_ready


def test_created_dispatches_are_published_by_the_next_sweep(user, no_publish):
    from dispatcher.sweep import sweep

    _, dispatches = Message.create("plain", {"stext_": "hi"}, recipients("smtp", user))
    sweep()
    assert no_publish == [{"smtp": [dispatches[0].pk]}]


def test_read_status(user):
    _, [dispatch] = Message.create("plain", {}, recipients("smtp", user))
    assert not dispatch.is_read() and list(Dispatch.get_unread()) == [dispatch]
    dispatch.mark_read()
    assert dispatch.is_read()
    assert Dispatch.objects.get().read_status == Dispatch.READ_STATUS_UNREAD  # not saved yet
    dispatch.save()
    assert not Dispatch.get_unread().exists()
    assert Dispatch.objects.get().dispatch_status == Dispatch.DISPATCH_STATUS_PENDING


def test_set_dispatches_statuses_writes_status_time_and_retry_count(user):
    _, dispatches = Message.create(
        "plain", {}, recipients("smtp", [user, "b@example.com", "c@example.com"])
    )
    Dispatch.objects.update(lease_owner="w:1:t", retry_count=2)
    sent, error, failed = dispatches
    assert Dispatch.set_dispatches_statuses(sent=[sent], error=[error], failed=[failed]) == 3
    rows = {d.pk: d for d in Dispatch.objects.all()}
    assert [rows[d.pk].dispatch_status for d in dispatches] == [2, 3, 4]
    assert {(d.retry_count, d.lease_owner) for d in rows.values()} == {(3, "")}
    assert all(d.time_dispatched for d in rows.values())
    assert rows[sent.pk].sent_at and not rows[error.pk].sent_at
    with pytest.raises(ValueError, match="unknown dispatch status key"):
        Dispatch.set_dispatches_statuses(sent=[error], delivered=[sent])
    assert Dispatch.objects.get(pk=error.pk).dispatch_status == Dispatch.DISPATCH_STATUS_ERROR


def test_log_dispatches_errors_stores_one_row_per_dispatch(user):
    _, (ann, bob) = Message.create("plain", {}, recipients("smtp", [user, "b@example.com"]))
    ann.error_log, ann.message_cache = "550 no such user", "body for ann"
    bob.outcome = Outcome("error", ConnectionResetError("reset"))
    Dispatch.log_dispatches_errors([ann, bob])
    assert list(DispatchError.objects.values_list("dispatch", "exc_type", "error_log")) == [
        (ann.pk, "", "550 no such user"),
        (bob.pk, "ConnectionResetError", "reset"),
    ]
    assert Dispatch.objects.get(pk=ann.pk).message_cache == "body for ann"
    with pytest.raises(ValueError, match="no error_log"):
        Dispatch.log_dispatches_errors([Dispatch.objects.get(pk=ann.pk)])
    assert DispatchError.objects.count() == 2


def test_subscriptions_for_users_and_addresses(user):
    plain = Subscription.create(user.pk, "plain", "smtp")
    # Classes work as well as aliases (as upstream).
    assert Subscription.create(user, EmailTextMessage, SMTPMessenger).message_cls == "email_plain"
    assert Subscription.create(user, "plain", "smtp") == plain  # not doubled
    Subscription.create("bob@example.com", "plain", "smtp")
    assert {s.address for s in Subscription.get_for_message_cls("plain")} == {
        None,
        "bob@example.com",
    }
    assert set(Subscription.get_for_user(user)) >= {plain}
    assert list(Subscription.get_for_user(get_user_model()(username="unsaved"))) == []
    assert Subscription.cancel(user, "plain", "smtp") == 1
    assert Subscription.cancel("bob@example.com", "plain", "smtp") == 1
    assert Subscription.get_for_message_cls("plain").count() == 0


def test_replace_for_user_replaces_all_of_a_users_subscriptions(user):
    Subscription.create(user, "plain", "smtp")
    other = Subscription.create("bob@example.com", "plain", "smtp")
    prefs = [("email_plain", "smtp"), ("email_html", "smtp"), ("email_html", "smtp")]
    assert Subscription.replace_for_user(user, prefs)
    assert sorted(Subscription.get_for_user(user).values_list("message_cls", flat=True)) == [
        "email_html",
        "email_plain",
    ]
    assert Subscription.objects.filter(pk=other.pk).exists()
    assert not Subscription.replace_for_user(get_user_model()(username="x"), prefs)


def test_subscription_arguments_are_checked_before_writing(user):
    with pytest.raises(UnknownMessengerError):
        Subscription.create(user, "plain", "no_such_messenger")
    with pytest.raises(ScheduleError, match="subscriber"):
        Subscription.create(3.5, "plain", "smtp")
    with pytest.raises(ScheduleError, match="message type"):
        Subscription.create(user, "", "smtp")
    Subscription.create(user, "plain", "smtp")
    with pytest.raises(UnknownMessengerError):
        Subscription.replace_for_user(user, [("plain", "smtp"), ("plain", "gone")])
    assert list(Subscription.objects.values_list("message_cls", "messenger_cls")) == [
        ("plain", "smtp")
    ]
    assert Subscription.cancel(user, "plain", "gone_messenger") == 0  # cancelling needs no registry
