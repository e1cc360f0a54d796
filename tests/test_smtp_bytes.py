"""The SMTP messenger builds one e-mail per shared body and replaces what differs per recipient
in its bytes (messengers.smtp._SharedBody): the bytes must be exactly those of the e-mail built
for each recipient, header folding included. No server needed: both are encoded here."""

from __future__ import annotations

import re

import pytest

from dispatcher.messages import MessageBase
from dispatcher.models import Dispatch, Message
from messengers.smtp import SMTPMessenger, _SharedBody
from sitemessage.messages.email import EmailHtmlMessage, EmailTextMessage

DATE = re.compile(rb"^Date: [^\r\n]+\r\n", re.MULTILINE)


def the_usual_way(messenger: SMTPMessenger, cls: type[MessageBase], message, dispatch) -> bytes:
    email = messenger._build(cls, message, dispatch)
    return messenger._encode(email, dispatch.address, dispatch.pk)[2]


def dispatch_for(message: Message, pk: int, address: str, body: str, url: object = "") -> Dispatch:
    dispatch = Dispatch(pk=pk, message=message, messenger="smtp", address=address)
    dispatch.message_cache = body
    dispatch.unsubscribe_url = url  # type: ignore[assignment]
    return dispatch


# Lengths around the 78 characters a header line may have before it is folded.
ADDRESSES = ["a@example.com", "x" * 40 + "@" + "d" * 29 + ".com", "x" * 41 + "@" + "d" * 29 + ".com",
             "x" * 60 + "@" + "d" * 60 + ".com", "o'neil+tag@sub.example.co.uk"]  # fmt: skip
URLS = ["", None, 42, "http://example.com/u/1", "https://ex.com/" + "a" * 43,
        "https://ex.com/" + "a" * 44, "https://example.com/u/" + "t" * 150 + "?x=1&y=%20"]  # fmt: skip
BODIES = ["Numbers are up.\nSee you.", "Zoë's café: ½ price. " * 20, "x" * 2000, ""]


@pytest.mark.parametrize("cls", [EmailTextMessage, EmailHtmlMessage])
@pytest.mark.parametrize(
    "sender",
    [
        "noreply@example.com",
        "Shop <" + "s" * 50 + "@example.com>",
        "n@" + "d" * 38 + ".com",  # a Message-ID line of 78 characters
        "n@" + "d" * 39 + ".com",  # 79: folded
    ],
)
def test_the_shared_bytes_are_the_bytes_of_each_recipients_own_email(cls, sender):
    messenger = SMTPMessenger(from_email=sender, host="127.0.0.1")
    message = Message(pk=7, cls=cls.alias, context={"subject": "Grüße, Bericht Nr. 5"})
    for body in BODIES:
        shared = _SharedBody(messenger, cls, message)
        for pk, (address, url) in enumerate([(a, u) for a in ADDRESSES for u in URLS], start=10**6):
            dispatch = dispatch_for(message, pk, address, body, url)
            prepared = shared.prepare(dispatch)
            assert prepared is not None, (address, url)  # plain values: the fast path
            message_id, _, envelope_to, data = prepared
            expected = the_usual_way(messenger, cls, message, dispatch)
            assert DATE.sub(b"", data) == DATE.sub(b"", expected), (address, url, body[:20])
            assert len(DATE.findall(data)) == 1 and envelope_to == address
            assert message_id == f"<sitemessage.7.{pk}@{messenger._domain()}>"


def test_what_is_not_plain_ascii_is_built_the_usual_way():
    messenger = SMTPMessenger(from_email="noreply@example.com", host="127.0.0.1")
    message = Message(pk=8, cls="email_plain", context={"subject": "s"})
    shared = _SharedBody(messenger, EmailTextMessage, message)
    assert shared.prepare(dispatch_for(message, 1, "zoë@exämple.com", "b")) is None
    assert shared.prepare(dispatch_for(message, 2, "a@b.com", "b", "https://e.com/ü")) is None
    assert shared.prepare(dispatch_for(message, 3, '"a b"@example.com', "b")) is None
    assert shared.prepare(dispatch_for(message, 4, "a@b.com", "b")) is not None


def test_a_type_that_builds_its_own_email_is_never_shared():
    class Own(EmailTextMessage):
        alias = "own_email"

        @classmethod
        def build_email(cls, message_model, dispatch, defaults):
            raise AssertionError("not called by prepare()")

    messenger = SMTPMessenger(from_email="noreply@example.com", host="127.0.0.1")
    message = Message(pk=9, cls="own_email", context={})
    assert (
        _SharedBody(messenger, Own, message).prepare(dispatch_for(message, 1, "a@b.c", "")) is None
    )
