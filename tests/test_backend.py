"""sitemessage.backends.EmailBackend (dispatcher/backends.py) and what the SMTP messenger does
for it (messengers/smtp.py): Django's mail functions schedule messages that the pipeline
delivers to a real aiosmtpd server, with Django's headers, alternatives and attachments; the
RFC 8058 List-Unsubscribe headers; the messenger's ``debug`` argument."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from email.message import Message as ParsedEmail
from email.mime.image import MIMEImage

import pytest
from aiosmtpd.smtp import AuthResult
from django.core import mail
from django.core.mail import BadHeaderError, EmailMessage, EmailMultiAlternatives
from django.db import transaction
from django.test import override_settings

from dispatcher.backends import EmailBackendMessage
from dispatcher.messages import EmailTextMessage, MessageBase
from dispatcher.models import Dispatch, Message
from dispatcher.operations import send_scheduled_messages
from dispatcher.toolbox import recipients, schedule
from messengers.base import cool_down
from messengers.exceptions import InvalidAddressError, InvalidContextError, ScheduleError
from messengers.registry import register_messenger_objects
from sitemessage.backends import EmailBackend
from sitemessage.messengers.smtp import SMTPMessenger
from tests.support import SMTPServer, SMTPSink, wait_until

pytestmark = pytest.mark.django_db
Status = Dispatch.Status
BACKEND = "sitemessage.backends.EmailBackend"
#: Every byte value, so an attachment that loses or changes one is caught.
BINARY = bytes(range(256)) * 4


@pytest.fixture
def sink(smtp_server, registries, no_publish) -> Iterator[SMTPSink]:
    """A running SMTP server, the 'smtp' messenger pointed at it, Django's mail going through
    EmailBackend; tasks are not published (send_scheduled_messages() delivers in process)."""
    server_sink, port = smtp_server
    messenger = SMTPMessenger("noreply@example.com", host="127.0.0.1", port=port, timeout=5)
    register_messenger_objects(messenger)
    with override_settings(EMAIL_BACKEND=BACKEND, DEFAULT_FROM_EMAIL="site@example.com"):
        yield server_sink
    cool_down(messenger)


def deliver(sink: SMTPSink) -> dict[str, ParsedEmail]:
    """Delivers everything due in this process; returns the received e-mails by envelope
    recipient, checking each recipient got exactly one copy, to its own address only."""
    send_scheduled_messages()
    rcpts = [tuple(r) for r, _ in sink.messages]
    assert all(len(r) == 1 for r in rcpts), rcpts
    assert len(set(rcpts)) == len(rcpts), rcpts
    return {r[0]: email for r, email in sink.messages}


def parts_of(email: ParsedEmail) -> list[ParsedEmail]:
    payload = email.get_payload()
    assert isinstance(payload, list), email.get_content_type()
    parts = [part for part in payload if isinstance(part, ParsedEmail)]
    assert len(parts) == len(payload)
    return parts


def text_of(part: ParsedEmail) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "utf-8")


def test_send_mail_is_scheduled_then_delivered_as_plain_unescaped_text(sink):
    body = "Fish & chips <3\n<b>not HTML</b>\n"

    sent = mail.send_mail(
        "Tom & Jerry", body, "Shop <shop@example.com>", ["ann@example.com", "Bob <bob@example.com>"]
    )

    assert sent == 1
    [message] = Message.objects.all()
    assert message.cls == "email_django"
    assert sorted(message.dispatches.values_list("address", flat=True)) == [
        "ann@example.com",
        "bob@example.com",
    ]
    assert sink.messages == []  # scheduled, not sent
    received = deliver(sink)
    assert sorted(received) == ["ann@example.com", "bob@example.com"]
    for email in received.values():
        assert email["Subject"] == "Tom & Jerry"
        assert email["From"] == "Shop <shop@example.com>"
        assert email["To"] == "ann@example.com, Bob <bob@example.com>"
        assert email.get_content_type() == "text/plain"
        assert text_of(email).replace("\r\n", "\n") == body
    assert set(message.dispatches.values_list("dispatch_status", flat=True)) == {Status.SENT}


def test_send_mass_mail_schedules_one_message_per_email(sink):
    datatuple = [
        ("First", "one", "a@example.com", ["ann@example.com"]),
        ("Second", "two", None, ["bob@example.com", "cid@example.com"]),
        ("Third", "three", None, ["ann@example.com"]),
    ]

    assert mail.send_mass_mail(datatuple) == 3

    assert Message.objects.count() == 3 and Dispatch.objects.count() == 4
    send_scheduled_messages()
    got = sorted((rcpts[0], email["Subject"], email["From"]) for rcpts, email in sink.messages)
    assert got == [
        ("ann@example.com", "First", "a@example.com"),
        ("ann@example.com", "Third", "site@example.com"),  # DEFAULT_FROM_EMAIL, as Django
        ("bob@example.com", "Second", "site@example.com"),
        ("cid@example.com", "Second", "site@example.com"),
    ]


def test_to_cc_bcc_each_get_one_copy_with_django_headers_and_no_bcc(sink):
    email = EmailMessage(
        "Quarterly",
        "See the numbers.",
        "Shop <shop@example.com>",
        to=["ann@example.com", "Bob <bob@example.com>"],
        cc=["cid@example.com", "ann@example.com"],  # ann twice: one copy
        bcc=["secret@example.com", "Bob Again <bob@example.com>"],
        reply_to=["Help <help@example.com>"],
        headers={"X-Campaign": "spring", "Bcc": "leak@example.com", "Precedence": "bulk"},
    )

    assert email.send() == 1

    [message] = Message.objects.all()
    stored = json.dumps(message.context)
    assert "secret@example.com" not in stored and "leak@example.com" not in stored
    received = deliver(sink)
    assert sorted(received) == [
        "ann@example.com",
        "bob@example.com",
        "cid@example.com",
        "secret@example.com",
    ]
    dates = set()
    for copy in received.values():
        assert copy["From"] == "Shop <shop@example.com>"
        assert copy["To"] == "ann@example.com, Bob <bob@example.com>"
        assert copy["Cc"] == "cid@example.com, ann@example.com"
        assert copy["Reply-To"] == "Help <help@example.com>"
        assert copy["X-Campaign"] == "spring" and copy["Precedence"] == "bulk"
        assert copy["Bcc"] is None
        assert "secret@example.com" not in copy.as_string()
        dates.add(copy["Date"])
    assert len(dates) == 1  # set when scheduled: the same on every copy and every attempt
    rows = {d.address: d for d in message.dispatches.all()}
    for address, copy in received.items():
        assert copy["Message-ID"] == rows[address].provider_message_id
        assert copy["Message-ID"].startswith(f"<sitemessage.{message.pk}.{rows[address].pk}@")


def test_envelope_sender_is_the_bare_from_address(sink, monkeypatch):
    senders: list[str] = []

    async def handle_MAIL(server, session, envelope, address, mail_options):
        senders.append(address)
        envelope.mail_from = address
        return "250 OK"

    monkeypatch.setattr(sink, "handle_MAIL", handle_MAIL, raising=False)
    mail.send_mail("s", "b", "Shop <shop@example.com>", ["ann@example.com"])
    deliver(sink)
    assert senders == ["shop@example.com"]


def test_alternatives_and_attachments_arrive_byte_for_byte(sink):
    image = MIMEImage(BINARY, "png")
    image.add_header("Content-Disposition", "inline", filename="logo.png")
    email = EmailMultiAlternatives(
        "Report", "Plain & simple", "shop@example.com", ["ann@example.com"], cc=["bob@example.com"]
    )
    email.attach_alternative("<p>Plain &amp; <b>simple</b></p>", "text/html")
    email.attach("data.bin", BINARY, "application/octet-stream")
    email.attach("notes.txt", "Näive notes\nline 2\n", "text/plain")
    email.attach(image)

    assert email.send() == 1

    received = deliver(sink)
    assert sorted(received) == ["ann@example.com", "bob@example.com"]
    for copy in received.values():
        assert copy.get_content_type() == "multipart/mixed"
        body, data, notes, logo = parts_of(copy)
        assert body.get_content_type() == "multipart/alternative"
        plain, html = parts_of(body)
        assert (plain.get_content_type(), text_of(plain)) == ("text/plain", "Plain & simple")
        assert html.get_content_type() == "text/html"
        assert text_of(html) == "<p>Plain &amp; <b>simple</b></p>"
        assert (data.get_filename(), data.get_payload(decode=True)) == ("data.bin", BINARY)
        assert data.get_content_type() == "application/octet-stream"
        assert notes.get_filename() == "notes.txt"
        assert text_of(notes).replace("\r\n", "\n") == "Näive notes\nline 2\n"
        assert (logo.get_content_type(), logo.get_filename()) == ("image/png", "logo.png")
        assert logo.get_payload(decode=True) == BINARY


def test_an_html_body_stays_html(sink):
    email = EmailMessage("Hi", "<p>Hello</p>", None, ["ann@example.com"])
    email.content_subtype = "html"
    email.send()
    [copy] = deliver(sink).values()
    assert copy.get_content_type() == "text/html"
    assert text_of(copy).rstrip("\r\n") == "<p>Hello</p>"  # a text part ends with a line end


def test_a_message_id_of_the_email_is_kept_on_every_copy(sink):
    headers = {"message-id": "<order-42@shop.example.com>"}
    EmailMessage("s", "b", None, ["a@example.com", "b@example.com"], headers=headers).send()
    received = deliver(sink)
    assert {copy["Message-ID"] for copy in received.values()} == {"<order-42@shop.example.com>"}
    assert set(Dispatch.objects.values_list("provider_message_id", flat=True)) == {
        "<order-42@shop.example.com>"
    }


@pytest.mark.parametrize(("setting", "expected"), [(None, 0), (7, 7)])
def test_the_priority_setting_applies(sink, setting, expected):
    with override_settings(SITEMESSAGE_EMAIL_BACKEND_MESSAGES_PRIORITY=setting):
        mail.send_mail("s", "b", None, ["ann@example.com"])
    assert Message.objects.get().priority == expected
    assert send_scheduled_messages(priority=expected + 1).claimed == 0
    assert send_scheduled_messages(priority=expected).sent == 1


def test_a_bad_email_raises_and_schedules_nothing_of_the_call(sink):
    good = EmailMessage("Fine", "b", None, ["ann@example.com"])
    injected = EmailMessage("Hi\nBcc: victim@example.com", "b", None, ["bob@example.com"])
    with pytest.raises(BadHeaderError, match="subject must be one line"):
        EmailBackend().send_messages([good, injected])
    assert Message.objects.count() == 0 and Dispatch.objects.count() == 0


@pytest.mark.parametrize(
    ("email", "error", "match"),
    [
        (
            EmailMessage("s", "b", None, ["not an address"]),
            InvalidAddressError,
            "'not an address' is not one e-mail address",
        ),
        (EmailMessage("s", "b", None, ["a@no-dot"]), InvalidAddressError, "not a valid e-mail"),
        (
            EmailMessage("s", "b", None, ["a@example.com, b@example.com"]),
            InvalidAddressError,
            "not one e-mail address",
        ),
        (
            EmailMessage("s", "b", None, ["a@example.com"], headers={"X-A": "1\r\nX-B: 2"}),
            BadHeaderError,
            "header X-A must be one line",
        ),
        (
            EmailMessage("s", "b", None, ["a@example.com"], headers={"Bad Name": "1"}),
            BadHeaderError,
            "header name 'Bad Name' is not valid",
        ),
        (
            EmailMessage("s", "b", None, ["a@example.com"], reply_to=["a@example.com\nX: y"]),
            BadHeaderError,
            "reply_to must be one line",
        ),
        (EmailMessage("s", "b\x00", None, ["a@example.com"]), InvalidContextError, "NUL"),
    ],
)
def test_fail_silently_skips_bad_emails_and_schedules_the_others(sink, email, error, match):
    good = EmailMessage("Fine", "b", None, ["ann@example.com"])
    with pytest.raises(error, match=match):
        EmailBackend().send_messages([good, email])
    assert Message.objects.count() == 0

    assert EmailBackend(fail_silently=True).send_messages([good, email, good]) == 2
    assert Message.objects.count() == 2
    assert set(Dispatch.objects.values_list("address", flat=True)) == {"ann@example.com"}


def test_a_too_large_email_is_refused_by_name(sink):
    def large() -> EmailMessage:
        email = EmailMessage("s", "b", None, ["ann@example.com"])
        email.attach("big.bin", BINARY * 20, "application/octet-stream")
        return email

    with override_settings(SITEMESSAGE_MAX_MESSAGE_SIZE=10_000):
        with pytest.raises(InvalidContextError, match="SITEMESSAGE_MAX_MESSAGE_SIZE"):
            large().send()
        assert large().send(fail_silently=True) == 0
    assert Message.objects.count() == 0


def test_emails_without_recipients_are_skipped(sink):
    backend = EmailBackend()
    assert backend.send_messages([]) == 0
    only_bcc = EmailMessage("s", "b", None, bcc=["hidden@example.com"])
    assert backend.send_messages([EmailMessage("s", "b", None), only_bcc]) == 1
    [copy] = deliver(sink).values()
    assert copy["To"] is None and copy["Bcc"] is None
    assert sink.recipients() == ["hidden@example.com"]


@pytest.mark.django_db(transaction=True)
def test_inside_a_transaction_it_is_published_on_commit_and_nothing_on_rollback(sink, no_publish):
    with pytest.raises(RuntimeError), transaction.atomic():
        mail.send_mail("rolled back", "b", None, ["ann@example.com"])
        raise RuntimeError
    assert Message.objects.count() == 0 and no_publish == []

    with transaction.atomic():
        mail.send_mass_mail([("one", "b", None, ["ann@example.com"]),
                             ("two", "b", None, ["bob@example.com"])])  # fmt: skip
        assert no_publish == []  # not before commit
    ids = set(Dispatch.objects.values_list("pk", flat=True))
    assert {pk for batch in no_publish for pk in batch["smtp"]} == ids and len(ids) == 2

    mail.send_mail("outside", "b", None, ["cid@example.com"])
    assert len(Dispatch.objects.all()) == 3
    assert {pk for batch in no_publish for pk in batch["smtp"]} == set(
        Dispatch.objects.values_list("pk", flat=True)
    )


def test_the_message_type_refuses_other_messengers(sink, settings):
    from tests.test_messengers import MyMessenger, Outbox

    register_messenger_objects(MyMessenger(Outbox()))
    settings.SITEMESSAGE_SHORTCUT_EMAIL_MESSENGER_TYPE = "mymessenger"
    with pytest.raises(ScheduleError, match="cannot be sent through messenger 'mymessenger'"):
        mail.send_mail("s", "b", None, ["ann@example.com"])
    assert Message.objects.count() == 0


# The SMTP messenger: List-Unsubscribe, debug


def sent_through(server: SMTPServer, url: object, message_type: type = EmailTextMessage, **kw):
    """Sends one dispatch straight through the messenger with ``unsubscribe_url`` set as the
    pipeline would; returns the received e-mail."""
    message: MessageBase
    if message_type is EmailTextMessage:
        message = EmailTextMessage("Subject", "Body")
    else:
        message = EmailBackendMessage(
            EmailMessage("Subject", "Body", None, ["a@example.com"], **kw)
        )
    [(message_model, [dispatch])] = schedule(message, recipients("smtp", ["a@example.com"]))
    dispatch.message_cache = "Body"
    if url is not ...:  # ...: the attribute is not set at all
        setattr(dispatch, "unsubscribe_url", url)
    messenger = SMTPMessenger("noreply@example.com", host="127.0.0.1", port=server.port, timeout=5)
    try:
        messenger.send(message_type, message_model, [dispatch])
    finally:
        messenger.after_send()
    assert dispatch.outcome.status == "sent", dispatch.outcome
    [(_, email)] = server.sink.messages
    return email


@pytest.fixture
def server(smtp_servers, registries, no_publish):
    return smtp_servers()


def test_list_unsubscribe_headers_for_an_https_url(server):
    email = sent_through(server, "https://example.com/u/abc?x=1")
    assert email["List-Unsubscribe"] == "<https://example.com/u/abc?x=1>"
    assert email["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


@pytest.mark.parametrize("url", ["", None, 42, ...])
def test_no_list_unsubscribe_without_a_url(server, url):
    email = sent_through(server, url)
    assert email["List-Unsubscribe"] is None and email["List-Unsubscribe-Post"] is None


def test_one_click_post_only_with_https(server):
    email = sent_through(server, "http://example.com/u/abc")
    assert email["List-Unsubscribe"] == "<http://example.com/u/abc>"
    assert email["List-Unsubscribe-Post"] is None


def test_an_emails_own_list_unsubscribe_is_kept_not_doubled(server):
    own = {"list-unsubscribe": "<mailto:leave@example.com>"}
    email = sent_through(server, "https://example.com/u/1", EmailBackendMessage, headers=own)
    assert email.get_all("List-Unsubscribe") == ["<mailto:leave@example.com>"]
    assert email["List-Unsubscribe-Post"] is None


def test_debug_prints_the_conversation_but_not_the_login(smtp_servers, capsys):
    def authenticator(server, session, envelope, mechanism, auth_data):
        return AuthResult(success=True)

    server = smtp_servers(authenticator=authenticator, auth_require_tls=False)
    options = {"host": "127.0.0.1", "port": server.port, "use_tls": False, "timeout": 5}
    SMTPMessenger(
        "noreply@example.com", "user", "s3cret-pw", debug=True, **options
    ).send_test_message("ann@example.com", "hello")
    err = capsys.readouterr().err
    conversation = err.lower()  # pipelined or not, the commands are shown
    assert "mail from:<noreply@example.com>" in conversation
    assert "rcpt to:<ann@example.com>" in conversation
    assert "send: 'AUTH" not in err and "s3cret-pw" not in err
    assert base64.b64encode(b"\0user\0s3cret-pw").decode() not in err

    SMTPMessenger("noreply@example.com", **options).send_test_message("bob@example.com", "x")
    assert capsys.readouterr().err == ""
    assert server.sink.recipients() == ["ann@example.com", "bob@example.com"]


def test_debug_takes_upstreams_position():
    messenger = SMTPMessenger("f@example.com", "l", "p", "h", 25, False, False, True, 5)
    assert messenger.debug is True and messenger._opt("timeout") == 5
    assert SMTPMessenger(allow_plaintext_login=True).debug is False


# Through a real worker


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_worker_delivers_django_email(smtp_server, start_worker, settings):
    smtp_sink, port = smtp_server
    start_worker(["messenger.smtp"], env={"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port)})
    settings.EMAIL_BACKEND = BACKEND
    email = EmailMultiAlternatives(
        "Invoice", "Total: 5 < 6", "billing@example.com", ["ann@example.com"], bcc=["b@example.com"]
    )
    email.attach_alternative("<p>Total: 5 &lt; 6</p>", "text/html")
    email.attach("invoice.bin", BINARY, "application/octet-stream")

    assert email.send() == 1

    smtp_sink.wait_for(2, timeout=60)
    assert sorted(smtp_sink.recipients()) == ["ann@example.com", "b@example.com"]
    for _, copy in smtp_sink.messages:
        assert copy["From"] == "billing@example.com" and copy["Bcc"] is None
        body, attachment = parts_of(copy)
        assert [text_of(p) for p in parts_of(body)] == [
            "Total: 5 < 6",
            "<p>Total: 5 &lt; 6</p>",
        ]
        assert attachment.get_payload(decode=True) == BINARY
    assert wait_until(
        lambda: set(Dispatch.objects.values_list("dispatch_status", flat=True)) == {Status.SENT},
        timeout=30,
    )
