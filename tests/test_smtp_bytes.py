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


def dispatch_for(
    message: Message, pk: int, address: str, body: str | None, url: object = ""
) -> Dispatch:
    dispatch = Dispatch(pk=pk, message=message, messenger="smtp", address=address)
    dispatch.message_cache = body  # type: ignore[assignment]  # None: a compile() that gave none
    dispatch.unsubscribe_url = url  # type: ignore[assignment]
    return dispatch


# Lengths around the 78 characters a header line may have before it is folded.
ADDRESSES = ["a@example.com", "x" * 40 + "@" + "d" * 29 + ".com", "x" * 41 + "@" + "d" * 29 + ".com",
             "x" * 60 + "@" + "d" * 60 + ".com", "o'neil+tag@sub.example.co.uk"]  # fmt: skip
URLS = ["", None, 42, "http://example.com/u/1", "https://ex.com/" + "a" * 43,
        "https://ex.com/" + "a" * 44, "https://example.com/u/" + "t" * 150 + "?x=1&y=%20"]  # fmt: skip
# Bodies go into one template per type, subject and sender (7bit and 8bit): line ends of every
# kind, dots and "From " at line starts, the longest line that stays unencoded (998 bytes).
BODIES = ["Numbers are up.\nSee you.", "Zoë's café: ½ price. " * 20, "", "ends\n",
          "crlf\r\nand cr\rand lf\n\n\nmore\r\n", "From here\n.dot\n..\n>From", "tab\tend ",
          "x" * 998, "é" * 499, "ü\r\n" * 3 + "\u2028 line separator", None]  # fmt: skip
#: Built the usual way: a line over 998 bytes makes Django encode the body quoted-printable.
ENCODED = ["x" * 999, "é" * 500, "ok\n" + "y" * 2000]


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
    messenger = SMTPMessenger(from_email=sender, host="127.0.0.1")  # its templates: all bodies
    message = Message(pk=7, cls=cls.alias, context={"subject": "Grüße, Bericht Nr. 5"})
    for body in BODIES:
        shared = _SharedBody(messenger, cls, message)
        for pk, (address, url) in enumerate([(a, u) for a in ADDRESSES for u in URLS], start=10**6):
            dispatch = dispatch_for(message, pk, address, body, url)
            prepared = shared.prepare(dispatch)
            assert prepared is not None, (address, url)  # plain values: the fast path
            message_id, _, envelope_to, data = prepared
            expected = the_usual_way(messenger, cls, message, dispatch)
            assert DATE.sub(b"", data) == DATE.sub(b"", expected), (address, url, (body or "")[:20])
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


@pytest.mark.parametrize("body", ENCODED)
def test_a_body_django_would_encode_quoted_printable_is_built_the_usual_way(body):
    messenger = SMTPMessenger(from_email="noreply@example.com", host="127.0.0.1")
    message = Message(pk=7, cls="email_plain", context={"subject": "s"})
    dispatch = dispatch_for(message, 1, "a@example.com", body)
    assert _SharedBody(messenger, EmailTextMessage, message).prepare(dispatch) is None
    email = the_usual_way(messenger, EmailTextMessage, message, dispatch)
    assert b"Content-Transfer-Encoding: quoted-printable" in email  # so not our 8bit bytes


def test_messages_of_one_type_share_a_template_per_subject():
    messenger = SMTPMessenger(from_email="noreply@example.com", host="127.0.0.1")
    sent = []
    for pk, subject in enumerate(["Your code", "Your code", "Ihr Code: ä", "Your code"], start=1):
        message = Message(pk=pk, cls="email_plain", context={"subject": subject})
        dispatch = dispatch_for(message, 100 + pk, f"u{pk}@example.com", f"code {pk}\n")
        prepared = _SharedBody(messenger, EmailTextMessage, message).prepare(dispatch)
        assert prepared is not None
        expected = the_usual_way(messenger, EmailTextMessage, message, dispatch)
        assert DATE.sub(b"", prepared[3]) == DATE.sub(b"", expected)
        sent.append(prepared[3])
    assert len(messenger._templates.entries) == 2  # two subjects, one 7bit body each
    assert b"code 4" in sent[3] and b"code 1" not in sent[3]


def test_a_messenger_that_composes_its_own_way_keeps_a_template_per_message():
    class Tagged(SMTPMessenger):
        def _compose(self, message_cls, message_model, *args):
            email = super()._compose(message_cls, message_model, *args)
            email.extra_headers["X-Campaign"] = str(message_model.pk)
            return email

    messenger = Tagged(from_email="noreply@example.com", host="127.0.0.1")
    for pk, url in ((1, ""), (2, ""), (3, "https://example.com/u/3")):
        message = Message(pk=pk, cls="email_plain", context={"subject": "same"})
        dispatch = dispatch_for(message, 10 + pk, "a@example.com", "same body", url)
        prepared = _SharedBody(messenger, EmailTextMessage, message).prepare(dispatch)
        assert prepared is not None and f"X-Campaign: {pk}\r\n".encode() in prepared[3]
        expected = the_usual_way(messenger, EmailTextMessage, message, dispatch)
        assert DATE.sub(b"", prepared[3]) == DATE.sub(b"", expected)
