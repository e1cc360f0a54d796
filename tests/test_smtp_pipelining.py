"""SMTP PIPELINING (RFC 2920): MAIL, RCPT and DATA go as one group when the server offers it,
and every reply of the group decides the outcome as smtplib's sendmail() would. Each test runs
against a server that offers PIPELINING and one that does not."""

from __future__ import annotations

import smtplib

import pytest

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
