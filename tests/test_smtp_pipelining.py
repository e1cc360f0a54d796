"""SMTP PIPELINING (RFC 2920): MAIL, RCPT and DATA go as one group when the server offers it,
and every reply of the group decides the outcome as smtplib's sendmail() would. Each test runs
against a server that offers PIPELINING and one that does not."""

from __future__ import annotations

import smtplib

import pytest

from dispatcher.messages import PlainTextMessage
from dispatcher.models import Dispatch, Message
from messengers import smtp as smtp_module
from messengers.exceptions import PermanentDeliveryError, TemporaryDeliveryError
from sitemessage.messengers.smtp import SMTPMessenger
from tests.support import SMTPSink


class Sink(SMTPSink):
    """Also refuses senders (``refuse_senders``), the end of DATA (``refuse_content``), and can
    open DATA although it refused the recipient (``loose``: a broken server RFC 2920 warns of)."""

    def __init__(self, pipelining: bool) -> None:
        super().__init__()
        self.pipelining = pipelining
        self.refuse_senders: dict[str, str] = {}
        self.refuse_content = ""
        #: Replies to the end of DATA by recipient.
        self.refuse_content_for: dict[str, str] = {}
        self.loose = False
        self.empty_data = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address in self.refuse_senders:
            return self.refuse_senders[address]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = await super().handle_RCPT(server, session, envelope, address, rcpt_options)
        if self.loose and not reply.startswith("250"):
            envelope.rcpt_tos.append(address)  # refused, yet DATA will be opened for it
        return reply

    async def handle_DATA(self, server, session, envelope):
        if not envelope.content.strip():
            self.empty_data += 1
            return "554 5.5.1 no valid recipients"
        if self.refuse_content:
            return self.refuse_content
        if envelope.rcpt_tos[0] in self.refuse_content_for:
            return self.refuse_content_for[envelope.rcpt_tos[0]]
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture(params=[True, False], ids=["pipelining", "no-pipelining"])
def smtp(request, settings, smtp_servers, monkeypatch):
    """A server (offering PIPELINING or not), a messenger on it, and what the messenger wrote
    to the socket, one entry per send()."""
    server = smtp_servers(Sink(pipelining=request.param))
    settings.DEFAULT_FROM_EMAIL = "noreply@example.com"
    writes: list[bytes] = []
    real_send = smtplib.SMTP.send

    def send(conn: smtplib.SMTP, data: bytes | str) -> None:
        writes.append(data if isinstance(data, bytes) else data.encode())
        real_send(conn, data)

    monkeypatch.setattr(smtplib.SMTP, "send", send)
    messenger = SMTPMessenger(host="127.0.0.1", port=server.port, use_tls=False, timeout=5)
    messenger.before_send()
    try:
        yield server.sink, messenger, writes
    finally:
        messenger.after_send()


def test_the_envelope_goes_as_one_group_only_to_a_server_that_offers_pipelining(smtp):
    sink, messenger, writes = smtp
    writes.clear()
    messenger._test_message("a@example.com", "hello")
    envelope = [w for w in writes if w.upper().startswith(b"MAIL FROM:")]
    assert len(envelope) == 1
    if sink.pipelining:
        assert envelope[0].endswith(b"\r\nRCPT TO:<a@example.com>\r\nDATA\r\n")
        assert b" SIZE=" in envelope[0]  # the server offers SIZE: declared, as smtplib does
    else:
        assert envelope[0].count(b"\r\n") == 1  # one command per round trip
    assert sink.recipients() == ["a@example.com"]


def test_the_content_arrives_unchanged_with_dots_at_line_starts(smtp):
    sink, messenger, _ = smtp
    text = ".hidden\n..two dots\n.\nlast line without newline"
    messenger._test_message("a@example.com", text)
    [(_, email)] = sink.messages
    assert email.get_payload().replace("\r\n", "\n").rstrip("\n") == text


def test_refused_recipients_decide_the_error_and_the_session_goes_on(smtp):
    sink, messenger, _ = smtp
    sink.reject["gone@example.com"] = "550 5.1.1 no such user"
    sink.reject["later@example.com"] = "452 4.2.2 mailbox full"
    with pytest.raises(PermanentDeliveryError, match=r"550 5\.1\.1 no such user"):
        messenger._test_message("gone@example.com", "x")
    with pytest.raises(TemporaryDeliveryError, match="452"):
        messenger._test_message("later@example.com", "x")
    messenger._test_message("fine@example.com", "x")
    assert sink.recipients() == ["fine@example.com"] and sink.sessions == 1


def test_a_refused_sender_is_an_error_of_its_email_only(smtp, settings):
    sink, messenger, _ = smtp
    sink.refuse_senders["noreply@example.com"] = "553 5.7.1 sender not allowed"
    with pytest.raises(PermanentDeliveryError, match="553"):
        messenger._test_message("a@example.com", "x")
    sink.refuse_senders.clear()
    messenger._test_message("b@example.com", "x")
    assert sink.recipients() == ["b@example.com"] and sink.sessions == 1


def test_content_refused_at_the_end_of_data(smtp):
    sink, messenger, _ = smtp
    sink.refuse_content = "554 5.7.1 looks like spam"
    with pytest.raises(PermanentDeliveryError, match="looks like spam"):
        messenger._test_message("a@example.com", "x")
    sink.refuse_content = "451 4.7.1 greylisted"
    with pytest.raises(TemporaryDeliveryError, match="greylisted"):
        messenger._test_message("a@example.com", "x")
    sink.refuse_content = ""
    messenger._test_message("a@example.com", "x")
    assert sink.recipients() == ["a@example.com"] and sink.sessions == 1


def test_a_server_that_opens_data_for_a_refused_recipient_gets_no_content(smtp):
    sink, messenger, _ = smtp
    sink.loose = True
    sink.reject["gone@example.com"] = "550 5.1.1 no such user"
    with pytest.raises(PermanentDeliveryError, match="550"):
        messenger._test_message("gone@example.com", "secret body")
    # Only the pipelined client reaches DATA (sendmail() stops at the refusal); it ends the
    # DATA the server opened with nothing in it, and the refusal stays the recipient's.
    assert sink.empty_data == (1 if sink.pipelining else 0)
    assert sink.messages == []
    messenger._test_message("fine@example.com", "x")
    assert sink.recipients() == ["fine@example.com"] and sink.sessions == 1


def test_a_421_closes_the_connection_and_the_next_email_opens_a_new_one(smtp):
    sink, messenger, _ = smtp
    sink.reject["busy@example.com"] = "421 4.3.2 shutting down"
    with pytest.raises(TemporaryDeliveryError, match="421"):
        messenger._test_message("busy@example.com", "x")
    assert messenger.smtp is None  # closed on our side, whatever the server does next
    messenger._test_message("fine@example.com", "x")
    assert sink.recipients() == ["fine@example.com"] and sink.sessions == 2


@pytest.mark.parametrize(
    "address",
    [
        "a@example.com",
        "o'brien+tag@sub.example.co.uk",
        "a.b-c_d{e}|~@ex-ample.com",
        "user@xn--exmple-cua.com",
        "Name <a@example.com>",
        "a b@example.com",
        '"quoted"@example.com',
        "a@b.c\r\nRCPT TO:<x@y>",
        "<>",
    ],
)
def test_envelope_addresses_are_quoted_as_smtplib_quotes_them(address):
    assert smtp_module._angle(address) == smtplib.quoteaddr(address)


# A batch: the content of one e-mail goes with the next one's MAIL, RCPT and DATA.


def send_batch(messenger: SMTPMessenger, addresses: list[str]) -> dict[str, object]:
    """Sends one message to ``addresses`` through send(), as a worker does; returns each
    address's outcome: "sent", or the error it was marked with."""
    message = Message(pk=7, cls="plain", context={"subject": "Batch"})
    dispatches = []
    for pk, address in enumerate(addresses, 1):
        dispatch = Dispatch(pk=pk, message=message, messenger="smtp", address=address)
        dispatch.message_cache = f"body of {address}"
        dispatches.append(dispatch)
    messenger.send(PlainTextMessage, message, dispatches)
    return {
        d.address: "sent" if d.outcome.status == "sent" else d.outcome.error for d in dispatches
    }


def bodies(sink: Sink) -> list[tuple[str, str]]:
    return [(rcpts[0], str(message.get_payload()).strip()) for rcpts, message in sink.messages]


def test_a_batch_costs_one_write_per_email_and_arrives_whole_and_in_order(smtp):
    sink, messenger, writes = smtp
    to = [f"u{i}@example.com" for i in range(5)]
    writes.clear()
    assert set(send_batch(messenger, to).values()) == {"sent"}
    assert bodies(sink) == [(address, f"body of {address}") for address in to]
    if sink.pipelining:
        writes = [w for w in writes if not w.lower().startswith(b"ehlo")]
        assert len(writes) == len(to) + 1  # the first group, content + next group, the last
        assert all(w.startswith(b"MAIL FROM:") for w in writes[:1])
        assert all(b"\r\n.\r\nMAIL FROM:" in w for w in writes[1:-1])
        assert writes[-1].endswith(b"\r\n.\r\n") and b"MAIL FROM:" not in writes[-1]


def test_a_refused_recipient_in_a_batch_fails_alone(smtp):
    sink, messenger, _ = smtp
    sink.reject["b@example.com"] = "550 5.1.1 no such user"
    outcomes = send_batch(messenger, ["a@example.com", "b@example.com", "c@example.com"])
    assert isinstance(outcomes.pop("b@example.com"), PermanentDeliveryError)
    assert outcomes == {"a@example.com": "sent", "c@example.com": "sent"}
    assert [rcpt for rcpt, _ in bodies(sink)] == ["a@example.com", "c@example.com"]


def test_a_server_that_opens_data_for_a_refused_recipient_in_a_batch_gets_no_content(smtp):
    sink, messenger, _ = smtp
    sink.reject["b@example.com"] = "550 5.1.1 no such user"
    sink.loose = True
    outcomes = send_batch(messenger, ["a@example.com", "b@example.com", "c@example.com"])
    assert isinstance(outcomes["b@example.com"], PermanentDeliveryError)
    assert [rcpt for rcpt, _ in bodies(sink)] == ["a@example.com", "c@example.com"]
    assert sink.empty_data == (1 if sink.pipelining else 0)


@pytest.mark.parametrize(
    ("reply", "error", "sessions"),
    [
        ("554 5.7.1 spam", PermanentDeliveryError, 1),
        ("451 4.3.0 later", TemporaryDeliveryError, 1),
        ("421 4.3.2 shutting down", TemporaryDeliveryError, 2),
    ],
)
def test_a_content_refused_in_a_batch_fails_that_email_only(smtp, reply, error, sessions):
    """The refusal ends that transaction; the next e-mail's group, sent with the content,
    goes on (no RSET after it, which would cancel that group). After a 421 the next e-mail,
    whose content had not gone, is sent at once on a new connection."""
    sink, messenger, _ = smtp
    sink.refuse_content_for["b@example.com"] = reply
    outcomes = send_batch(messenger, ["a@example.com", "b@example.com", "c@example.com"])
    assert isinstance(outcomes.pop("b@example.com"), error)
    assert outcomes == {"a@example.com": "sent", "c@example.com": "sent"}
    assert [rcpt for rcpt, _ in bodies(sink)] == ["a@example.com", "c@example.com"]
    assert sink.sessions == sessions


def test_a_connection_lost_with_a_content_in_a_batch_retries_only_what_did_not_go(
    smtp, monkeypatch
):
    """The write that carries b's content dies: b's outcome is unknown (a temporary error,
    retried later: the one duplicate a receiver may see), c's content never went, so c goes at
    once on a new connection."""
    sink, messenger, _ = smtp
    real_send = smtplib.SMTP.send
    failed: list[bytes] = []

    def send(conn: smtplib.SMTP, data: bytes | str) -> None:
        raw = data if isinstance(data, bytes) else data.encode()
        if b"body of b@" in raw and not failed:
            failed.append(raw)
            conn.close()
            raise smtplib.SMTPServerDisconnected("connection reset")
        real_send(conn, data)

    monkeypatch.setattr(smtplib.SMTP, "send", send)
    outcomes = send_batch(messenger, ["a@example.com", "b@example.com", "c@example.com"])
    assert isinstance(outcomes.pop("b@example.com"), TemporaryDeliveryError)
    assert outcomes == {"a@example.com": "sent", "c@example.com": "sent"}
    assert [rcpt for rcpt, _ in bodies(sink)] == ["a@example.com", "c@example.com"]
    assert sink.sessions == 2


def test_an_error_out_of_a_batch_leaves_no_open_data_behind(smtp, monkeypatch):
    """An exception no outcome covers (a bug, a type's own build_email() raising) leaves the
    held e-mail unmarked for the pipeline and drops the connection its DATA is open on."""
    sink, messenger, _ = smtp
    real = SMTPMessenger._pipelines
    calls = []

    def pipelines(self: SMTPMessenger) -> bool:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(self)

    monkeypatch.setattr(SMTPMessenger, "_pipelines", pipelines)
    with pytest.raises(RuntimeError, match="boom"):
        send_batch(messenger, ["a@example.com", "b@example.com"])
    if sink.pipelining:
        assert messenger.smtp is None and sink.messages == []
    monkeypatch.setattr(SMTPMessenger, "_pipelines", real)
    assert send_batch(messenger, ["c@example.com"]) == {"c@example.com": "sent"}
