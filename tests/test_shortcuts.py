"""django-sitemessage's shortcuts: one call schedules one message for one messenger."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from dispatcher.models import Dispatch, Message
from messengers.exceptions import InvalidAddressError
from messengers.registry import register_messenger_objects
from sitemessage.messengers.telegram import TelegramMessenger
from sitemessage.messengers.twitter import TwitterMessenger
from sitemessage.messengers.xmpp import XMPPSleekMessenger
from sitemessage.shortcuts import (
    schedule_email,
    schedule_jabber_message,
    schedule_telegram_message,
    schedule_tweet,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def messengers(registries, no_publish, monkeypatch):
    register_messenger_objects(
        XMPPSleekMessenger("bot@example.com", "secret"),
        TwitterMessenger("key", "secret", "token", "token-secret"),
        TelegramMessenger("123:abc"),
    )


def stored() -> list[tuple[str, str, str]]:
    return [
        (d.message.cls, d.messenger, d.address)
        for d in Dispatch.objects.select_related("message").order_by("pk")
    ]


def test_schedule_email_text_and_html():
    user = get_user_model().objects.create(username="ann", email="ann@example.com")
    schedule_email("Hello", ["bob@example.com", user], subject="Hi", priority=3)
    schedule_email({"name": "Bob"}, "bob@example.com", subject="Hi (html)")
    assert stored() == [
        ("email_plain", "smtp", "bob@example.com"),
        ("email_plain", "smtp", "ann@example.com"),
        ("email_html", "smtp", "bob@example.com"),
    ]
    first, second = Message.objects.order_by("pk")
    assert first.context["subject"] == "Hi" and first.priority == 3
    assert second.context["name"] == "Bob"


def test_schedule_email_through_the_configured_messenger_and_type(settings):
    settings.SITEMESSAGE_SHORTCUT_EMAIL_MESSAGE_TYPE = "email_html"
    schedule_email("Hello", "bob@example.com", subject="Hi")
    assert stored() == [("email_html", "smtp", "bob@example.com")]
    settings.SITEMESSAGE_SHORTCUT_EMAIL_MESSENGER_TYPE = "telegram"
    with pytest.raises(InvalidAddressError, match="telegram"):
        schedule_email("Hello", "bob@example.com", subject="Hi")


def test_schedule_jabber_tweet_and_telegram():
    schedule_jabber_message("ping", "ann@jabber.example.com")
    schedule_tweet("hello world")  # no address: a post to the timeline
    schedule_tweet("hello you", to="@ann")
    schedule_telegram_message("hello chat", ["-100123", "@channelname"])
    assert stored() == [
        ("plain", "xmppsleek", "ann@jabber.example.com"),
        ("plain", "twitter", ""),
        ("plain", "twitter", "@ann"),
        ("plain", "telegram", "-100123"),
        ("plain", "telegram", "@channelname"),
    ]


def test_shortcuts_refuse_bad_addresses_before_writing():
    with pytest.raises(InvalidAddressError):
        schedule_telegram_message("hi", "not a chat")
    with pytest.raises(InvalidAddressError):
        schedule_tweet("hi", to="@not a name")
    assert not Message.objects.exists()
