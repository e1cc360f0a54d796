"""TelegramMessenger against a local server that follows the Bot API (``sendMessage``), then
through a real worker process. The bot token must never show in errors, rows or logs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from django.utils import timezone

from dispatcher.models import Dispatch
from messengers.exceptions import (
    InvalidAddressError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from messengers.registry import register_messenger_objects
from sitemessage.messengers.telegram import TelegramMessenger
from sitemessage.toolbox import recipients, schedule_messages
from tests.contract import MessengerContract, deliver_now, errors_of
from tests.support import free_port, wait_until

if TYPE_CHECKING:
    from tests.fake_apis import FakeTelegram


Status = Dispatch.Status
CHATS = ["421337", "-1001234567890", "@sitemessage_news"]


class TestTelegramContract(MessengerContract):
    @pytest.fixture
    def messenger(self, telegram_api: FakeTelegram) -> TelegramMessenger:
        return TelegramMessenger(**telegram_api.options())

    @pytest.fixture
    def addresses(self) -> list[str]:
        return list(CHATS)

    @pytest.fixture
    def delivered(self, telegram_api: FakeTelegram) -> Callable[[], list[str]]:
        return telegram_api.delivered

    @pytest.fixture
    def temporary_failure(self, telegram_api: FakeTelegram) -> Callable[[str], None]:
        return telegram_api.fail_temporarily

    @pytest.fixture
    def permanent_failure(self, telegram_api: FakeTelegram) -> Callable[[str], str]:
        def fail(address: str) -> str:
            telegram_api.fail_permanently(address)
            return address

        return fail


@pytest.fixture
def run(telegram_api: FakeTelegram, registries, no_publish, monkeypatch):
    """Schedules ``text`` to ``chats`` and delivers the batch in this process, as a worker
    would, with ``messenger`` (default: one configured for the server). Returns rows by chat."""
    default = TelegramMessenger(**telegram_api.options())

    def deliver(
        chats: list[str], text: str = "Hello", messenger: TelegramMessenger | None = None
    ) -> dict[str, Dispatch]:
        register_messenger_objects(messenger or default)
        return {d.address: d for d in deliver_now("telegram", chats, text)}

    yield deliver
    default.after_send()


@pytest.mark.django_db
def test_messages_arrive_with_their_text_and_message_ids(run, telegram_api):
    rows = run([*CHATS, "421337"], text="Build #7 passed")  # a duplicate address is sent once
    rows.update(run(["421337"], text="Build #8 passed"))
    assert [(m["chat_id"], m["text"], m["message_id"]) for m in telegram_api.messages] == [
        ("421337", "Build #7 passed", 1),
        ("-1001234567890", "Build #7 passed", 1),
        ("@sitemessage_news", "Build #7 passed", 1),
        ("421337", "Build #8 passed", 2),
    ]
    assert {row.dispatch_status for row in rows.values()} == {Status.SENT}
    assert rows["421337"].provider_message_id == "2"
    assert rows["@sitemessage_news"].provider_message_id == "1"


@pytest.mark.django_db
def test_429_is_retried_after_retry_after(run, telegram_api):
    telegram_api.retry_after = 900  # far beyond the first backoff (at most 30 s)
    telegram_api.fail_temporarily("421337")
    before = timezone.now()
    row = run(["421337"])["421337"]
    assert row.dispatch_status == Status.ERROR
    assert row.next_attempt_at >= before + timedelta(seconds=900)
    [error] = errors_of(row)
    assert "429 Too Many Requests: retry after 900" in error


@pytest.mark.django_db
def test_5xx_and_connection_errors_are_temporary(run, telegram_api):
    telegram_api.fail_temporarily("421337", 502)
    assert run(["421337"])["421337"].dispatch_status == Status.ERROR
    down = TelegramMessenger(
        **{**telegram_api.options(), "base_url": f"http://127.0.0.1:{free_port()}"}
    )
    row = run(["421337"], messenger=down)["421337"]
    assert row.dispatch_status == Status.ERROR
    assert "cannot reach the Telegram Bot API" in errors_of(row)[0]


@pytest.mark.django_db
def test_chat_not_found_blocked_and_unauthorized_are_permanent(run, telegram_api):
    telegram_api.fail_permanently("421337")
    telegram_api.fail_permanently("1002", blocked=True)
    rows = run(["421337", "1002", "1003"])
    assert rows["421337"].dispatch_status == Status.FAILED and rows["421337"].retry_count == 1
    assert "400 Bad Request: chat not found" in errors_of(rows["421337"])[0]
    assert rows["1002"].dispatch_status == Status.FAILED
    assert "403 Forbidden: bot was blocked by the user" in errors_of(rows["1002"])[0]
    assert rows["1003"].dispatch_status == Status.SENT

    wrong = TelegramMessenger(**{**telegram_api.options(), "auth_token": "1:WRONG"})
    row = run(["1004"], messenger=wrong)["1004"]
    assert row.dispatch_status == Status.FAILED
    assert "401 Unauthorized" in errors_of(row)[0]
    assert telegram_api.delivered() == ["1003"]


@pytest.mark.django_db
def test_the_token_never_shows_in_errors_rows_or_logs(run, telegram_api, caplog):
    caplog.set_level(logging.DEBUG)
    token = telegram_api.token
    down = TelegramMessenger(token, base_url=f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(TemporaryDeliveryError) as connection_error:
        down.send_test_message("421337", "probe")
    telegram_api.fail_permanently("421337")
    with pytest.raises(PermanentDeliveryError) as refused:
        TelegramMessenger(**telegram_api.options()).send_test_message("421337", "probe")
    rows = [*run(["421337", "1002"], messenger=down).values(), *run(["421337"]).values()]

    texts = [str(connection_error.value), str(refused.value), repr(connection_error.value)]
    assert "/bot<token>/sendMessage" in texts[0]  # the URL was there, scrubbed
    assert connection_error.value.__cause__ is None and connection_error.value.__context__ is None
    assert "chat not found" in texts[1]
    assert [row.dispatch_status for row in rows] == [Status.ERROR, Status.ERROR, Status.FAILED]
    errors = [e for row in rows for e in errors_of(row)]
    assert len(errors) == 3
    assert "sendMessage" in caplog.text  # urllib3's debug lines with the URL were captured
    secret = token.split(":", 1)[1]
    for text in [*texts, *errors, caplog.text, repr(down)]:
        assert secret not in text


@pytest.mark.django_db
def test_batches_reuse_one_connection(run, telegram_api):
    first = run([str(1000 + i) for i in range(20)])
    second = run([str(2000 + i) for i in range(20)])
    assert {row.dispatch_status for row in [*first.values(), *second.values()]} == {Status.SENT}
    assert len(telegram_api.messages) == 40
    assert telegram_api.connections == 1


def test_every_request_has_a_timeout(telegram_api):
    telegram_api.delay = 1.0
    messenger = TelegramMessenger(**{**telegram_api.options(), "timeout": 0.2})
    started = time.monotonic()
    with pytest.raises(TemporaryDeliveryError, match="ReadTimeout"):
        messenger.send_test_message("421337", "slow")
    assert time.monotonic() - started < 0.9


def test_requests_go_through_the_proxy_with_tls_verification_on(telegram_api):
    messenger = TelegramMessenger(
        telegram_api.token, proxy=telegram_api.url, base_url="http://api.telegram.invalid"
    )
    messenger.before_send()
    assert messenger._ensure_session().verify is True
    assert messenger.send_test_message("421337", "via proxy") == "1"
    assert telegram_api.proxied == 1 and telegram_api.delivered() == ["421337"]


def test_addresses_are_chat_ids_or_channel_names(registries, telegram_api):
    register_messenger_objects(TelegramMessenger(**telegram_api.options()))
    assert len(recipients("telegram", ["42", "-1001234567890", "@my_channel"])) == 3
    for bad in ["", "alice", "@ab", "12 34", "@9channel", "+123", "@chan-nel"]:
        with pytest.raises(InvalidAddressError, match="telegram"):
            recipients("telegram", [bad])


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_hundred_messages_through_a_worker_arrive_exactly_once(
    telegram_api, start_worker, registries, settings
):
    settings.SITEMESSAGE_BATCH_SIZE = 25
    register_messenger_objects(TelegramMessenger(**telegram_api.options()))
    config = {"telegram": {"options": telegram_api.options()}}
    start_worker(["messenger.telegram"], env={"SITEMESSAGE_MESSENGERS": json.dumps(config)})
    chats = [str(500_000 + i) for i in range(100)]

    started = time.monotonic()
    [(message, _)] = schedule_messages("Your order shipped", recipients("telegram", chats))
    assert telegram_api.wait_for(100, timeout=60)
    assert wait_until(
        lambda: (
            Dispatch.objects.filter(message=message, dispatch_status=Status.SENT).count() == 100
        ),
        timeout=30,
    )
    elapsed = time.monotonic() - started
    print(f"\n100 messages delivered in {elapsed:.2f}s over {telegram_api.connections} connections")

    assert sorted(telegram_api.delivered()) == sorted(chats)  # each exactly once
    assert {m["text"] for m in telegram_api.messages} == {"Your order shipped"}
    for row in Dispatch.objects.filter(message=message):
        assert row.retry_count == 1 and row.provider_message_id == "1"
    assert telegram_api.connections <= 2  # one per worker process
    assert telegram_api.errors == []
