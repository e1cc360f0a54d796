"""XMPPSleekMessenger against a real prosody on loopback, received by real XMPP clients."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispatcher.messages import PlainTextMessage
from dispatcher.models import Dispatch, DispatchError
from dispatcher.sweep import sweep
from messengers import xmpp
from messengers.exceptions import (
    InvalidAddressError,
    MessengerConfigurationError,
    TemporaryDeliveryError,
)
from messengers.registry import register_messenger_objects
from sitemessage.messengers.xmpp import XMPPSleekMessenger
from sitemessage.toolbox import recipients, schedule_messages
from tests import contract
from tests.contract import MessengerContract
from tests.support import free_port, wait_until
from tests.xmpp_server import ACCOUNTS, DOMAIN, PASSWORD, SENDER, Prosody, Recipient
from tests.xmpp_server import prosody as prosody
from tests.xmpp_server import prosody_no_smacks as prosody_no_smacks
from tests.xmpp_server import prosody_tls as prosody_tls

Status = Dispatch.Status
ADDRESSES = [f"rcpt{i}@{DOMAIN}" for i in range(3)]


def texts_of(client: Recipient) -> list[str]:
    """The bodies a recipient got, without the newline that ends the plain template."""
    return [body.removesuffix("\n") for body in client.received()]


def make_messenger(server: Prosody, password: str = PASSWORD, **options: Any) -> XMPPSleekMessenger:
    return XMPPSleekMessenger(
        SENDER, password, host="127.0.0.1", port=server.port, use_tls=False, **options
    )


def logged_in(server: Prosody, addresses: list[str] = ADDRESSES) -> Iterator[dict[str, Recipient]]:
    """The recipients, logged in and present on ``server``."""
    clients: dict[str, Recipient] = {}
    try:
        for address in addresses:
            user = address.split("@")[0]
            clients[address] = Recipient(address, ACCOUNTS[user], server.port).connect()
        yield clients
    finally:
        for client in clients.values():
            client.close()


@pytest.fixture
def online(prosody: Prosody) -> Iterator[dict[str, Recipient]]:
    yield from logged_in(prosody)


@pytest.fixture
def online_no_smacks(prosody_no_smacks: Prosody) -> Iterator[dict[str, Recipient]]:
    yield from logged_in(prosody_no_smacks)


@pytest.fixture
def messenger(prosody: Prosody) -> Iterator[XMPPSleekMessenger]:
    messenger = make_messenger(prosody)
    try:
        yield messenger
    finally:
        messenger.after_send()


def deliver_now(messenger: XMPPSleekMessenger, texts: list[str], addresses: list[str]):
    """Schedules and delivers in this process as a worker would; returns the rows."""
    register_messenger_objects(messenger)
    return contract.deliver_now("xmppsleek", addresses, *texts)


class TestXMPPContract(MessengerContract):
    # ``messenger`` is the module's fixture: not warmed, pointed at this test's prosody.

    @pytest.fixture
    def addresses(self) -> list[str]:
        return list(ADDRESSES)

    @pytest.fixture
    def delivered(self, online: dict[str, Recipient]) -> Callable[[], list[str]]:
        def read() -> list[str]:
            result = []
            for address, client in online.items():
                client.sync()
                result += [address] * len(client.received())
            return result

        return read

    @pytest.fixture
    def temporary_failure(self, prosody: Prosody) -> Callable[[str], None]:
        return lambda address: prosody.stop()

    @pytest.fixture
    def permanent_failure(self) -> Callable[[str], str]:
        # An account the server does not have: it bounces with service-unavailable (cancel).
        return lambda address: f"nobody@{DOMAIN}"


@pytest.fixture
def in_process(registries: None, no_publish: list) -> None:
    pass


@pytest.mark.django_db
@pytest.mark.usefixtures("in_process")
class TestDelivery:
    def test_each_recipient_gets_each_body_exactly_once(self, messenger, online):
        texts = ["Hello <b>&amp; 'you'</b>", "Zweite Nachricht: grüß dich ✓\nline two"]
        rows = deliver_now(messenger, texts, ADDRESSES)

        assert {row.dispatch_status for row in rows} == {Status.SENT}
        for address, client in online.items():
            client.sync()
            assert texts_of(client) == texts, address
        assert {row.provider_message_id for row in rows} == {
            f"sitemessage.{row.message_id}.{row.pk}" for row in rows
        }

    def test_a_dropped_session_is_replaced_on_the_next_batch(self, messenger, online, prosody):
        assert deliver_now(messenger, ["before"], ADDRESSES[:1])[0].dispatch_status == Status.SENT
        prosody.restart()
        assert wait_until(lambda: online[ADDRESSES[0]].online.is_set(), timeout=10)

        assert deliver_now(messenger, ["after"], ADDRESSES[:1])[0].dispatch_status == Status.SENT
        online[ADDRESSES[0]].sync()
        assert texts_of(online[ADDRESSES[0]]) == ["before", "after"]

    def test_unacknowledged_messages_are_not_marked_sent(
        self, messenger, online, prosody, monkeypatch
    ):
        monkeypatch.setattr(xmpp, "TIMEOUT", 1.0)
        messenger.before_send()
        assert prosody.proc is not None
        os.kill(prosody.proc.pid, signal.SIGSTOP)  # alive, but it answers nothing
        try:
            rows = deliver_now(messenger, ["into the void"], ADDRESSES[:2])
        finally:
            os.kill(prosody.proc.pid, signal.SIGCONT)
        assert {row.dispatch_status for row in rows} == {Status.ERROR}
        errors = DispatchError.objects.filter(dispatch__in=rows)
        assert all("did not acknowledge" in e.error_log for e in errors), [
            e.error_log for e in errors
        ]

        rows = deliver_now(messenger, ["later"], ADDRESSES[:1])  # logs in again
        assert rows[0].dispatch_status == Status.SENT

    def test_a_body_xml_cannot_carry_fails_and_the_session_survives(self, messenger, online):
        [bad] = deliver_now(messenger, ["bell \x07 rings"], ADDRESSES[:1])
        assert bad.dispatch_status == Status.FAILED
        assert "XML cannot carry" in DispatchError.objects.get(dispatch=bad).error_log
        [good] = deliver_now(messenger, ["fine"], ADDRESSES[:1])
        assert good.dispatch_status == Status.SENT

    def test_wrong_password_is_a_clear_error_and_nothing_is_sent(self, prosody, online):
        messenger = make_messenger(prosody, password="not-the-password")
        try:
            with pytest.raises(TemporaryDeliveryError) as info:
                messenger.before_send()
            rows = deliver_now(messenger, ["secret plans"], ADDRESSES[:2])
        finally:
            messenger.after_send()
        message = str(info.value)
        assert SENDER in message and "not-authorized" in message
        assert "not-the-password" not in message
        assert {row.dispatch_status for row in rows} == {Status.ERROR}
        for error in DispatchError.objects.filter(dispatch__in=rows):
            assert SENDER in error.error_log and "not-the-password" not in error.error_log
        assert all(not client.received() for client in online.values())

    def test_server_down_is_a_temporary_error(self, prosody):
        messenger = make_messenger(prosody)
        prosody.stop()
        started = time.monotonic()
        try:
            [row] = deliver_now(messenger, ["anyone?"], ADDRESSES[:1])
        finally:
            messenger.after_send()
        assert time.monotonic() - started < 3  # refused at once, no login timeout
        assert row.dispatch_status == Status.ERROR and row.next_attempt_at is not None
        assert "cannot connect" in DispatchError.objects.get(dispatch=row).error_log

    def test_tls_is_required_by_default(self, prosody):
        # This server offers no STARTTLS: the default messenger must not log in in the clear.
        messenger = XMPPSleekMessenger(SENDER, PASSWORD, host="127.0.0.1", port=prosody.port)
        try:
            with pytest.raises(TemporaryDeliveryError, match="no login mechanism"):
                messenger.before_send()
        finally:
            messenger.after_send()

    def test_starttls_verifies_the_certificate(self, prosody_tls, monkeypatch):
        messenger = XMPPSleekMessenger(SENDER, PASSWORD, host="127.0.0.1", port=prosody_tls.port)
        try:
            with pytest.raises(TemporaryDeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
                messenger.before_send()
        finally:
            messenger.after_send()

        monkeypatch.setenv("SSL_CERT_FILE", str(prosody_tls.certificate))  # trust it
        messenger = XMPPSleekMessenger(SENDER, PASSWORD, host="127.0.0.1", port=prosody_tls.port)
        try:  # this server requires encryption: an acknowledged message went over TLS
            assert messenger.send_test_message(f"rcpt0@{DOMAIN}", "over TLS")
        finally:
            messenger.after_send()

    def test_send_test_message(self, messenger, online):
        stanza_id = messenger.send_test_message(ADDRESSES[2], "probe")
        assert stanza_id
        online[ADDRESSES[2]].sync()
        assert online[ADDRESSES[2]].received() == ["probe"]  # as it is: no template


@pytest.fixture
def unconfirmed(prosody_no_smacks: Prosody) -> Iterator[XMPPSleekMessenger]:
    """A messenger that may deliver without acknowledgement, pointed at a server without
    stream management."""
    messenger = make_messenger(prosody_no_smacks, require_stream_management=False)
    try:
        yield messenger
    finally:
        messenger.after_send()


def unconfirmed_notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "without acknowledgement" in r.getMessage()]


@pytest.mark.django_db
@pytest.mark.usefixtures("in_process")
class TestWithoutStreamManagement:
    """A server without XEP-0198: refused by default; require_stream_management=False delivers
    to it and records the dispatches as sent but not confirmed."""

    def test_is_refused_by_default_with_a_clear_error(self, prosody_no_smacks, online_no_smacks):
        messenger = make_messenger(prosody_no_smacks)
        try:
            with pytest.raises(TemporaryDeliveryError) as info:
                messenger.before_send()
            [row] = deliver_now(messenger, ["not without acknowledgement"], ADDRESSES[:1])
        finally:
            messenger.after_send()
        message = str(info.value)
        assert "did not enable stream management (XEP-0198)" in message
        assert "require_stream_management=False" in message  # says how to opt in
        assert row.dispatch_status == Status.ERROR
        assert "stream management" in DispatchError.objects.get(dispatch=row).error_log
        for client in online_no_smacks.values():
            client.sync()
            assert client.received() == []

    def test_on_request_messages_arrive_and_are_recorded_unconfirmed(
        self, unconfirmed, online_no_smacks, caplog
    ):
        caplog.set_level(logging.WARNING, logger="messengers.xmpp")
        rows = deliver_now(unconfirmed, ["first"], ADDRESSES)
        rows += deliver_now(unconfirmed, ["second", "third ✓"], ADDRESSES)

        assert {row.dispatch_status for row in rows} == {Status.SENT}
        assert [row.provider_message_id for row in rows] == [
            f"{xmpp.UNCONFIRMED}sitemessage.{row.message_id}.{row.pk}" for row in rows
        ]
        assert xmpp.UNCONFIRMED == "unconfirmed:"  # documented in README
        for address, client in online_no_smacks.items():
            client.sync()
            assert texts_of(client) == ["first", "second", "third ✓"], address
        [note] = unconfirmed_notes(caplog)  # once per session, not per batch
        assert "require_stream_management=False" in note
        assert PASSWORD not in note and SENDER not in note
        assert not any(address in note for address in ADDRESSES)

    def test_a_bounce_before_the_ping_answer_fails_its_dispatch_only(
        self, unconfirmed, online_no_smacks
    ):
        nobody = f"nobody@{DOMAIN}"
        rows = deliver_now(unconfirmed, ["hi"], [ADDRESSES[0], nobody, ADDRESSES[1]])
        statuses = {row.address: row.dispatch_status for row in rows}
        assert statuses == {
            ADDRESSES[0]: Status.SENT,
            nobody: Status.FAILED,
            ADDRESSES[1]: Status.SENT,
        }
        [bounced] = [row for row in rows if row.address == nobody]
        assert "service-unavailable" in DispatchError.objects.get(dispatch=bounced).error_log
        assert bounced.provider_message_id == ""

    def test_a_server_that_does_not_answer_gets_nothing_marked_sent(
        self, unconfirmed, online_no_smacks, prosody_no_smacks, monkeypatch
    ):
        monkeypatch.setattr(xmpp, "TIMEOUT", 1.0)
        unconfirmed.before_send()
        assert prosody_no_smacks.proc is not None
        os.kill(prosody_no_smacks.proc.pid, signal.SIGSTOP)  # alive, but it answers nothing
        try:
            rows = deliver_now(unconfirmed, ["into the void"], ADDRESSES[:2])
        finally:
            os.kill(prosody_no_smacks.proc.pid, signal.SIGCONT)
        assert {row.dispatch_status for row in rows} == {Status.ERROR}
        errors = DispatchError.objects.filter(dispatch__in=rows)
        assert all("did not answer the ping" in e.error_log for e in errors), [
            e.error_log for e in errors
        ]

        [row] = deliver_now(unconfirmed, ["later"], ADDRESSES[:1])  # logs in again
        assert row.dispatch_status == Status.SENT

    def test_send_test_message_says_unconfirmed(self, unconfirmed, online_no_smacks):
        provider_id = unconfirmed.send_test_message(ADDRESSES[2], "probe")
        assert provider_id.startswith(xmpp.UNCONFIRMED)
        online_no_smacks[ADDRESSES[2]].sync()
        assert online_no_smacks[ADDRESSES[2]].received() == ["probe"]

    def test_a_server_with_stream_management_is_still_acknowledged(self, prosody, online, caplog):
        caplog.set_level(logging.WARNING, logger="messengers.xmpp")
        messenger = make_messenger(prosody, require_stream_management=False)
        try:
            rows = deliver_now(messenger, ["acknowledged"], ADDRESSES)
        finally:
            messenger.after_send()
        assert {row.dispatch_status for row in rows} == {Status.SENT}
        assert not any(row.provider_message_id.startswith(xmpp.UNCONFIRMED) for row in rows)
        assert unconfirmed_notes(caplog) == []


@pytest.mark.parametrize("value", ["false", 0, None])
def test_require_stream_management_takes_only_a_bool(value):
    with pytest.raises(MessengerConfigurationError) as info:
        XMPPSleekMessenger(SENDER, PASSWORD, require_stream_management=value)
    assert f"require_stream_management must be True or False, got {value!r}" in str(info.value)
    assert "xmppsleek" in str(info.value)


@pytest.mark.parametrize(
    "address", ["not a jid", DOMAIN, "a@b@c", "@nodomain", f"rcpt0@{DOMAIN}\n"]
)
def test_an_invalid_jid_is_refused_when_scheduling(address, registries):
    register_messenger_objects(XMPPSleekMessenger(SENDER, PASSWORD, port=free_port()))
    with pytest.raises(InvalidAddressError, match="xmppsleek"):
        recipients("xmppsleek", [address])


# Through a real worker process --------------------------------------------------------------

N_MESSAGES = 100  # each to len(ADDRESSES_E2E) recipients: 500 dispatches
ADDRESSES_E2E = [f"rcpt{i}@{DOMAIN}" for i in range(5)]


@pytest.fixture
def five_online(prosody: Prosody) -> Iterator[list[Recipient]]:
    for clients in logged_in(prosody, ADDRESSES_E2E):
        yield list(clients.values())


@pytest.fixture
def five_online_no_smacks(prosody_no_smacks: Prosody) -> Iterator[list[Recipient]]:
    for clients in logged_in(prosody_no_smacks, ADDRESSES_E2E):
        yield list(clients.values())


def worker_env(server: Prosody, password: str = PASSWORD, **extra: Any) -> dict[str, str]:
    options = {
        "from_jid": SENDER,
        "password": password,
        "host": "127.0.0.1",
        "port": server.port,
        "use_tls": False,
        **extra,
    }
    return {
        "SITEMESSAGE_MESSENGERS": json.dumps({"xmppsleek": {"options": options}}),
        "SITEMESSAGE_RETRY_BACKOFF": "0.2",
        "SITEMESSAGE_RETRY_BACKOFF_MAX": "1",
    }


def schedule_500(server: Prosody) -> list[str]:
    register_messenger_objects(make_messenger(server))
    texts = [f"message {i:03d}" for i in range(N_MESSAGES)]
    schedule_messages([PlainTextMessage(t) for t in texts], recipients("xmppsleek", ADDRESSES_E2E))
    return texts


def sent() -> int:
    return Dispatch.objects.filter(dispatch_status=Status.SENT).count()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_500_messages_through_a_worker_arrive_exactly_once(
    prosody, five_online, start_worker, registries
):
    start_worker(["messenger.xmppsleek"], env=worker_env(prosody))
    started = time.monotonic()
    texts = schedule_500(prosody)

    assert wait_until(lambda: sent() == 500, timeout=60), Counter(
        Dispatch.objects.values_list("dispatch_status", flat=True)
    )
    for client in five_online:
        assert client.wait_for(N_MESSAGES, timeout=10)
    elapsed = time.monotonic() - started
    print(
        f"\n500 XMPP messages delivered through a worker in {elapsed:.2f}s ({500 / elapsed:.0f}/s)"
    )
    for client in five_online:
        client.sync()
        assert sorted(texts_of(client)) == texts, client.jid  # each exactly once
    assert set(Dispatch.objects.values_list("retry_count", flat=True)) == {1}


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_500_messages_survive_a_server_restart(
    prosody, five_online, start_worker, registries, settings
):
    settings.SITEMESSAGE_BATCH_SIZE = 20  # many batches: the restart lands in the middle
    worker = start_worker(["messenger.xmppsleek"], env=worker_env(prosody))
    texts = schedule_500(prosody)
    assert wait_until(lambda: sent() >= 100, timeout=30)
    prosody.restart()
    at_restart = sent()

    deadline = time.monotonic() + 90
    while sent() < 500 and time.monotonic() < deadline:
        sweep()  # what beat would do: publish the retries that are due
        time.sleep(0.5)
    statuses = Counter(Dispatch.objects.values_list("dispatch_status", flat=True))
    assert statuses == {Status.SENT: 500}, (statuses, worker.text()[-3000:])
    retried = DispatchError.objects.count()
    print(f"\nrestart after {at_restart} sent; {retried} attempts failed and were retried")

    for client in five_online:
        assert client.wait_for(N_MESSAGES, timeout=20), client.jid
        client.sync()
        got = Counter(texts_of(client))
        assert set(got) == set(texts), client.jid  # every dispatch is SENT, and received
        dupes = sum(count - 1 for count in got.values())
        print(f"{client.jid}: {sum(got.values())} received, {dupes} duplicates")


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_wrong_password_through_a_worker(prosody, five_online, start_worker, registries):
    worker = start_worker(
        ["messenger.xmppsleek"], concurrency=1, env=worker_env(prosody, "wrong-secret")
    )
    register_messenger_objects(make_messenger(prosody))
    schedule_messages("hello", recipients("xmppsleek", ADDRESSES_E2E[:3]))

    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Status.ERROR).count() == 3, timeout=30
    )
    assert sent() == 0
    for error in DispatchError.objects.all():
        assert f"refused the login of {SENDER!r}" in error.error_log
        assert "wrong-secret" not in error.error_log
    assert "wrong-secret" not in worker.text()
    assert all(not client.received() for client in five_online)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_500_messages_without_stream_management_through_a_worker(
    prosody_no_smacks, five_online_no_smacks, start_worker, registries
):
    # The option as SITEMESSAGE_MESSENGERS carries it: JSON false.
    env = worker_env(prosody_no_smacks, require_stream_management=False)
    worker = start_worker(["messenger.xmppsleek"], env=env)
    started = time.monotonic()
    texts = schedule_500(prosody_no_smacks)

    assert wait_until(lambda: sent() == 500, timeout=60), Counter(
        Dispatch.objects.values_list("dispatch_status", flat=True)
    )
    for client in five_online_no_smacks:
        assert client.wait_for(N_MESSAGES, timeout=10)
    elapsed = time.monotonic() - started
    print(f"\n500 unacknowledged XMPP messages through a worker in {elapsed:.2f}s")
    for client in five_online_no_smacks:
        client.sync()
        assert sorted(texts_of(client)) == texts, client.jid  # each exactly once
    ids = Dispatch.objects.values_list("provider_message_id", flat=True)
    assert all(i.startswith(xmpp.UNCONFIRMED) for i in ids)
    assert "delivers without acknowledgement" in worker.text()
    assert PASSWORD not in worker.text()
