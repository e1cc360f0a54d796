"""django-sitemessage's MessageBase API: text versus template contexts, the template chosen per
messenger (not cached on the class), supported_messengers enforced before anything is written,
and the small methods (get_context, merge_context, recipients, get_subscribers, schedule)."""

from __future__ import annotations

from typing import Any

import pytest
from django.template import engines

from dispatcher.messages import MessageBase, register_message_types
from dispatcher.models import Dispatch, Message, ScheduleRequest, Subscription
from messengers.base import MessengerBase
from messengers.registry import register_messenger_objects
from sitemessage.exceptions import ScheduleError, UnsupportedMessengerError
from sitemessage.messages.email import EmailTextMessage
from sitemessage.messages.plain import PlainTextMessage
from sitemessage.toolbox import recipients, schedule_messages

pytestmark = pytest.mark.django_db

TEMPLATES = {
    "sitemessage/messages/digest__smtp.tpl": "mail for {{ name }}",
    "sitemessage/messages/digest__pager.tpl": "page for {{ name }} via {{ dispatch_model.messenger }}",
    "sitemessage/messages/legacy.tpl": "legacy {{ name }} to {{ address }}",
    "custom.tpl": "custom {{ name }}",
}


@pytest.fixture
def templates(settings):
    settings.TEMPLATES = [
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "APP_DIRS": False,
            "OPTIONS": {"loaders": [("django.template.loaders.locmem.Loader", TEMPLATES)]},
        }
    ]
    engines._engines = {}  # type: ignore[attr-defined]
    engines.__dict__.pop("templates", None)
    yield
    engines._engines = {}  # type: ignore[attr-defined]
    engines.__dict__.pop("templates", None)


class Pager(MessengerBase):
    alias = "pager"


class Digest(MessageBase):
    alias = "digest"


class Legacy(MessageBase):
    alias = "legacy"


@pytest.fixture
def types(registries):
    register_messenger_objects(Pager())
    register_message_types(Digest, Legacy)


def stored(
    message: MessageBase, messenger: str = "smtp", address: str = "a@x.org"
) -> tuple[Message, Dispatch]:
    model = Message(pk=1, cls=message.get_alias(), context=message.context)
    return model, Dispatch(pk=2, message=model, messenger=messenger, address=address)


def test_the_template_is_chosen_per_messenger_every_time(types, templates):
    model, mail = stored(Digest({"name": "Ann"}))
    _, page = stored(Digest({"name": "Ann"}), "pager", "555")
    assert Digest.compile(model, "smtp", mail) == "mail for Ann"
    # django-sitemessage cached the first messenger's template on the class: "mail for Ann".
    assert Digest.compile(model, Pager(), page) == "page for Ann via pager"
    assert Digest.get_template(model, "smtp") == "sitemessage/messages/digest__smtp.tpl"
    assert Digest.template is None


def test_the_context_template_wins_then_the_class_template_then_the_fallback(types, templates):
    model, dispatch = stored(Digest({"name": "Ann"}, template_path="custom.tpl"))
    assert Digest.compile(model, "smtp", dispatch) == "custom Ann"
    model, dispatch = stored(Legacy({"name": "Bo"}))
    assert Legacy.compile(model, "smtp", dispatch) == "legacy Bo to a@x.org"  # <alias>.<ext>


def test_a_text_context_is_the_body_and_a_dict_one_renders(types, templates):
    text = Digest("plain words {{ not a template }}")
    assert text.get_context() == {"tpl": None, "use_tpl": False, "stext_": text.context["stext_"]}
    model, dispatch = stored(text)
    assert Digest.compile(model, "smtp", dispatch) == "plain words {{ not a template }}"
    assert Digest({"name": "x"}).context["use_tpl"] is True
    assert str(Digest("x")) == "digest"


def test_merge_context_joins_texts_and_lets_new_values_win():
    merged = PlainTextMessage.merge_context({"stext_": "one", "a": 1}, {"stext_": "two", "a": 2})
    assert merged == {"stext_": "one\ntwo", "a": 2}
    assert MessageBase.merge_context({"a": 1}, {"b": 2}) == {"a": 1, "b": 2}


def test_an_unsupported_messenger_is_refused_before_anything_is_written(types):
    page = recipients("pager", "555")
    for call in (
        lambda: schedule_messages(EmailTextMessage("s", "t"), page),
        lambda: schedule_messages.delay(EmailTextMessage("s", "t"), page),
        lambda: Message.create("email_plain", {"stext_": "t", "subject": "s"}, page),
        lambda: EmailTextMessage("s", "t").schedule(page),
    ):
        with pytest.raises(
            UnsupportedMessengerError,
            match="'email_plain' cannot be sent through messenger 'pager'",
        ):
            call()
    assert issubclass(UnsupportedMessengerError, ScheduleError)
    assert not Message.objects.exists() and not ScheduleRequest.objects.exists()
    schedule_messages(PlainTextMessage("any messenger"), page)  # no supported_messengers: all
    assert Dispatch.objects.get().messenger == "pager"


def test_schedule_stores_the_message_and_its_dispatches(django_user_model):
    user = django_user_model.objects.create(username="ann", email="ann@x.org")
    message, dispatches = PlainTextMessage("hi").schedule(
        recipients("smtp", user), sender=user, priority=4
    )
    assert (message.cls, message.priority, message.sender, message.dispatches_ready) == (
        "plain",
        4,
        user,
        True,
    )
    assert [(d.address, d.recipient) for d in dispatches] == [("ann@x.org", user)]
    postponed, none = PlainTextMessage("later").schedule()
    assert none == [] and postponed.dispatches_ready is False


def test_recipients_and_get_subscribers(django_user_model):
    active = django_user_model.objects.create(username="a", email="a@x.org")
    inactive = django_user_model.objects.create(username="b", email="b@x.org", is_active=False)
    for who in (active, inactive, "c@x.org"):
        Subscription.create(who, "plain", "smtp")
    Subscription.objects.create(message_cls="plain", messenger_cls="gone", address="d@x.org")

    def addresses(found: list[Any]) -> list[str]:
        return sorted(r.address for r in found)

    assert addresses(PlainTextMessage.get_subscribers()) == ["a@x.org", "c@x.org"]
    assert addresses(PlainTextMessage.get_subscribers(active_only=False)) == [
        "a@x.org",
        "b@x.org",
        "c@x.org",
    ]
    assert PlainTextMessage.recipients("smtp", "z@x.org") == recipients("smtp", "z@x.org")
