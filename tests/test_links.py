"""Unsubscribe and read links, end to end against the real test database and a real SMTP
server: rendered per recipient (also in a body shared by all), signed and bound to one purpose,
expiring, honouring SECRET_KEY_FALLBACKS, working after cleanup; the views ask before they
unsubscribe, take RFC 8058 one-click POSTs without CSRF, and change only what they must; an
opted-out recipient is not sent that type through that messenger again, even when addressed
explicitly; and the link and delivery signals fire once per event."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta
from email.message import Message as EmailMessage
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from dispatcher import links
from dispatcher.models import Dispatch, DispatchError, Message, OptOut, Subscription
from dispatcher.sweep import sweep
from sitemessage.messages.email import EmailHtmlMessage, EmailTextMessage
from sitemessage.messages.plain import PlainTextMessage
from sitemessage.signals import (
    dispatch_failed,
    dispatch_sent,
    sig_mark_read_failed,
    sig_mark_read_success,
    sig_unsubscribe_failed,
    sig_unsubscribe_success,
)
from sitemessage.toolbox import recipients, schedule_messages, send_scheduled_messages

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.links_urls")]
Status = Dispatch.Status
SITE = "https://example.test"
LINK = re.compile(r"https://example\.test(/messages/(unsubscribe|ping)/\d+/\d+/[^/\"<>\s]+/)")


@pytest.fixture
def smtp(smtp_server, settings):
    sink, port = smtp_server
    settings.EMAIL_PORT = port
    settings.SITEMESSAGE_SITE_URL = SITE
    return sink


@pytest.fixture
def received() -> Iterator[dict[str, list[Any]]]:
    """Every signal of this module sent during the test: name -> list of (sender, kwargs)."""
    signals = {
        "unsubscribe_success": sig_unsubscribe_success,
        "unsubscribe_failed": sig_unsubscribe_failed,
        "mark_read_success": sig_mark_read_success,
        "mark_read_failed": sig_mark_read_failed,
        "sent": dispatch_sent,
        "failed": dispatch_failed,
    }
    got: dict[str, list[Any]] = {name: [] for name in signals}
    receivers = {}
    for name, signal in signals.items():

        def receiver(sender: Any, name: str = name, **kwargs: Any) -> None:
            got[name].append((sender, kwargs))

        receivers[name] = receiver
        signal.connect(receiver, weak=False)
    try:
        yield got
    finally:
        for name, signal in signals.items():
            signal.disconnect(receivers[name])


def newsletter(to: list[str]) -> list[Dispatch]:
    """An HTML newsletter rendered from a dict (one body shared by its recipients)."""
    [(_, dispatches)] = schedule_messages(
        EmailHtmlMessage("News", {"contents": "<p>Hello</p>"}), recipients("smtp", to)
    )
    return dispatches


def mail_to(sink: Any, address: str) -> EmailMessage:
    [mail] = [m for rcpt, m in sink.messages if rcpt == [address]]
    return mail


def header(mail: EmailMessage, name: str) -> str | None:
    """A header's value, unfolded (a long List-Unsubscribe is folded onto a second line)."""
    value = mail[name]
    return None if value is None else re.sub(r"\r?\n[ \t]+", " ", str(value)).strip()


def body_of(mail: EmailMessage) -> str:
    part = mail.get_payload(0) if mail.is_multipart() else mail
    return part.get_payload(decode=True).decode()  # type: ignore[union-attr]


def paths(text: str) -> dict[str, str]:
    return {kind: path for path, kind in LINK.findall(text)}


def test_each_recipient_of_a_shared_body_gets_their_own_links_and_list_unsubscribe(
    smtp, no_publish
):
    newsletter(["ann@example.com", "bob@example.com"])
    assert send_scheduled_messages().sent == 2

    links_of = {}
    for address in ("ann@example.com", "bob@example.com"):
        mail = mail_to(smtp, address)
        body = paths(body_of(mail))
        assert set(body) == {"unsubscribe", "ping"}
        assert header(mail, "List-Unsubscribe") == f"<{SITE}{body['unsubscribe']}>"
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        links_of[address] = body
    assert links_of["ann@example.com"] != links_of["bob@example.com"]
    assert "sitemessageLink" not in body_of(mail_to(smtp, "ann@example.com"))  # no placeholder
    assert set(Dispatch.objects.values_list("message_cache", flat=True)) == {""}  # not stored


def test_a_type_without_subscriptions_carries_no_unsubscribe_link(smtp, no_publish, registries):
    class Receipt(EmailHtmlMessage):
        alias = "receipt"
        allow_user_subscription = False
        template = "sitemessage/messages/email_html__smtp.html"

    from dispatcher.messages import register_message_types

    register_message_types(Receipt)
    schedule_messages(
        Receipt("Your receipt", {"contents": "42 EUR"}), recipients("smtp", "a@x.org")
    )
    send_scheduled_messages()
    mail = mail_to(smtp, "a@x.org")
    assert mail["List-Unsubscribe"] is None
    assert set(paths(body_of(mail))) == {"ping"}  # the read link stays


def test_the_unsubscribe_link_asks_on_get_and_unsubscribes_on_post(
    smtp, no_publish, received, django_user_model
):
    user = django_user_model.objects.create(username="ann", email="ann@example.com")
    Subscription.create(user, "email_html", "smtp")
    Subscription.create("ann@example.com", "email_html", "smtp")
    Subscription.create(user, "email_plain", "smtp")  # another type: kept
    schedule_messages(EmailHtmlMessage("News", {"contents": "x"}), recipients("smtp", user))
    send_scheduled_messages()
    path = paths(body_of(mail_to(smtp, "ann@example.com")))["unsubscribe"]
    client = Client()

    page = client.get(path)
    assert page.status_code == 200 and b"Unsubscribe?" in page.content
    assert Subscription.objects.count() == 3 and not OptOut.objects.exists()  # GET changes nothing
    assert received["unsubscribe_success"] == []

    done = client.post(path)
    assert done.status_code == 200 and b"Unsubscribed" in done.content
    assert list(Subscription.objects.values_list("message_cls", flat=True)) == ["email_plain"]
    assert OptOut.objects.get().recipient_id == user.pk
    [(sender, kwargs)] = received["unsubscribe_success"]
    assert sender is EmailHtmlMessage and kwargs["dispatch"].address == "ann@example.com"


def test_one_click_unsubscribe_needs_no_csrf_token(smtp, no_publish):
    newsletter(["ann@example.com"])
    send_scheduled_messages()
    url = str(header(mail_to(smtp, "ann@example.com"), "List-Unsubscribe")).strip("<>")
    response = Client(enforce_csrf_checks=True).post(
        url.removeprefix(SITE),
        "List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 200 and response.content == b"Unsubscribed.\n"
    assert OptOut.objects.filter(address_digest=links.address_digest("ann@example.com")).exists()


def test_an_opted_out_recipient_is_not_sent_that_type_even_when_addressed_explicitly(
    smtp, no_publish, received
):
    newsletter(["ann@example.com"])
    send_scheduled_messages()
    Client().post(paths(body_of(mail_to(smtp, "ann@example.com")))["unsubscribe"])
    smtp.messages.clear()
    received["failed"].clear()

    again = newsletter(["ANN@example.com", "bob@example.com"])  # the digest ignores case
    schedule_messages(
        EmailTextMessage("Plain", "other type"), recipients("smtp", "ann@example.com")
    )
    send_scheduled_messages()

    assert sorted(rcpt[0] for rcpt, _ in smtp.messages) == ["ann@example.com", "bob@example.com"]
    assert mail_to(smtp, "ann@example.com")["Subject"] == "Plain"  # the other type still goes
    ann = Dispatch.objects.get(pk=again[0].pk)
    assert ann.dispatch_status == Status.FAILED
    [error] = DispatchError.objects.filter(dispatch=ann)
    assert error.error_log.startswith("unsubscribed:") and "ann@" not in error.error_log
    assert [kwargs["dispatch"].pk for _, kwargs in received["failed"]] == [ann.pk]


def test_a_read_link_marks_only_the_read_status_and_cannot_unsubscribe(smtp, no_publish, received):
    [dispatch] = newsletter(["ann@example.com"])
    send_scheduled_messages()
    before = Dispatch.objects.values().get(pk=dispatch.pk)
    ping = paths(body_of(mail_to(smtp, "ann@example.com")))["ping"]
    token = ping.rstrip("/").rsplit("/", 1)[1]

    forged = f"/messages/unsubscribe/{dispatch.message_id}/{dispatch.pk}/{token}/"
    assert Client().post(forged).status_code == 400  # a read token cannot unsubscribe
    assert not OptOut.objects.exists() and len(received["unsubscribe_failed"]) == 1

    pixel = Client().get(ping)
    assert pixel.status_code == 200 and pixel["Content-Type"] == "image/gif"
    after = dict(Dispatch.objects.values().get(pk=dispatch.pk))
    assert after.pop("read_status") == Dispatch.READ_STATUS_READ
    assert after == {k: v for k, v in before.items() if k != "read_status"}  # all else kept
    assert len(received["mark_read_success"]) == 1


def test_a_tampered_or_expired_link_changes_nothing(
    smtp, no_publish, received, settings, monkeypatch
):
    [dispatch] = newsletter(["ann@example.com"])
    send_scheduled_messages()
    path = paths(body_of(mail_to(smtp, "ann@example.com")))["unsubscribe"]
    other = path.replace(f"/{dispatch.pk}/", f"/{dispatch.pk + 1}/")
    assert Client().post(other).status_code == 400  # the ids must be the token's
    assert Client().post(path[:-3] + "x/").status_code == 400  # a broken signature

    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)  # signing reads time.time()
    old = links.make_token("unsubscribe", dispatch, "email_html")
    monkeypatch.setattr(time, "time", real_time)
    settings.SITEMESSAGE_LINK_MAX_AGE = 60
    expired = f"/messages/unsubscribe/{dispatch.message_id}/{dispatch.pk}/{old}/"
    page = Client().get(expired)
    assert page.status_code == 400 and b"not valid or has expired" in page.content
    settings.SITEMESSAGE_LINK_MAX_AGE = 7200
    assert Client().get(expired).status_code == 200  # the same token within its age
    assert not OptOut.objects.exists()
    assert len(received["unsubscribe_failed"]) == 3


def test_links_survive_a_key_rotation_with_fallbacks_and_the_cleanup_of_their_rows(
    smtp, no_publish, settings, django_user_model
):
    user = django_user_model.objects.create(username="ann", email="ann@example.com")
    Subscription.create("ann@example.com", "email_html", "smtp")
    newsletter([user.email])
    send_scheduled_messages()
    path = paths(body_of(mail_to(smtp, "ann@example.com")))["unsubscribe"]

    old_key = settings.SECRET_KEY
    settings.SECRET_KEY = "a-new-key-" + "x" * 40
    assert Client().get(path).status_code == 400  # the old key is not trusted any more
    settings.SECRET_KEY_FALLBACKS = [old_key]
    assert Client().get(path).status_code == 200

    Message.objects.all().delete()  # cleaned up: the dispatch row is gone
    assert Client().post(path).status_code == 200
    assert not Subscription.objects.exists()  # the address's subscription, found by digest
    assert OptOut.objects.get().address_digest == links.address_digest("ann@example.com")


def test_subscribing_again_lifts_the_opt_out(smtp, no_publish):
    newsletter(["ann@example.com"])
    send_scheduled_messages()
    Client().post(paths(body_of(mail_to(smtp, "ann@example.com")))["unsubscribe"])
    Subscription.create("ann@example.com", "email_html", "smtp")
    assert not OptOut.objects.exists()
    smtp.messages.clear()
    newsletter(["ann@example.com"])
    assert send_scheduled_messages().sent == 1


def test_no_links_without_a_site_url_or_without_the_views(smtp, no_publish, settings):
    settings.SITEMESSAGE_SITE_URL = None
    newsletter(["a@x.org"])
    send_scheduled_messages()
    mail = mail_to(smtp, "a@x.org")
    assert paths(body_of(mail)) == {} and mail["List-Unsubscribe"] is None
    assert "/messages/" not in body_of(mail)
    assert "unsubscribe" not in body_of(mail) and "<img" not in body_of(mail)  # no empty link


@pytest.mark.urls("tests.no_links_urls")
def test_without_the_views_attached_a_message_has_no_links(smtp, no_publish):
    [dispatch] = newsletter(["a@x.org"])
    assert EmailHtmlMessage.get_unsubscribe_directive(dispatch.message, dispatch) == ""
    send_scheduled_messages()
    assert mail_to(smtp, "a@x.org")["List-Unsubscribe"] is None


def test_delivery_signals_fire_once_per_final_outcome(smtp, no_publish, received, settings):
    settings.SITEMESSAGE_RETRY_BACKOFF = 0
    smtp.reject["gone@x.org"] = "550 no such user"
    smtp.reject["later@x.org"] = "451 try later"
    schedule_messages("hi", recipients("smtp", ["ok@x.org", "gone@x.org", "later@x.org"]))
    send_scheduled_messages()
    sent = [kwargs["dispatch"].address for _, kwargs in received["sent"]]
    failed = [kwargs["dispatch"].address for _, kwargs in received["failed"]]
    assert sent == ["ok@x.org"] and failed == ["gone@x.org"]  # the 4xx one will be retried
    assert all(sender is PlainTextMessage for sender, _ in received["sent"] + received["failed"])


def test_a_receiver_that_raises_changes_no_outcome(smtp, no_publish, caplog):
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    dispatch_sent.connect(broken, weak=False)
    try:
        [(_, [dispatch])] = schedule_messages("hi", recipients("smtp", "ok@x.org"))
        assert send_scheduled_messages().sent == 1
    finally:
        dispatch_sent.disconnect(broken)
    assert Dispatch.objects.get(pk=dispatch.pk).dispatch_status == Status.SENT
    assert "receiver bug" in caplog.text


def test_get_dispatch_hash_makes_a_working_unsubscribe_token(smtp, no_publish):
    [dispatch] = newsletter(["a@x.org"])
    token = EmailHtmlMessage.get_dispatch_hash(dispatch.pk, dispatch.message_id)
    path = f"/messages/unsubscribe/{dispatch.message_id}/{dispatch.pk}/{token}/"
    assert Client().post(path).status_code == 200
    assert OptOut.objects.count() == 1
    read = EmailHtmlMessage.get_dispatch_hash(dispatch.pk, dispatch.message_id, "mark_read")
    assert (
        Client().get(f"/messages/ping/{dispatch.message_id}/{dispatch.pk}/{read}/").status_code
        == 200
    )
    assert Dispatch.objects.get(pk=dispatch.pk).is_read()


def test_pipeline_sets_no_unsubscribe_url_for_http_links(smtp, no_publish, settings):
    settings.SITEMESSAGE_SITE_URL = "http://example.test"
    newsletter(["a@x.org"])
    send_scheduled_messages()
    mail = mail_to(smtp, "a@x.org")
    assert mail["List-Unsubscribe"] is None  # RFC 8058 wants https
    assert "http://example.test/messages/unsubscribe/" in body_of(mail)  # the page link stays


@pytest.mark.browser
def test_in_a_browser_the_link_of_a_delivered_email_unsubscribes_after_confirming(
    browser_page, live_server, smtp, no_publish, settings, django_user_model
):
    settings.SITEMESSAGE_SITE_URL = live_server.url  # the links point at the live server
    user = django_user_model.objects.create(username="ann", email="ann@example.com")
    Subscription.create(user, "email_html", "smtp")
    schedule_messages(
        EmailHtmlMessage("News", {"contents": "<p>Hello</p>"}), recipients("smtp", user)
    )
    assert send_scheduled_messages().sent == 1
    html = body_of(mail_to(smtp, "ann@example.com"))
    url = re.search(r'href="([^"]+/messages/unsubscribe/[^"]+)"', html)
    assert url is not None

    page = browser_page.goto(url[1].removeprefix(live_server.url))
    assert page.get_by_role("heading").inner_text() == "Unsubscribe?"
    browser_page.screenshot("confirm")
    assert Subscription.objects.filter(recipient=user).exists()  # opening the link changed nothing
    page.get_by_role("button", name="Unsubscribe").click()
    page.locator("#sitemessage-unsubscribed").wait_for()
    assert page.get_by_role("heading").inner_text() == "Unsubscribed"
    assert browser_page.screenshot("done").stat().st_size > 1000
    assert not Subscription.objects.filter(recipient=user).exists()
    assert OptOut.objects.get().recipient_id == user.pk


def test_the_sweep_signals_the_dispatches_it_fails(no_publish, received, settings):
    settings.SITEMESSAGE_RETRY_BACKOFF = 0
    [(_, [expired, stuck])] = schedule_messages("hi", recipients("smtp", ["a@x.org", "b@x.org"]))
    past = timezone.now() - timedelta(seconds=1)
    Dispatch.objects.filter(pk=expired.pk).update(expires_at=past)
    Dispatch.objects.filter(pk=stuck.pk).update(
        dispatch_status=Status.PROCESSING, lease_expires_at=past, retry_count=10
    )
    sweep()
    failed = sorted(kwargs["dispatch"].pk for _, kwargs in received["failed"])
    assert failed == sorted([expired.pk, stuck.pk])
    assert set(Dispatch.objects.values_list("dispatch_status", flat=True)) == {Status.FAILED}
