"""The messenger contract for SMTP and for a user-defined messenger written as the docs show,
and what is special to SMTP: connection reuse, reconnects, reply codes."""

from __future__ import annotations

import smtplib

import pytest
from aiosmtpd.smtp import AuthResult

from dispatcher.models import Dispatch
from messengers import smtp as smtp_module
from messengers.base import alias_of
from messengers.exceptions import PermanentDeliveryError, TemporaryDeliveryError
from messengers.registry import register_messenger_objects
from sitemessage.messengers.smtp import SMTPMessenger
from sitemessage.utils import MessengerBase
from tests.contract import MessengerContract, deliver_now, errors_of
from tests.support import SMTPSink, resolve_to_loopback

Status = Dispatch.Status


class CountingSink(SMTPSink):
    """Also counts NOOPs (the liveness checks of a reused connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.noops = 0

    async def handle_NOOP(self, server, session, envelope, arg):
        self.noops += 1
        return "250 OK"


@pytest.fixture
def smtp(settings, smtp_servers):
    """A restartable SMTP server on a fixed loopback port, and a messenger pointed at it."""
    server = smtp_servers(CountingSink())
    settings.DEFAULT_FROM_EMAIL = "noreply@example.com"

    def restart(up: bool = True) -> None:
        server.stop()
        if up:
            server.start()

    messenger = SMTPMessenger(host="127.0.0.1", port=server.port, use_tls=False, timeout=5)
    try:
        yield server.sink, messenger, restart
    finally:
        messenger.after_send()


class TestSMTPContract(MessengerContract):
    @pytest.fixture
    def messenger(self, smtp):
        return smtp[1]

    @pytest.fixture
    def addresses(self):
        return ["ann@example.com", "bob@example.com", "cid@example.com"]

    @pytest.fixture
    def delivered(self, smtp):
        return smtp[0].recipients

    @pytest.fixture
    def temporary_failure(self, smtp):
        def fail(address: str) -> None:
            smtp[0].reject[address] = "451 4.3.0 try again later"

        return fail

    @pytest.fixture
    def permanent_failure(self, smtp):
        def fail(address: str) -> str:
            smtp[0].reject[address] = "550 5.1.1 no such user"
            return address

        return fail


class Outbox:
    """The 'service' of the user-defined messenger below: addresses it accepted, and addresses
    it refuses for now or for good."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.busy: set[str] = set()
        self.refused: set[str] = set()


class MyMessenger(MessengerBase):
    """The documentation's user-defined messenger, with a real body for send()."""

    alias = "mymessenger"

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.connected = False

    def before_send(self) -> None:
        self.connected = True

    def after_send(self) -> None:
        self.connected = False

    def send(self, message_cls, message_model, dispatch_models):
        for dispatch_model in dispatch_models:
            address = dispatch_model.address
            if not self.connected:
                self.mark_error(dispatch_model, "not connected", message_cls)
            elif address in self.outbox.refused:
                self.mark_failed(dispatch_model, f"{address} refused", message_cls)
            elif address in self.outbox.busy:
                self.mark_error(dispatch_model, f"{address} busy", message_cls)
            else:
                self.outbox.accepted.append(address)
                self.mark_sent(dispatch_model)


class TestUserDefinedContract(MessengerContract):
    @pytest.fixture
    def outbox(self):
        return Outbox()

    @pytest.fixture
    def messenger(self, outbox):
        return MyMessenger(outbox)

    @pytest.fixture
    def addresses(self):
        return ["first--address", "second--address", "third--address"]

    @pytest.fixture
    def delivered(self, outbox):
        return lambda: list(outbox.accepted)

    @pytest.fixture
    def temporary_failure(self, outbox):
        return outbox.busy.add

    @pytest.fixture
    def permanent_failure(self, outbox):
        def fail(address: str) -> str:
            outbox.refused.add(address)
            return address

        return fail


def test_connection_is_reused_and_checked_with_noop_only_after_an_idle_while(smtp, monkeypatch):
    sink, messenger, _ = smtp
    messenger.before_send()
    for i in range(3):
        messenger._test_message(f"user{i}@example.com", "hello")
    assert sink.sessions == 1
    assert sink.noops == 0  # the server answered a moment ago: no round trip to ask again
    monkeypatch.setattr(smtp_module, "FRESH_SECONDS", 0.0)  # idle for longer than that
    for i in range(3, 5):
        messenger._test_message(f"user{i}@example.com", "hello")
    assert sink.noops == 2 and sink.sessions == 1  # checked alive before each reuse
    assert sorted(sink.recipients()) == [f"user{i}@example.com" for i in range(5)]


def test_a_connection_reused_on_trust_that_died_is_replaced_for_the_same_email(smtp):
    sink, messenger, restart = smtp
    messenger.before_send()
    messenger._test_message("a@example.com", "one")
    restart()  # the server restarted a moment after it answered
    messenger._test_message("b@example.com", "two")  # no NOOP, a dead socket: sent anyway
    assert sink.recipients() == ["a@example.com", "b@example.com"] and sink.sessions == 2


def test_reconnects_after_the_server_dropped_an_idle_connection(smtp, monkeypatch):
    sink, messenger, restart = smtp
    monkeypatch.setattr(smtp_module, "FRESH_SECONDS", 0.0)  # every reuse asks NOOP first
    messenger.before_send()
    messenger._test_message("a@example.com", "one")
    restart()  # the open connection dies with the old server
    messenger._test_message("b@example.com", "two")
    assert sink.recipients() == ["a@example.com", "b@example.com"]
    assert sink.sessions == 2


def test_server_down_is_temporary_and_names_the_server(smtp):
    _, messenger, restart = smtp
    restart(up=False)
    with pytest.raises(TemporaryDeliveryError, match=r"127\.0\.0\.1"):
        messenger.send_test_message("a@example.com", "hello")


def test_reply_codes_decide_temporary_or_permanent(smtp):
    sink, messenger, _ = smtp
    sink.reject["gone@example.com"] = "550 5.1.1 no such user"
    sink.reject["later@example.com"] = "451 4.3.0 try again later"
    messenger.before_send()
    with pytest.raises(PermanentDeliveryError, match="550"):
        messenger._test_message("gone@example.com", "x")
    with pytest.raises(TemporaryDeliveryError, match="451"):
        messenger._test_message("later@example.com", "x")
    messenger._test_message("fine@example.com", "x")  # the connection survived both
    assert sink.recipients() == ["fine@example.com"] and sink.sessions == 1


def test_a_refusal_names_the_messenger_under_its_own_alias(smtp):
    sink, messenger, _ = smtp
    messenger.alias = "newsletter"  # a second SMTP messenger configured in settings
    sink.reject["gone@example.com"] = "550 5.1.1 no such user"
    messenger.before_send()
    with pytest.raises(PermanentDeliveryError, match="newsletter") as refused:
        messenger._test_message("gone@example.com", "x")
    assert refused.value.alias == "newsletter"


def deliver_through(messenger, addresses: list[str]) -> dict[str, Dispatch]:
    register_messenger_objects(messenger)
    return {d.address: d for d in deliver_now(alias_of(messenger), addresses)}


@pytest.mark.django_db
def test_an_internationalised_domain_is_delivered_and_harms_no_other_dispatch(
    smtp, registries, no_publish
):
    sink, messenger, _ = smtp
    rows = deliver_through(messenger, ["user@exämple.com", "a@example.com", "b@example.com"])
    assert {(row.dispatch_status, row.retry_count) for row in rows.values()} == {(Status.SENT, 1)}
    assert sorted(sink.recipients()) == [
        "a@example.com",
        "b@example.com",
        "user@xn--exmple-cua.com",
    ]
    [idn] = [email for rcpts, email in sink.messages if rcpts == ["user@xn--exmple-cua.com"]]
    assert idn["To"] == "user@xn--exmple-cua.com"


@pytest.mark.django_db
def test_a_failure_inside_a_transaction_resets_the_session_for_the_next_dispatch(
    smtp, registries, no_publish, monkeypatch
):
    # smtplib raising between MAIL FROM and DATA, with no SMTP reply to blame: the next
    # dispatch on the same connection must not see "503 nested MAIL command". sendmail()'s
    # path: the pipelined one has nothing left to fail between its envelope and the content.
    sink, messenger, _ = smtp
    sink.pipelining = False
    real_rcpt = smtplib.SMTP.rcpt

    def rcpt(self, recip, options=()):
        if recip.startswith("broken@"):
            raise ValueError("cannot send this recipient")
        return real_rcpt(self, recip, options)

    monkeypatch.setattr(smtplib.SMTP, "rcpt", rcpt)
    rows = deliver_through(messenger, ["broken@example.com", "a@example.com", "b@example.com"])
    assert rows["broken@example.com"].dispatch_status == Status.ERROR
    assert "SMTP transaction failed" in errors_of(rows["broken@example.com"])[0]
    assert (rows["a@example.com"].dispatch_status, rows["a@example.com"].retry_count) == (
        Status.SENT,
        1,
    )
    assert (rows["b@example.com"].dispatch_status, rows["b@example.com"].retry_count) == (
        Status.SENT,
        1,
    )
    assert sorted(sink.recipients()) == ["a@example.com", "b@example.com"]
    assert sink.sessions == 1  # reset, not reconnected


@pytest.fixture
def auth_server(smtp_servers, monkeypatch):
    """A server without TLS that takes AUTH, reachable as smtp.plain.test (a name that is not
    a loopback address as far as the messenger can tell)."""
    logins: list[bytes] = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append(auth_data.login)
        return AuthResult(success=True)

    server = smtp_servers(authenticator=authenticator, auth_require_tls=False)
    resolve_to_loopback(monkeypatch, "smtp.plain.test")
    return server, logins


def test_a_login_is_never_sent_in_clear_to_a_remote_server(auth_server):
    server, logins = auth_server
    options = {"login": "user", "password": "secret", "port": server.port, "use_tls": False}
    messenger = SMTPMessenger(host="smtp.plain.test", **options)
    with pytest.raises(
        TemporaryDeliveryError, match=r"refusing to send the login of 'user' in clear"
    ):
        messenger.send_test_message("a@example.com", "x")
    assert logins == [] and server.sink.messages == []

    SMTPMessenger(host="smtp.plain.test", allow_plaintext_login=True, **options).send_test_message(
        "a@example.com", "opted in"
    )
    SMTPMessenger(host="127.0.0.1", **options).send_test_message("b@example.com", "loopback")
    assert logins == [b"user", b"user"]
    assert server.sink.recipients() == ["a@example.com", "b@example.com"]
