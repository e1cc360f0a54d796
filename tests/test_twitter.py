"""TwitterMessenger against a local server that follows the X API v2 (``POST /2/tweets``,
OAuth 1.0a signatures verified), then through a real worker process."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest
import requests

from dispatcher.models import Dispatch
from messengers.exceptions import (
    InvalidAddressError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from messengers.registry import register_messenger_objects
from messengers.twitter import retry_after
from sitemessage.messengers.twitter import TwitterMessenger
from sitemessage.toolbox import recipients, schedule_messages
from tests.contract import MessengerContract, deliver_now, errors_of
from tests.support import free_port, wait_until

if TYPE_CHECKING:
    from tests.fake_apis import FakeX


Status = Dispatch.Status
Run = Callable[..., dict[str, Dispatch]]


class TestTwitterContract(MessengerContract):
    @pytest.fixture
    def messenger(self, twitter_api: FakeX) -> TwitterMessenger:
        return TwitterMessenger(**twitter_api.options())

    @pytest.fixture
    def addresses(self) -> list[str]:
        return ["ann", "bob_2", "carol"]

    @pytest.fixture
    def delivered(self, twitter_api: FakeX) -> Callable[[], list[str]]:
        return twitter_api.delivered

    @pytest.fixture
    def temporary_failure(self, twitter_api: FakeX) -> Callable[[str], None]:
        return twitter_api.fail_temporarily

    @pytest.fixture
    def permanent_failure(self, twitter_api: FakeX) -> Callable[[str], str]:
        def fail(address: str) -> str:
            twitter_api.fail_permanently(address)
            return address

        return fail


@pytest.fixture
def run(twitter_api: FakeX, registries, no_publish, monkeypatch) -> Iterator[Run]:
    """Schedules ``text`` to ``addresses`` and delivers the batch in this process, as a worker
    would, with ``messenger`` (default: one configured for the server). Returns rows by address."""
    default = TwitterMessenger(**twitter_api.options())

    def deliver(
        addresses: list[str], text: str = "Hello", messenger: TwitterMessenger | None = None
    ) -> dict[str, Dispatch]:
        register_messenger_objects(messenger or default)
        return {d.address: d for d in deliver_now("twitter", addresses, text)}

    yield deliver
    default.after_send()


@pytest.mark.django_db
def test_an_address_makes_a_mention_and_no_address_posts_to_the_timeline(run, twitter_api):
    rows = run(["@ann", "bob", ""], text="Release 1.2 is out")
    assert {row.dispatch_status for row in rows.values()} == {Status.SENT}
    assert sorted(t["text"] for t in twitter_api.tweets) == [
        "@ann Release 1.2 is out",
        "@bob Release 1.2 is out",
        "Release 1.2 is out",
    ]


@pytest.mark.django_db
def test_the_tweet_id_is_stored_as_the_provider_id(run, twitter_api):
    rows = run(["ann", "bob"])
    ids = {t["mention"]: t["id"] for t in twitter_api.tweets}
    assert rows["ann"].provider_message_id == ids["ann"]
    assert rows["bob"].provider_message_id == ids["bob"]
    assert all(len(i) == 19 and i.isdigit() for i in ids.values())
    assert ids["ann"] != ids["bob"]


@pytest.mark.django_db
def test_a_post_over_280_characters_fails_at_once_and_is_not_truncated(run, twitter_api):
    fits = "x" * (280 - len("@ann "))
    combining = "e\u0301" * 280  # 560 code points, 280 once normalised (NFC)
    rows = run(["ann"], text=fits)
    assert rows["ann"].dispatch_status == Status.SENT
    rows = run(["", "bob"], text=combining)
    assert rows[""].dispatch_status == Status.SENT
    assert rows["bob"].dispatch_status == Status.FAILED  # 285 characters with the mention
    assert rows["bob"].retry_count == 1 and rows["bob"].next_attempt_at is None
    [error] = errors_of(rows["bob"])
    assert "285 characters" in error and "at most 280" in error and "not truncated" in error
    assert [t["mention"] for t in twitter_api.tweets] == ["ann", ""]


@pytest.mark.django_db
def test_429_is_retried_after_the_rate_limit_reset(run, twitter_api):
    twitter_api.reset_in = 600  # far beyond the first backoff (at most 30 s)
    twitter_api.fail_temporarily("ann", 429)
    row = run(["ann"])["ann"]
    assert row.dispatch_status == Status.ERROR
    assert row.next_attempt_at >= datetime.fromtimestamp(twitter_api.last_reset, UTC)
    [error] = errors_of(row)
    assert "429" in error and "Too Many Requests" in error
    assert twitter_api.delivered() == []


@pytest.mark.django_db
def test_5xx_and_connection_errors_are_temporary(run, twitter_api):
    twitter_api.fail_temporarily("ann", 503)
    assert run(["ann"])["ann"].dispatch_status == Status.ERROR
    down = TwitterMessenger(
        **{**twitter_api.options(), "base_url": f"http://127.0.0.1:{free_port()}"}
    )
    row = run(["bob"], messenger=down)["bob"]
    assert row.dispatch_status == Status.ERROR
    assert "cannot reach the X API" in errors_of(row)[0]


def test_every_request_has_a_timeout(twitter_api):
    twitter_api.delay = 1.0
    messenger = TwitterMessenger(**{**twitter_api.options(), "timeout": 0.2})
    started = time.monotonic()
    with pytest.raises(TemporaryDeliveryError, match="ReadTimeout"):
        messenger.send_test_message("ann", "slow")
    assert time.monotonic() - started < 0.9


def test_retry_after_reads_the_reset_time_or_retry_after():
    response = requests.Response()
    response.headers["Retry-After"] = "120"
    assert retry_after(response) == 120
    response.headers["Retry-After"] = "Wed, 21 Oct 2015 07:28:00 GMT"  # in the past
    assert retry_after(response) == 0
    response.headers["x-rate-limit-reset"] = str(int(time.time()) + 300)
    assert 298 < (retry_after(response) or 0) <= 300
    assert retry_after(requests.Response()) is None


@pytest.mark.django_db
def test_a_wrong_secret_fails_the_signature_check_and_the_dispatch(run, twitter_api):
    wrong = TwitterMessenger(**{**twitter_api.options(), "api_secret": "not-the-secret"})
    row = run(["ann"], messenger=wrong)["ann"]
    assert row.dispatch_status == Status.FAILED and row.retry_count == 1
    [error] = errors_of(row)
    assert "HTTP 401 Unauthorized" in error
    assert "not-the-secret" not in error
    assert twitter_api.auth_failures == ["signature mismatch"]


@pytest.mark.django_db
def test_403_is_permanent_with_the_api_detail(run, twitter_api):
    twitter_api.fail_permanently("ann")
    rows = run(["ann", "bob"], text="Same words")
    assert rows["ann"].dispatch_status == Status.FAILED
    assert "You are not permitted to perform this action." in errors_of(rows["ann"])[0]
    rows = run(["bob"], text="Same words")  # X refuses duplicate content
    assert rows["bob"].dispatch_status == Status.FAILED
    [error] = errors_of(rows["bob"])
    assert "HTTP 403 Forbidden: You are not allowed to create a Tweet with duplicate" in error
    assert twitter_api.delivered() == ["bob"]


@pytest.mark.django_db
def test_batches_reuse_one_connection(run, twitter_api):
    first = run([f"user{i}" for i in range(20)])
    second = run([f"user{i}" for i in range(20, 40)])
    assert {row.dispatch_status for row in [*first.values(), *second.values()]} == {Status.SENT}
    assert len(twitter_api.tweets) == 40
    assert twitter_api.connections == 1


@pytest.mark.django_db
def test_invalid_names_are_rejected_when_scheduling(registries, twitter_api):
    register_messenger_objects(TwitterMessenger(**twitter_api.options()))
    for bad in ["not a name", "@", "a" * 16, "ann@example.com"]:
        with pytest.raises(InvalidAddressError, match="twitter"):
            recipients("twitter", [bad])
    assert twitter_api.requests == 0


def test_send_test_message_posts_and_returns_the_id(twitter_api):
    messenger = TwitterMessenger(**twitter_api.options())
    tweet_id = messenger.send_test_message("@ann", "probe")
    assert twitter_api.tweets == [{"id": tweet_id, "text": "@ann probe", "mention": "ann"}]
    twitter_api.fail_permanently("bob")
    with pytest.raises(PermanentDeliveryError, match="403"):
        messenger.send_test_message("bob", "probe")


def test_neither_bodies_nor_secrets_are_logged(twitter_api, caplog):
    caplog.set_level(logging.DEBUG)
    messenger = TwitterMessenger(**twitter_api.options())
    messenger.send_test_message("ann", "a very private body")
    twitter_api.fail_permanently("bob")
    with pytest.raises(PermanentDeliveryError):
        messenger.send_test_message("bob", "another private body")
    assert "/2/tweets" in caplog.text  # urllib3's debug lines were captured
    secrets = [twitter_api.api_secret, twitter_api.access_token, twitter_api.access_token_secret]
    for secret in ["private body", *secrets]:
        assert secret not in caplog.text


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_hundred_posts_through_a_worker_arrive_exactly_once(
    twitter_api, start_worker, registries, settings
):
    settings.SITEMESSAGE_BATCH_SIZE = 25
    register_messenger_objects(TwitterMessenger(**twitter_api.options()))
    config = {"twitter": {"options": twitter_api.options()}}
    start_worker(["messenger.twitter"], env={"SITEMESSAGE_MESSENGERS": json.dumps(config)})
    names = [f"user{i}" for i in range(100)]

    started = time.monotonic()
    [(message, _)] = schedule_messages("Weekly digest", recipients("twitter", names))
    assert twitter_api.wait_for(100, timeout=60)
    assert wait_until(
        lambda: (
            Dispatch.objects.filter(message=message, dispatch_status=Status.SENT).count() == 100
        ),
        timeout=30,
    )
    elapsed = time.monotonic() - started
    print(f"\n100 posts delivered in {elapsed:.2f}s over {twitter_api.connections} connections")

    assert sorted(twitter_api.delivered()) == sorted(names)  # each exactly once
    ids = {t["mention"]: t["id"] for t in twitter_api.tweets}
    for row in Dispatch.objects.filter(message=message):
        assert row.retry_count == 1
        assert row.provider_message_id == ids[row.address]
    assert twitter_api.connections <= 2  # one per worker process
    assert twitter_api.auth_failures == [] and twitter_api.errors == []
