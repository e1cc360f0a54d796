"""FacebookMessenger against a local server that follows the Graph API (``POST
/{page-id}/feed``, the token exchange and ``/me/accounts``), then through a real worker process.
Tokens and the app secret must never show in errors, rows or logs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from django.utils import timezone

from dispatcher.models import Dispatch, Message
from messengers.exceptions import (
    DeliveryError,
    InvalidAddressError,
    MessengerConfigurationError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from messengers.registry import messenger_from_settings, register_messenger_objects
from sitemessage.messengers.facebook import FacebookMessenger
from sitemessage.shortcuts import schedule_facebook_message
from sitemessage.toolbox import recipients, schedule_messages
from tests.contract import MessengerContract, deliver_now, errors_of
from tests.support import free_port, wait_until

if TYPE_CHECKING:
    from tests.fake_apis import FakeFacebook


Status = Dispatch.Status
NEWS, JOBS, BLOG = "104000000000001", "104000000000002", "104000000000003"


def page_token(api: FakeFacebook, page: str) -> str:
    return api.pages[page][1]


class TestFacebookContract(MessengerContract):
    @pytest.fixture
    def messenger(self, facebook_api: FakeFacebook) -> FacebookMessenger:
        return FacebookMessenger(**facebook_api.options())

    @pytest.fixture
    def addresses(self) -> list[str]:
        return [NEWS, JOBS, BLOG]

    @pytest.fixture
    def delivered(self, facebook_api: FakeFacebook) -> Callable[[], list[str]]:
        return facebook_api.delivered

    @pytest.fixture
    def temporary_failure(self, facebook_api: FakeFacebook) -> Callable[[str], None]:
        return facebook_api.fail_temporarily

    @pytest.fixture
    def permanent_failure(self, facebook_api: FakeFacebook) -> Callable[[str], str]:
        def fail(address: str) -> str:
            facebook_api.fail_permanently(address)
            return address

        return fail


@pytest.fixture
def run(facebook_api: FakeFacebook, registries, no_publish):
    """Schedules ``text`` to ``pages`` and delivers the batch in this process, as a worker
    would, with ``messenger`` (default: one with a token for every Page of the server)."""
    default = FacebookMessenger(**facebook_api.options())

    def deliver(
        pages: list[str], text: str = "Hello", messenger: FacebookMessenger | None = None
    ) -> dict[str, Dispatch]:
        register_messenger_objects(messenger or default)
        return {d.address: d for d in deliver_now("fb", pages, text)}

    yield deliver
    default.after_send()


@pytest.mark.django_db
def test_posts_arrive_on_their_pages_with_their_ids(run, facebook_api):
    rows = run([NEWS, JOBS], text="Release 2.0 is out\n")
    rows.update(run([NEWS], text="https://example.com/releases/2.0"))
    assert [(p["page"], p["message"], p["link"]) for p in facebook_api.posts] == [
        (NEWS, "Release 2.0 is out", ""),
        (JOBS, "Release 2.0 is out", ""),
        (NEWS, "", "https://example.com/releases/2.0"),  # a lone URL is posted as a link
    ]
    assert {row.dispatch_status for row in rows.values()} == {Status.SENT}
    assert rows[NEWS].provider_message_id == facebook_api.posts[2]["id"]
    assert rows[JOBS].provider_message_id.startswith(f"{JOBS}_")
    assert {path.split("/")[1] for path in facebook_api.paths} == {"v24.0"}


@pytest.mark.django_db
def test_one_token_posts_to_its_own_page_as_upstream_did(run, facebook_api):
    single = FacebookMessenger(page_token(facebook_api, JOBS), base_url=facebook_api.url, timeout=5)
    rows = run([""], text="First", messenger=single)
    rows.update(run([JOBS, NEWS], text="Second", messenger=single))
    assert rows[""].dispatch_status == Status.SENT and rows[JOBS].dispatch_status == Status.SENT
    assert facebook_api.paths[:2] == ["/v24.0/me/feed", f"/v24.0/{JOBS}/feed"]
    assert rows[NEWS].dispatch_status == Status.FAILED  # another Page: Facebook refuses
    assert "(#200) If posting to a page" in errors_of(rows[NEWS])[0]
    assert facebook_api.delivered() == [JOBS, JOBS]


@pytest.mark.django_db
def test_several_pages_need_an_address_and_a_token_for_it(run, facebook_api):
    rows = run(["", "104000000000077"])
    for address in ("", "104000000000077"):
        assert rows[address].dispatch_status == Status.FAILED
        assert "no page access token for Page" in errors_of(rows[address])[0]
    assert facebook_api.requests == 0  # refused before any request
    only_news = {"page_access_token": {NEWS: page_token(facebook_api, NEWS)}}
    one = FacebookMessenger(**{**facebook_api.options(), **only_news})
    assert run([""], messenger=one)[""].dispatch_status == Status.SENT
    assert facebook_api.delivered() == [NEWS]


@pytest.mark.django_db
def test_a_throttled_page_is_retried_when_facebook_says(run, facebook_api):
    facebook_api.regain_minutes = 40  # beyond the first backoff (at most 30 s)
    facebook_api.fail_temporarily(NEWS)
    before = timezone.now()
    rows = run([NEWS, JOBS])
    assert rows[NEWS].dispatch_status == Status.ERROR
    assert rows[NEWS].next_attempt_at >= before + timedelta(minutes=40)
    [error] = errors_of(rows[NEWS])
    assert "rate limit reached: (#32) Page request limit reached (code 32, HTTP 400" in error
    assert "fbtrace_id" in error
    assert rows[JOBS].dispatch_status == Status.SENT


@pytest.mark.django_db
def test_5xx_and_connection_errors_are_temporary(run, facebook_api):
    facebook_api.fail_temporarily(NEWS, 503)
    row = run([NEWS])[NEWS]
    assert row.dispatch_status == Status.ERROR
    assert "Service temporarily unavailable (code 2, HTTP 503" in errors_of(row)[0]
    down = FacebookMessenger(
        **{**facebook_api.options(), "base_url": f"http://127.0.0.1:{free_port()}"}
    )
    row = run([JOBS], messenger=down)[JOBS]
    assert row.dispatch_status == Status.ERROR
    assert "cannot reach the Graph API" in errors_of(row)[0]


@pytest.mark.django_db
def test_invalid_tokens_missing_permissions_and_duplicates_are_permanent(run, facebook_api):
    facebook_api.fail_permanently(NEWS)
    rows = run([NEWS, JOBS], text="Hello")
    assert rows[NEWS].dispatch_status == Status.FAILED and rows[NEWS].retry_count == 1
    assert "Error validating access token" in errors_of(rows[NEWS])[0]
    assert "code 190/460" in errors_of(rows[NEWS])[0]
    again = run([JOBS], text="Hello ")  # the same text once stripped
    assert again[JOBS].dispatch_status == Status.FAILED
    assert "(#506) Duplicate status message" in errors_of(again[JOBS])[0]
    assert facebook_api.delivered() == [JOBS]


@pytest.mark.django_db
def test_tokens_and_the_app_secret_never_show_in_errors_rows_or_logs(run, facebook_api, caplog):
    caplog.set_level(logging.DEBUG)
    wrong_token = "EAAWrongPageToken0123456789abcdefghij"
    wrong = FacebookMessenger(wrong_token, base_url=facebook_api.url)
    row = run([""], messenger=wrong)[""]  # the API's text repeats the token
    down = FacebookMessenger(
        **{**facebook_api.options(), "base_url": f"http://127.0.0.1:{free_port()}"}
    )
    with pytest.raises(TemporaryDeliveryError) as connection_error:  # URL with secrets in it
        down.get_page_access_token(
            facebook_api.app_id, facebook_api.app_secret, facebook_api.user_token
        )
    tokens = FacebookMessenger(**facebook_api.options()).get_page_access_token(
        facebook_api.app_id, facebook_api.app_secret, facebook_api.user_token
    )

    texts = [*errors_of(row), str(connection_error.value), repr(wrong), repr(down)]
    assert "Malformed access token <secret>" in texts[0]
    assert "client_secret=<secret>" in texts[1] and "fb_exchange_token=<secret>" in texts[1]
    assert connection_error.value.__cause__ is None and connection_error.value.__context__ is None
    assert "/oauth/access_token?" in caplog.text  # urllib3's debug lines were captured
    secrets = [wrong_token, facebook_api.app_secret, facebook_api.user_token]
    secrets += [facebook_api.long_lived_token or "unset", *tokens.values()]
    secrets += [token for _, token in facebook_api.pages.values()]
    for text in [*texts, caplog.text]:
        for secret in secrets:
            assert secret not in text


def test_get_page_access_token_returns_every_page_token_by_name(facebook_api):
    facebook_api.max_accounts_per_page = 2  # the user's Pages come in two pages of results
    messenger = FacebookMessenger("EAAUnusedPageToken0123456789", base_url=facebook_api.url)
    tokens = messenger.get_page_access_token(
        facebook_api.app_id, facebook_api.app_secret, facebook_api.user_token
    )
    assert tokens == {name: token for name, token in facebook_api.pages.values()}
    accounts = [p for p in facebook_api.paths if p.endswith("/me/accounts")]
    assert len(accounts) == 2
    poster = FacebookMessenger(tokens["Sitemessage Blog"], base_url=facebook_api.url)
    assert poster.send_test_message("", "Hello from the blog").startswith(f"{BLOG}_")
    assert facebook_api.delivered() == [BLOG]


def test_get_page_access_token_raises_what_facebook_refused(facebook_api):
    messenger = FacebookMessenger("EAAUnusedPageToken0123456789", base_url=facebook_api.url)
    with pytest.raises(DeliveryError, match=r"Error validating client secret\. \(code 1"):
        messenger.get_page_access_token(facebook_api.app_id, "wrong-secret", "x")
    with pytest.raises(PermanentDeliveryError, match="Invalid OAuth access token"):
        messenger.get_page_access_token(
            facebook_api.app_id, facebook_api.app_secret, "EAAExpiredUserToken"
        )
    with pytest.raises(PermanentDeliveryError, match="Invalid application ID"):
        messenger.get_page_access_token("42", facebook_api.app_secret, facebook_api.user_token)


@pytest.mark.django_db
def test_batches_reuse_one_connection(run, facebook_api):
    for i in range(10):
        rows = run([NEWS, JOBS, BLOG], text=f"Post {i}")
        assert {row.dispatch_status for row in rows.values()} == {Status.SENT}
    assert len(facebook_api.posts) == 30
    assert facebook_api.connections == 1


def test_every_request_has_a_timeout(facebook_api):
    facebook_api.delay = 1.0
    messenger = FacebookMessenger(**{**facebook_api.options(), "timeout": 0.2})
    started = time.monotonic()
    with pytest.raises(TemporaryDeliveryError, match="ReadTimeout"):
        messenger.send_test_message(NEWS, "slow")
    assert time.monotonic() - started < 0.9


@pytest.mark.parametrize("form", ["url", "dict", "callable"])
def test_requests_go_through_the_proxy_in_each_upstream_form(facebook_api, form):
    proxy = {
        "url": facebook_api.url,
        "dict": {"http": facebook_api.url},
        "callable": lambda: {"http": facebook_api.url},
    }[form]
    options = {**facebook_api.options(), "base_url": "http://graph.facebook.invalid"}
    messenger = FacebookMessenger(**{**options, "proxy": proxy})
    assert messenger.send_test_message(NEWS, "via proxy").startswith(f"{NEWS}_")
    assert messenger._ensure_session().verify is True
    assert facebook_api.proxied == 1 and facebook_api.delivered() == [NEWS]


def test_addresses_and_options_are_checked_before_anything_is_written(registries):
    register_messenger_objects(FacebookMessenger("EAAPageToken0123456789"))
    assert len(recipients("fb", ["", NEWS])) == 2
    for bad in ["me", "-104", "1 2", "page", "https://facebook.com/x"]:
        with pytest.raises(InvalidAddressError, match="'fb'"):
            recipients("fb", [bad])
    for tokens in ["", "  ", {}, {"news": "EAAToken0123456789"}, {NEWS: ""}, ["EAA"]]:
        with pytest.raises(MessengerConfigurationError, match="page_access_token"):
            FacebookMessenger(tokens)  # type: ignore[arg-type]
    with pytest.raises(MessengerConfigurationError, match="proxy must be"):
        FacebookMessenger("EAAPageToken0123456789", proxy=42)  # type: ignore[arg-type]


@pytest.mark.django_db
def test_the_shortcut_and_the_settings_alias(registries, no_publish, facebook_api):
    messenger = messenger_from_settings("fb", {"options": facebook_api.options()})
    assert isinstance(messenger, FacebookMessenger) and str(messenger) == "fb"
    register_messenger_objects(FacebookMessenger("EAAPageToken0123456789"))
    schedule_facebook_message("Hello, Page", priority=2)
    schedule_facebook_message("Hello, news", to=NEWS)
    assert [(d.messenger, d.address) for d in Dispatch.objects.order_by("pk")] == [
        ("fb", ""),
        ("fb", NEWS),
    ]
    assert Message.objects.order_by("pk")[0].priority == 2
    with pytest.raises(InvalidAddressError):
        schedule_facebook_message("Hello", to="not a page")
    assert Message.objects.count() == 2


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_posts_through_a_worker_arrive_exactly_once_over_warm_sessions(
    facebook_api, start_worker, registries
):
    register_messenger_objects(FacebookMessenger(**facebook_api.options()))
    config = {"fb": {"options": facebook_api.options()}}  # the builtin alias, no "class"
    start_worker(["messenger.fb"], env={"SITEMESSAGE_MESSENGERS": json.dumps(config)})

    started = time.monotonic()
    messages = [
        schedule_messages(f"Update #{i}", recipients("fb", [NEWS, JOBS, BLOG]))[0][0]
        for i in range(20)
    ]
    assert facebook_api.wait_for(60, timeout=60)
    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Status.SENT).count() == 60, timeout=30
    )
    elapsed = time.monotonic() - started
    print(f"\n60 posts delivered in {elapsed:.2f}s over {facebook_api.connections} connections")

    posted = sorted((p["page"], p["message"]) for p in facebook_api.posts)
    assert posted == sorted(
        (page, f"Update #{i}") for i in range(20) for page in [NEWS, JOBS, BLOG]
    )
    for row in Dispatch.objects.filter(message__in=messages):
        assert row.retry_count == 1 and row.provider_message_id.startswith(f"{row.address}_")
    assert facebook_api.connections <= 2  # one per worker process
    assert facebook_api.errors == []
