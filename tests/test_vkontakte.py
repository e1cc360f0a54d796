"""VKontakteMessenger against a local server that follows the VK API (``wall.post``, errors
with HTTP 200) and oauth.vk.com's implicit flow, then through a real worker process. The access
token must never show in errors, rows or logs."""

from __future__ import annotations

import json
import logging
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.utils import timezone

from dispatcher import pipeline
from dispatcher.models import Dispatch, Message
from messengers.exceptions import (
    InvalidAddressError,
    MessengerConfigurationError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from messengers.registry import messenger_from_settings, register_messenger_objects
from sitemessage.messengers.vkontakte import VKontakteMessenger
from sitemessage.shortcuts import schedule_vkontakte_message
from sitemessage.toolbox import recipients, schedule_messages
from tests.contract import MessengerContract, deliver_now, errors_of
from tests.support import free_port, run_python, wait_until

if TYPE_CHECKING:
    from tests.fake_apis import FakeVK


Status = Dispatch.Status
NEWS, JOBS, ME = "-212000001", "-212000002", "714000001"


class TestVKontakteContract(MessengerContract):
    @pytest.fixture
    def messenger(self, vk_api: FakeVK) -> VKontakteMessenger:
        return VKontakteMessenger(**vk_api.options())

    @pytest.fixture
    def addresses(self) -> list[str]:
        return [NEWS, JOBS, ME]

    @pytest.fixture
    def delivered(self, vk_api: FakeVK) -> Callable[[], list[str]]:
        return vk_api.delivered

    @pytest.fixture
    def temporary_failure(self, vk_api: FakeVK) -> Callable[[str], None]:
        return vk_api.fail_temporarily

    @pytest.fixture
    def permanent_failure(self, vk_api: FakeVK) -> Callable[[str], str]:
        def fail(address: str) -> str:
            vk_api.fail_permanently(address)
            return address

        return fail


@pytest.fixture
def run(vk_api: FakeVK, registries, no_publish):
    """Schedules ``text`` to ``walls`` and delivers the batch in this process, as a worker
    would, with ``messenger`` (default: one configured for the server). Returns rows by wall."""
    default = VKontakteMessenger(**vk_api.options())

    def deliver(
        walls: list[str], text: str = "Hello", messenger: VKontakteMessenger | None = None
    ) -> dict[str, Dispatch]:
        register_messenger_objects(messenger or default)
        return {d.address: d for d in deliver_now("vk", walls, text)}

    yield deliver
    default.after_send()


@pytest.mark.django_db
def test_posts_arrive_on_their_walls_with_their_ids(run, vk_api):
    rows = run([NEWS, ME, ""], text="Release 2.0 is out\n")
    rows.update(run([NEWS], text="https://example.com/releases/2.0"))
    posts = [(p["owner_id"], p["message"], p["attachments"], p["post_id"]) for p in vk_api.posts]
    assert posts == [
        (-212000001, "Release 2.0 is out", "", 1),
        (714000001, "Release 2.0 is out", "", 1),
        (714000001, "Release 2.0 is out", "", 2),  # '': the token owner's own wall
        (-212000001, "", "https://example.com/releases/2.0", 2),  # a lone URL: an attachment
    ]
    assert {(p["from_group"], p["v"]) for p in vk_api.posts} == {("1", "5.199")}
    assert {row.dispatch_status for row in rows.values()} == {Status.SENT}
    assert rows[NEWS].provider_message_id == "-212000001_2"
    assert rows[ME].provider_message_id == "714000001_1"
    assert rows[""].provider_message_id == "2"


@pytest.mark.django_db
@pytest.mark.parametrize("code", [6, 9, 29, 10, 502])
def test_rate_limits_internal_and_http_errors_are_temporary(run, vk_api, code):
    vk_api.fail_temporarily(NEWS, code)
    rows = run([NEWS, JOBS])
    assert rows[NEWS].dispatch_status == Status.ERROR and rows[NEWS].next_attempt_at
    [error] = errors_of(rows[NEWS])
    expected = f"HTTP {code}" if code >= 500 else f"[{code}] {vk_api.messages[code]}"
    assert expected in error
    assert rows[JOBS].dispatch_status == Status.SENT


def test_too_many_requests_per_second_asks_for_a_second(vk_api):
    vk_api.fail_temporarily(NEWS, 6)
    with pytest.raises(TemporaryDeliveryError, match="rate limit") as info:
        VKontakteMessenger(**vk_api.options()).send_test_message(NEWS, "Hello")
    assert info.value.retry_after == 1.0


@pytest.mark.django_db
def test_connection_errors_are_temporary(run, vk_api):
    down = VKontakteMessenger(**{**vk_api.options(), "base_url": f"http://127.0.0.1:{free_port()}"})
    row = run([NEWS], messenger=down)[NEWS]
    assert row.dispatch_status == Status.ERROR
    assert "cannot reach the VK API" in errors_of(row)[0]


@pytest.mark.django_db
def test_auth_errors_and_closed_walls_are_permanent(run, vk_api):
    vk_api.fail_permanently(NEWS)
    rows = run([NEWS, "-999", JOBS])
    for wall in (NEWS, "-999"):  # "-999": a community the user does not administer
        assert rows[wall].dispatch_status == Status.FAILED and rows[wall].retry_count == 1
        assert "[214] Access to adding post denied" in errors_of(rows[wall])[0]
    assert rows[JOBS].dispatch_status == Status.SENT

    wrong = VKontakteMessenger(**{**vk_api.options(), "access_token": "vk1.a.Revoked"})
    row = run([ME], messenger=wrong)[ME]
    assert row.dispatch_status == Status.FAILED
    assert "[5] User authorization failed: invalid access_token (4)." in errors_of(row)[0]
    assert vk_api.delivered() == [JOBS]


@pytest.mark.django_db
def test_a_retry_after_a_lost_answer_does_not_post_twice(run, vk_api):
    vk_api.delay = 1.0  # the post is made, the answer comes after the client gave up
    slow = VKontakteMessenger(**{**vk_api.options(), "timeout": 0.3})
    row = run([NEWS], messenger=slow)[NEWS]
    assert row.dispatch_status == Status.ERROR and "ReadTimeout" in errors_of(row)[0]
    assert wait_until(lambda: len(vk_api.posts) == 1, timeout=5)

    vk_api.delay = 0
    Dispatch.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    pipeline.deliver("vk", [row.pk], owner="test")
    row.refresh_from_db()
    assert row.dispatch_status == Status.SENT and row.retry_count == 2
    assert len(vk_api.posts) == 1  # the same guid: VK keeps the first post
    assert row.provider_message_id == f"{NEWS}_{vk_api.posts[0]['post_id']}"


@pytest.mark.django_db
def test_the_token_never_shows_in_errors_rows_or_logs(run, vk_api, caplog):
    caplog.set_level(logging.DEBUG)
    token = vk_api.token
    down = VKontakteMessenger(token, base_url=f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(TemporaryDeliveryError) as connection_error:
        down.send_test_message(NEWS, "probe")
    vk_api.fail_permanently(NEWS)
    with pytest.raises(PermanentDeliveryError) as refused:
        VKontakteMessenger(**vk_api.options()).send_test_message(NEWS, "probe")
    rows = [*run([NEWS, JOBS], messenger=down).values(), *run([NEWS]).values()]

    texts = [str(connection_error.value), str(refused.value), repr(down)]
    assert connection_error.value.__cause__ is None and connection_error.value.__context__ is None
    assert "[214]" in texts[1] and "request_params" not in texts[1]
    assert [row.dispatch_status for row in rows] == [Status.ERROR, Status.ERROR, Status.FAILED]
    errors = [e for row in rows for e in errors_of(row)]
    assert len(errors) == 3
    assert "wall.post" in caplog.text  # urllib3's debug lines were captured
    for text in [*texts, *errors, caplog.text]:
        assert token not in text


@pytest.mark.django_db
def test_batches_reuse_one_connection(run, vk_api):
    for i in range(10):
        rows = run([NEWS, JOBS, ME], text=f"Post {i}")
        assert {row.dispatch_status for row in rows.values()} == {Status.SENT}
    assert len(vk_api.posts) == 30
    assert vk_api.connections == 1


def test_every_request_has_a_timeout(vk_api):
    vk_api.delay = 1.0
    messenger = VKontakteMessenger(**{**vk_api.options(), "timeout": 0.2})
    started = time.monotonic()
    with pytest.raises(TemporaryDeliveryError, match="ReadTimeout"):
        messenger.send_test_message(NEWS, "slow")
    assert time.monotonic() - started < 0.9


@pytest.mark.parametrize("form", ["url", "dict", "callable"])
def test_requests_go_through_the_proxy_in_each_upstream_form(vk_api, form):
    proxy = {
        "url": vk_api.url,
        "dict": {"http": vk_api.url},
        "callable": lambda: {"http": vk_api.url},
    }[form]
    options = {**vk_api.options(), "base_url": "http://api.vk.invalid"}
    messenger = VKontakteMessenger(**{**options, "proxy": proxy})
    assert messenger.send_test_message(NEWS, "via proxy") == f"{NEWS}_1"
    assert messenger._ensure_session().verify is True
    assert vk_api.proxied == 1 and vk_api.delivered() == [NEWS]


def test_get_access_token_opens_the_grant_page_that_gives_a_working_token(vk_api, tmp_path):
    # A real browser command, found by webbrowser through $BROWSER: it records the URL.
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {opened}\n')
    browser.chmod(browser.stat().st_mode | stat.S_IEXEC)
    code = (
        "from messengers.vkontakte import VKontakteMessenger as M; "
        f"print(M.get_access_token(app_id={vk_api.app_id!r}, oauth_url={vk_api.url!r}))"
    )
    result = run_python("-c", code, env={"BROWSER": f"{browser} %s"})
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert wait_until(opened.exists, timeout=5) and opened.read_text() == url
    query = parse_qs(urlsplit(url).query)
    assert query["scope"] == ["wall,offline"] and query["client_id"] == [vk_api.app_id]

    answer = requests.get(url, allow_redirects=False, timeout=5)  # the user allows the app
    assert answer.status_code == 302
    landing = urlsplit(answer.headers["Location"])
    assert f"{landing.scheme}://{landing.netloc}{landing.path}" == "https://oauth.vk.com/blank.html"
    granted = parse_qs(landing.fragment)
    assert granted["expires_in"] == ["0"]  # offline: it does not expire
    messenger = VKontakteMessenger(granted["access_token"][0], base_url=vk_api.url)
    assert messenger.send_test_message(JOBS, "Hello with the new token") == f"{JOBS}_1"
    assert VKontakteMessenger.get_access_token(app_id="1", open_browser=False).startswith(
        "https://oauth.vk.com/authorize?client_id=1&"
    )


def test_addresses_and_options_are_checked_before_anything_is_written(registries):
    register_messenger_objects(VKontakteMessenger("vk1.a.Token"))
    assert len(recipients("vk", ["", NEWS, ME])) == 3
    for bad in ["-", "0", "-0", "id714000001", "club212000001", "1 2", "1.5", "+5"]:
        with pytest.raises(InvalidAddressError, match="'vk'"):
            recipients("vk", [bad])
    for token in ["", " "]:
        with pytest.raises(MessengerConfigurationError, match="access_token is empty"):
            VKontakteMessenger(token)
    with pytest.raises(MessengerConfigurationError, match="proxy must be"):
        VKontakteMessenger("vk1.a.Token", proxy=42)  # type: ignore[arg-type]


@pytest.mark.django_db
def test_the_shortcut_the_user_attribute_and_the_settings_alias(registries, no_publish, vk_api):
    messenger = messenger_from_settings("vk", {"options": vk_api.options()})
    assert isinstance(messenger, VKontakteMessenger) and str(messenger) == "vk"
    register_messenger_objects(VKontakteMessenger("vk1.a.Token"))
    user = type("User", (), {"vkontakte": ME})()
    schedule_vkontakte_message("Hello, walls", [NEWS, user], priority=3)
    assert [(d.messenger, d.address) for d in Dispatch.objects.order_by("pk")] == [
        ("vk", NEWS),
        ("vk", ME),
    ]
    assert Message.objects.get().priority == 3
    with pytest.raises(InvalidAddressError):
        schedule_vkontakte_message("Hello", "durov")
    assert Message.objects.count() == 1


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_posts_through_a_worker_arrive_exactly_once_over_warm_sessions(
    vk_api, start_worker, registries
):
    register_messenger_objects(VKontakteMessenger(**vk_api.options()))
    config = {"vk": {"options": vk_api.options()}}  # the builtin alias, no "class"
    start_worker(["messenger.vk"], env={"SITEMESSAGE_MESSENGERS": json.dumps(config)})

    started = time.monotonic()
    messages = [
        schedule_messages(f"Update #{i}", recipients("vk", [NEWS, JOBS, ME]))[0][0]
        for i in range(20)
    ]
    assert vk_api.wait_for(60, timeout=60)
    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Status.SENT).count() == 60, timeout=30
    )
    elapsed = time.monotonic() - started
    print(f"\n60 posts delivered in {elapsed:.2f}s over {vk_api.connections} connections")

    posted = sorted((str(p["owner_id"]), p["message"]) for p in vk_api.posts)
    assert posted == sorted((wall, f"Update #{i}") for i in range(20) for wall in [NEWS, JOBS, ME])
    for row in Dispatch.objects.filter(message__in=messages):
        assert row.retry_count == 1 and row.provider_message_id.startswith(f"{row.address}_")
    assert vk_api.connections <= 2  # one per worker process
    assert vk_api.errors == []
