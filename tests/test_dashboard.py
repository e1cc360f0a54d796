"""The delivery dashboard: its figures (counts per messenger and status, the oldest pending
dispatch's wait, sent and failed per minute) read from rows placed at known moments, its SVG
chart, the admin page around them (who may open it, the workers of each queue, a broker that
does not answer), and the whole of it in a real chromium after a real worker delivered mail."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from dispatcher import dashboard
from dispatcher.dashboard import WINDOW_MINUTES, chart_svg, delivery_figures, queue_workers
from dispatcher.models import Dispatch, DispatchError
from messengers.registry import get_registered_messenger_objects
from sitemessage.messages.email import EmailTextMessage
from sitemessage.toolbox import recipients, schedule_messages
from tests.faultsapp.helpers import make_dispatch
from tests.support import wait_until
from tests.test_admin import broker_down  # noqa: F401 (a fixture)

Status = Dispatch.Status
DASHBOARD = "admin:sitemessage_dashboard"
#: A fixed "now", 20 s into 12:30 UTC: the window is 11:31 to 12:30, both minutes included.
NOW = datetime(2025, 3, 1, 12, 30, 20, tzinfo=UTC)
FIRST = datetime(2025, 3, 1, 11, 31, tzinfo=UTC)


def at(hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(2025, 3, 1, hour, minute, second, tzinfo=UTC)


def found(pattern: str, text: str) -> str:
    """The first match of a pattern (across lines); fails the test when there is none."""
    match = re.search(pattern, text, re.S)
    assert match is not None, pattern
    return match[0]


def figures_of(alias: str, now: datetime = NOW) -> dashboard.MessengerFigures:
    [figures] = [m for m in delivery_figures(now).messengers if m.alias == alias]
    return figures


def fail(dispatch: Dispatch, *attempts: datetime) -> Dispatch:
    """Gives a dispatch one error entry per attempt, the last one final: FAILED."""
    for n, moment in enumerate(attempts, start=1):
        DispatchError.objects.create(
            dispatch=dispatch, attempt=n, error_log="550", time_created=moment
        )
    Dispatch.objects.filter(pk=dispatch.pk).update(
        dispatch_status=Status.FAILED, retry_count=len(attempts)
    )
    return dispatch


@pytest.mark.django_db
def test_counts_are_per_messenger_and_status_and_registered_messengers_show_zeros():
    for status, n in [(Status.PENDING, 3), (Status.SENT, 2), (Status.FAILED, 1)]:
        for _ in range(n):
            make_dispatch(status)
    make_dispatch(Status.ERROR, messenger="gone")  # a messenger no longer registered

    with CaptureQueriesContext(connection) as queries:
        figures = delivery_figures(NOW)

    by_alias = {m.alias: m for m in figures.messengers}
    assert list(by_alias) == sorted({*get_registered_messenger_objects(), "gone"})
    assert by_alias["smtp"].counts == {
        Status.PENDING: 3,
        Status.PROCESSING: 0,
        Status.SENT: 2,
        Status.ERROR: 0,
        Status.FAILED: 1,
    }
    assert by_alias["smtp"].total == 6
    assert by_alias["gone"].counts[Status.ERROR] == 1 and by_alias["gone"].total == 1
    assert all(m.total == 0 for alias, m in by_alias.items() if alias not in ("gone", "smtp"))
    assert len(queries) == 4  # one grouped query per kind, whatever the rows


@pytest.mark.django_db
def test_nothing_stored_shows_zeros_no_wait_and_empty_minutes():
    figures = delivery_figures(NOW).messengers

    assert [m.alias for m in figures] == sorted(get_registered_messenger_objects())
    for m in figures:
        assert (m.total, m.oldest_pending) == (0, None)
        assert m.sent == m.failed == [0] * WINDOW_MINUTES


@pytest.mark.django_db
def test_the_oldest_pending_wait_counts_due_pending_rows_from_when_they_were_due():
    make_dispatch(Status.PENDING, time_created=at(12, 20))
    make_dispatch(Status.PENDING, time_created=at(12, 25))
    make_dispatch(Status.ERROR, time_created=at(9, 0))  # waiting for a retry: not pending
    make_dispatch(Status.SENT, time_created=at(8, 0))
    make_dispatch(Status.PENDING, time_created=at(7, 0), send_at=at(12, 40))  # not due yet
    make_dispatch(Status.PENDING, time_created=at(10, 0), messenger="xmpp", send_at=at(12, 0))
    make_dispatch(Status.PENDING, time_created=at(7, 0), messenger="later", send_at=at(13, 0))

    assert figures_of("smtp").oldest_pending == timedelta(minutes=10, seconds=20)
    assert figures_of("xmpp").oldest_pending == timedelta(minutes=30, seconds=20)  # its send_at
    assert figures_of("later").oldest_pending is None
    assert figures_of("later", now=at(14, 0)).oldest_pending == timedelta(hours=1)  # now due


@pytest.mark.pg  # minutes are truncated by the database: run again on PostgreSQL
@pytest.mark.django_db
def test_sent_and_failed_land_in_the_minute_they_happened_within_the_last_hour():
    for moment in [
        at(11, 30, 59),  # before the window
        at(11, 31, 0),  # its first minute
        at(12, 29, 59),
        at(12, 30, 0),
        at(12, 30, 5),  # the current minute
        at(12, 31, 0),  # after now (another host's clock): not in the window
    ]:
        make_dispatch(Status.SENT, sent_at=moment)
    make_dispatch(Status.SENT, messenger="xmpp", sent_at=at(12, 0, 30))
    # A failure counts once, in the minute of its final attempt.
    fail(make_dispatch(Status.PENDING), at(12, 1, 10), at(12, 10, 30))
    fail(make_dispatch(Status.PENDING), at(11, 0), at(11, 31, 59))
    fail(make_dispatch(Status.PENDING), at(11, 30))  # before the window
    error = make_dispatch(Status.ERROR, retry_count=1)  # will retry: not failed
    DispatchError.objects.create(dispatch=error, attempt=1, error_log="4xx", time_created=NOW)

    smtp, xmpp = figures_of("smtp"), figures_of("xmpp")

    minute = {at(11, 31): 0, at(12, 29): 58, at(12, 30): 59, at(12, 0): 29, at(12, 10): 39}
    assert delivery_figures(NOW).minutes[0] == FIRST
    assert delivery_figures(NOW).minutes[-1] == at(12, 30)
    assert {n: c for n, c in enumerate(smtp.sent) if c} == {0: 1, 58: 1, 59: 2}
    assert {n: c for n, c in enumerate(xmpp.sent) if c} == {minute[at(12, 0)]: 1}
    assert {n: c for n, c in enumerate(smtp.failed) if c} == {0: 1, minute[at(12, 10)]: 1}
    assert sum(xmpp.failed) == 0


@pytest.mark.django_db
def test_a_cancelled_dispatch_counts_as_failed_in_the_minute_it_was_cancelled(admin_client):
    pending = make_dispatch(Status.PENDING, retry_count=0)
    admin_client.post(
        reverse("admin:sitemessage_dispatch_changelist"),
        {"action": "cancel", "_selected_action": [pending.pk]},
    )
    cancelled = DispatchError.objects.get(dispatch=pending)

    smtp = figures_of("smtp", now=cancelled.time_created)

    assert smtp.failed[-1] == 1 and sum(smtp.failed) == 1


def bars(svg: str, kind: str) -> list[dict[str, str]]:
    """The attributes of each bar of one kind in a chart, in the order drawn."""
    return [
        dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        for tag in re.findall(rf'<rect class="bar {kind}"[^>]*>', svg)
    ]


def test_the_chart_has_two_bars_per_minute_scaled_to_the_busiest():
    minutes = [FIRST + timedelta(minutes=n) for n in range(WINDOW_MINUTES)]
    sent = [0] * WINDOW_MINUTES
    failed = [0] * WINDOW_MINUTES
    sent[0], sent[59], failed[10] = 8, 4, 2

    svg = str(chart_svg(minutes, sent, failed))

    drawn_sent, drawn_failed = bars(svg, "sent"), bars(svg, "failed")
    assert [int(b["data-count"]) for b in drawn_sent] == sent
    assert [int(b["data-count"]) for b in drawn_failed] == failed
    assert drawn_sent[0]["data-minute"] == "2025-03-01T11:31:00Z"
    assert drawn_sent[59]["data-minute"] == "2025-03-01T12:30:00Z"
    tallest = float(drawn_sent[0]["height"])
    assert tallest == dashboard.CHART_HEIGHT - dashboard.BOTTOM - dashboard.TOP
    assert float(drawn_sent[59]["height"]) == tallest / 2
    assert float(drawn_failed[10]["height"]) == tallest / 4
    assert float(drawn_failed[11]["height"]) == 0
    # The failed bar stands right of the sent bar of its minute, inside the chart.
    assert float(drawn_failed[0]["x"]) > float(drawn_sent[0]["x"])
    assert float(drawn_failed[59]["x"]) + float(drawn_failed[59]["width"]) <= 720 - dashboard.RIGHT
    assert "<title>12 sent and 2 failed in the last 60 minutes</title>" in svg
    assert "<script" not in svg


# The page.


def staff_user(django_user_model, *codenames: str):
    user = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


@pytest.mark.django_db
def test_the_page_shows_the_counts_and_charts_and_says_no_worker_answered(
    client, django_user_model
):
    client.force_login(staff_user(django_user_model, "view_dispatch"))
    make_dispatch(Status.PENDING, time_created=datetime.now(UTC) - timedelta(minutes=5))
    make_dispatch(Status.SENT, sent_at=datetime.now(UTC))
    make_dispatch(Status.SENT, sent_at=datetime.now(UTC))

    page = client.get(reverse(DASHBOARD))

    html = page.content.decode()
    assert page.status_code == 200
    row = found(r'<tr data-messenger="smtp">.*?</tr>', html)
    counts = dict(re.findall(r'data-status="(\d)"><a href="[^"]*">(\d+)<', row))
    assert counts == {"1": "1", "5": "0", "2": "2", "3": "0", "4": "0"}
    assert int(found(r'data-seconds="\d+"', row).split('"')[1]) in range(299, 310)
    link = f"{reverse('admin:sitemessage_dispatch_changelist')}?messenger=smtp&amp;dispatch_status__exact=2"
    assert f'href="{link}"' in row
    assert sum(int(b["data-count"]) for b in bars(html, "sent")) == 2
    quiet = found(r'<section class="chart" data-messenger="recorder">.*?</section>', html)
    assert 'class="total-sent">0<' in quiet and "<svg" not in quiet  # nothing to draw
    assert 'id="no-worker-answered"' in html
    assert '<tr data-queue="messenger.smtp">' in html and '<tr data-queue="sitemessage">' in html
    assert "<script" not in html.split('id="content-main"')[1]  # drawn on the server


@pytest.mark.django_db
@pytest.mark.usefixtures("broker_down")
def test_the_page_still_renders_when_the_broker_is_unreachable(admin_client):
    page = admin_client.get(reverse(DASHBOARD))

    assert page.status_code == 200
    assert 'id="broker-unreachable"' in page.content.decode()


@pytest.mark.django_db
def test_only_staff_who_may_view_dispatches_open_the_page(client, django_user_model):
    url = reverse(DASHBOARD)
    assert client.get(url).status_code == 302  # to the login form
    outsider = django_user_model.objects.create_user("ann", password="pw")
    client.force_login(outsider)
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    client.force_login(staff_user(django_user_model))  # staff, without the permission
    assert client.get(url).status_code == 403


@pytest.mark.django_db
def test_the_app_page_and_the_lists_link_to_the_dashboard(admin_client):
    url = reverse(DASHBOARD)
    for page in ["admin:sitemessage_dispatch_changelist", "admin:sitemessage_message_changelist"]:
        assert f'href="{url}"' in admin_client.get(reverse(page)).content.decode()
    app_index = admin_client.get(reverse("admin:app_list", args=["sitemessage"]))
    assert f'href="{url}"' in app_index.content.decode()


def test_queue_workers_lists_the_needed_queues_first_and_any_other_served(settings, monkeypatch):
    settings.SITEMESSAGE_URGENT_PRIORITY = 5
    answers = {"messenger.smtp": ["w1@h", "w2@h"], "reports": ["w3@h"]}
    monkeypatch.setattr(dashboard, "workers_by_queue", lambda timeout: answers)

    listed = [(q.queue, q.workers) for q in queue_workers(["smtp", "xmpp"]) or []]

    assert listed == [
        ("sitemessage", []),
        ("messenger.smtp", ["w1@h", "w2@h"]),
        ("messenger.smtp.urgent", []),
        ("messenger.xmpp", []),
        ("messenger.xmpp.urgent", []),
        ("reports", ["w3@h"]),
    ]


# In a real browser, after a real worker delivered.


def minutes_of(moments: Iterable[datetime | None]) -> Counter[str]:
    return Counter(m.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:00Z") for m in moments if m)


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_in_a_browser_the_dashboard_matches_the_database_after_a_worker_delivered(
    browser_page, smtp_server, start_worker, django_user_model
):
    sink, port = smtp_server
    sink.reject["gone@example.com"] = "550 5.1.1 no such user"
    worker = start_worker(
        ["messenger.smtp"], concurrency=1, env={"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port)}
    )
    addresses = [f"user{n}@example.com" for n in range(12)] + ["gone@example.com"]
    schedule_messages(EmailTextMessage("Report", "Numbers are up."), recipients("smtp", addresses))
    assert wait_until(
        lambda: (
            Dispatch.objects.filter(dispatch_status__in=[Status.SENT, Status.FAILED]).count() == 13
        ),
        60,
    )
    django_user_model.objects.create_user("clerk", password="a-long-password", is_staff=True)
    Permission.objects.get(codename="view_dispatch").user_set.add(
        django_user_model.objects.get(username="clerk")
    )

    page = browser_page.goto(f"/admin/login/?next={reverse(DASHBOARD)}")
    page.get_by_label("Username").fill("clerk")
    page.get_by_label("Password").fill("a-long-password")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="Delivery dashboard").wait_for()

    row = page.locator('tr[data-messenger="smtp"]')
    shown = {
        int(cell.get_attribute("data-status")): int(cell.inner_text())
        for cell in row.locator("td.count").all()
    }
    stored = Counter(
        Dispatch.objects.filter(messenger="smtp").values_list("dispatch_status", flat=True)
    )
    assert shown == {status: stored[status] for status in Status.values}
    assert (shown[Status.SENT], shown[Status.FAILED]) == (12, 1)
    assert row.locator("td.oldest-pending").inner_text() == "none waiting"

    chart = page.locator('section.chart[data-messenger="smtp"]')
    assert chart.locator(".total-sent").inner_text() == "12"
    assert chart.locator(".total-failed").inner_text() == "1"
    drawn = {
        kind: {
            bar.get_attribute("data-minute"): int(bar.get_attribute("data-count"))
            for bar in chart.locator(f"rect.bar.{kind}").all()
        }
        for kind in ("sent", "failed")
    }
    assert len(drawn["sent"]) == len(drawn["failed"]) == WINDOW_MINUTES
    sent_at = list(Dispatch.objects.filter(sent_at__isnull=False).values_list("sent_at", flat=True))
    failed_at = list(
        DispatchError.objects.filter(
            dispatch__dispatch_status=Status.FAILED, attempt=F("dispatch__retry_count")
        ).values_list("time_created", flat=True)
    )
    assert {m: c for m, c in drawn["sent"].items() if c} == minutes_of(sent_at)
    assert {m: c for m, c in drawn["failed"].items() if c} == minutes_of(failed_at)
    for bar in chart.locator("rect.bar").all():  # a bar is drawn exactly when it counts
        assert (float(bar.get_attribute("height")) > 0) == (bar.get_attribute("data-count") != "0")
        assert bar.bounding_box() is not None

    node = worker.name.replace("%h", "")
    served = page.locator('tr[data-queue="messenger.smtp"] .worker').all_inner_texts()
    assert [name for name in served if name.startswith(node)] and len(served) == 1
    assert page.locator("#no-worker-answered").count() == 0
    assert browser_page.screenshot("dashboard").stat().st_size > 10_000
