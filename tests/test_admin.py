"""The admin, driven by logged-in users through Django's test client against the real database:
the "Retry now" action (what it resets, what it publishes on the real broker, and that a real
worker then delivers the retried dispatch), the "Cancel" action, and the forms that show
delivery bookkeeping without letting anyone write, add or delete it."""

from __future__ import annotations

import re
import threading
import time
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.contrib.messages import ERROR, SUCCESS
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from dispatcher.admin import INLINE_DISPATCHES, PAGE_PARAM
from dispatcher.models import Dispatch, Message
from dispatcher.pipeline import claim
from tests.faultsapp.helpers import drain, make_dispatch, published_ids
from tests.support import free_port, purge, wait_until
from workers.app import app

Status = Dispatch.Status
QUEUE = "messenger.smtp"
CHANGELIST = "admin:sitemessage_dispatch_changelist"


def retry_now(client, dispatches: list[Dispatch]) -> list[tuple[int, str]]:
    response = client.post(
        reverse(CHANGELIST),
        {"action": "retry_now", "_selected_action": [d.pk for d in dispatches]},
        follow=True,
    )
    assert response.status_code == 200
    return [(m.level, m.message) for m in response.context["messages"]]


@pytest.mark.django_db
def test_retry_now_resets_failed_and_error_rows_and_publishes_them(admin_client):
    purge([QUEUE])
    later = timezone.now() + timedelta(hours=1)
    failed = make_dispatch(Status.FAILED, retry_count=10)
    error = make_dispatch(Status.ERROR, retry_count=3, next_attempt_at=later)
    sent = make_dispatch(Status.SENT)
    running = make_dispatch(
        Status.PROCESSING, lease_owner="w:1:t", lease_expires_at=later, next_attempt_at=None
    )
    before = timezone.now()

    notes = retry_now(admin_client, [failed, error, sent, running])

    assert notes == [
        (
            SUCCESS,
            "2 dispatches queued for retry now; 2 skipped "
            "(only failed or error dispatches are retried)",
        )
    ]
    for row in Dispatch.objects.filter(pk__in=[failed.pk, error.pk]):
        assert (row.dispatch_status, row.retry_count, row.lease_owner, row.lease_expires_at) == (
            Status.PENDING,
            0,
            "",
            None,
        )
        assert row.next_attempt_at is not None
        assert before <= row.next_attempt_at <= timezone.now()
    assert Dispatch.objects.get(pk=sent.pk).dispatch_status == Status.SENT
    assert Dispatch.objects.get(pk=running.pk).lease_owner == "w:1:t"
    assert published_ids(drain(QUEUE)) == sorted([failed.pk, error.pk])
    history = LogEntry.objects.filter(change_message='Action "Retry now"')
    assert sorted(int(e.object_id) for e in history) == sorted([failed.pk, error.pk])


@pytest.mark.django_db
def test_retry_now_is_refused_to_a_user_without_change_permission(client, django_user_model):
    staff = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    client.force_login(staff)
    failed = make_dispatch(Status.FAILED)

    response = client.post(
        reverse(CHANGELIST), {"action": "retry_now", "_selected_action": [failed.pk]}
    )

    assert response.status_code == 403
    assert Dispatch.objects.get(pk=failed.pk).dispatch_status == Status.FAILED


@pytest.fixture
def broker_down():
    """Points the producer side of this process at a port where no broker listens."""
    saved = app.conf.get("broker_write_url")
    app.conf.update(broker_write_url=f"redis://127.0.0.1:{free_port()}/13")
    forget_producers()
    try:
        yield
    finally:
        app.conf.update(broker_write_url=saved)
        forget_producers()


def forget_producers() -> None:
    """Drops the cached producer pools, so the next publish connects to the configured URL."""
    app._pool = None  # type: ignore[attr-defined]
    app.amqp._producer_pool = None  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_retry_now_says_when_publishing_fails(admin_client, broker_down):
    failed = make_dispatch(Status.FAILED, retry_count=10)

    notes = retry_now(admin_client, [failed])

    [(level, text)] = notes
    assert level == ERROR
    assert text.startswith("1 dispatches reset to pending, but publishing failed for 1 of them")
    assert text.endswith("the next sweep publishes them")
    row = Dispatch.objects.get(pk=failed.pk)
    assert (row.dispatch_status, row.retry_count) == (Status.PENDING, 0)


@pytest.mark.django_db(transaction=True)
def test_a_retried_dispatch_is_delivered_by_a_worker(admin_client, smtp_server, start_worker):
    sink, port = smtp_server
    failed = make_dispatch(
        Status.FAILED, address="back@example.com", retry_count=10, errors=["SMTP 550 no such user"]
    )
    start_worker([QUEUE], concurrency=1, env={"EMAIL_PORT": str(port)})

    assert retry_now(admin_client, [failed])[0][0] == SUCCESS

    assert wait_until(lambda: Dispatch.objects.get(pk=failed.pk).dispatch_status == Status.SENT, 30)
    row = Dispatch.objects.get(pk=failed.pk)
    assert row.retry_count == 1
    assert sink.recipients() == ["back@example.com"]
    assert sink.messages[0][1]["Message-ID"] == row.provider_message_id


# Delivery bookkeeping is view-only: no form writes a dispatch or a message, none adds one.

CHANGE_FORM_POST = {
    "messenger": "smtp",
    "address": "attacker@example.net",
    "dispatch_status": Status.SENT,
    "retry_count": "0",
    "next_attempt_at_0": "",
    "next_attempt_at_1": "",
    "lease_owner": "",
    "lease_expires_at_0": "",
    "lease_expires_at_1": "",
    "provider_message_id": "forged",
    "time_created_0": "2020-01-01",
    "time_created_1": "00:00:00",
    "sent_at_0": "",
    "sent_at_1": "",
    "message_cache": "a body nobody scheduled",
    "errors-TOTAL_FORMS": "0",
    "errors-INITIAL_FORMS": "0",
    "errors-MIN_NUM_FORMS": "0",
    "errors-MAX_NUM_FORMS": "1000",
}


@pytest.mark.django_db
def test_the_dispatch_change_form_writes_nothing(admin_client):
    dispatch = make_dispatch(Status.ERROR, message_cache="the rendered body")
    url = reverse("admin:sitemessage_dispatch_change", args=[dispatch.pk])
    before = model_to_dict(Dispatch.objects.get(pk=dispatch.pk))

    page = admin_client.get(url)
    response = admin_client.post(url, {**CHANGE_FORM_POST, "message": dispatch.message_id})

    assert page.status_code == 200
    assert 'name="address"' not in page.content.decode()
    assert 'name="_save"' not in page.content.decode()
    assert response.status_code == 403
    assert model_to_dict(Dispatch.objects.get(pk=dispatch.pk)) == before


@pytest.mark.django_db
def test_the_message_change_form_writes_nothing(admin_client):
    message = make_dispatch(Status.PENDING).message
    url = reverse("admin:sitemessage_message_change", args=[message.pk])
    before = model_to_dict(Message.objects.get(pk=message.pk))

    response = admin_client.post(
        url,
        {
            "cls": "email_plain",
            "context": '{"subject": "rewritten", "stext_": "rewritten"}',
            "priority": "9",
            "time_created_0": "2020-01-01",
            "time_created_1": "00:00:00",
            "dispatches-TOTAL_FORMS": "1",
            "dispatches-INITIAL_FORMS": "1",
            "dispatches-MIN_NUM_FORMS": "0",
            "dispatches-MAX_NUM_FORMS": "1000",
            "dispatches-0-id": str(message.dispatches.get().pk),
            "dispatches-0-message": str(message.pk),
        },
    )

    assert response.status_code == 403
    assert model_to_dict(Message.objects.get(pk=message.pk)) == before


@pytest.mark.django_db
@pytest.mark.parametrize("model", ["dispatch", "message"])
def test_nothing_is_added_by_hand(admin_client, model):
    url = reverse(f"admin:sitemessage_{model}_add")
    count = Dispatch.objects.count(), Message.objects.count()

    assert admin_client.get(url).status_code == 403
    assert admin_client.post(url, {**CHANGE_FORM_POST, "cls": "email_plain"}).status_code == 403
    assert (Dispatch.objects.count(), Message.objects.count()) == count


@pytest.mark.django_db
def test_schedule_requests_are_listed_with_their_reason_and_never_edited(admin_client):
    from dispatcher.models import ScheduleRequest

    request = ScheduleRequest.objects.create(payload={"x": 1}, error="LookupError: type gone")
    listing = admin_client.get(reverse("admin:sitemessage_schedulerequest_changelist"))
    assert listing.status_code == 200 and "LookupError: type gone" in listing.content.decode()
    url = reverse("admin:sitemessage_schedulerequest_change", args=[request.pk])
    assert admin_client.post(url, {"payload": "{}", "error": ""}).status_code == 403
    request.refresh_from_db()
    assert (request.payload, request.error) == ({"x": 1}, "LookupError: type gone")


@pytest.mark.django_db
def test_the_message_page_shows_the_sender_without_listing_every_user(
    admin_client, django_user_model
):
    django_user_model.objects.bulk_create(
        django_user_model(username=f"user{n}") for n in range(300)
    )
    message = make_dispatch(Status.SENT).message
    message.sender = django_user_model.objects.get(username="user7")
    message.save()

    page = admin_client.get(reverse("admin:sitemessage_message_change", args=[message.pk]))

    html = page.content.decode()
    assert page.status_code == 200
    assert 'name="sender"' not in html
    assert html.count("<option") < 50
    assert ">user7</a>" in html  # shown, and linked to the user's page


@pytest.mark.django_db
def test_the_message_page_lists_the_first_dispatches_and_links_to_all(admin_client):
    message = make_dispatch(Status.SENT, address="r-first@example.com").message
    Dispatch.objects.bulk_create(
        Dispatch(message=message, messenger="smtp", address=f"r{n}@example.com")
        for n in range(INLINE_DISPATCHES + 49)
    )

    page = admin_client.get(reverse("admin:sitemessage_message_change", args=[message.pk]))

    html = page.content.decode()
    assert page.status_code == 200
    assert html.count('class="form-row has_original"') == INLINE_DISPATCHES
    assert "r-first@example.com" in html  # in order of creation
    link = f"{reverse(CHANGELIST)}?message__id__exact={message.pk}"
    assert f'<a href="{link}">all {INLINE_DISPATCHES + 50}</a>' in html
    listing = admin_client.get(link)
    assert listing.status_code == 200
    assert listing.context["cl"].result_count == INLINE_DISPATCHES + 50


@pytest.mark.django_db
def test_deleting_bookkeeping_is_left_to_superusers(admin_client, client, django_user_model):
    dispatch = make_dispatch(Status.FAILED)
    staff = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    staff.user_permissions.set(
        Permission.objects.filter(content_type__app_label="sitemessage", codename__contains="_")
    )
    client.force_login(staff)
    urls = [
        reverse("admin:sitemessage_dispatch_delete", args=[dispatch.pk]),
        reverse("admin:sitemessage_message_delete", args=[dispatch.message_id]),
    ]

    assert [client.post(url, {"post": "yes"}).status_code for url in urls] == [403, 403]
    client.post(
        reverse(CHANGELIST),
        {"action": "delete_selected", "_selected_action": [dispatch.pk], "post": "yes"},
    )
    assert Dispatch.objects.filter(pk=dispatch.pk).exists()
    assert [admin_client.get(url).status_code for url in urls] == [200, 200]


# The "Cancel" action.


def cancel(client, dispatches: list[Dispatch]) -> list[tuple[int, str]]:
    response = client.post(
        reverse(CHANGELIST),
        {"action": "cancel", "_selected_action": [d.pk for d in dispatches]},
        follow=True,
    )
    assert response.status_code == 200
    return [(m.level, m.message) for m in response.context["messages"]]


@pytest.mark.pg  # select_for_update locks rows there; SQLite serializes the transaction
@pytest.mark.django_db
def test_cancel_fails_pending_and_error_rows_and_skips_the_rest(admin_client, admin_user):
    later = timezone.now() + timedelta(hours=1)
    pending = make_dispatch(Status.PENDING, retry_count=0, next_attempt_at=timezone.now())
    error = make_dispatch(Status.ERROR, retry_count=2, next_attempt_at=later, errors=["4xx", "4xx"])
    running = make_dispatch(
        Status.PROCESSING, lease_owner="w:1:t", lease_expires_at=later, next_attempt_at=None
    )
    sent = make_dispatch(Status.SENT)
    failed = make_dispatch(Status.FAILED, errors=["550"])
    untouched = [model_to_dict(d) for d in (running, sent, failed)]

    notes = cancel(admin_client, [pending, error, running, sent, failed])

    assert notes == [
        (
            SUCCESS,
            "2 dispatches cancelled; 3 skipped (only pending or error dispatches can be cancelled)",
        )
    ]
    for dispatch, attempt in [(pending, 0), (error, 2)]:
        row = Dispatch.objects.get(pk=dispatch.pk)
        assert (row.dispatch_status, row.retry_count, row.next_attempt_at, row.lease_owner) == (
            Status.FAILED,
            attempt,
            None,
            "",
        )
        last = row.errors.order_by("pk").values_list("attempt", "exc_type", "error_log").last()
        assert last == (attempt, "", "cancelled")
        history = LogEntry.objects.get(object_id=str(dispatch.pk))
        assert (history.user, history.get_change_message()) == (admin_user, 'Action "Cancel"')
    assert [model_to_dict(Dispatch.objects.get(pk=d.pk)) for d in (running, sent, failed)] == (
        untouched
    )
    assert failed.errors.count() == 1
    # A task already queued for the cancelled dispatch finds nothing to claim.
    assert claim("smtp", [pending.pk, error.pk], "w:2:t") == []


@pytest.mark.django_db
def test_cancel_is_refused_to_a_user_without_change_permission(client, django_user_model):
    staff = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    staff.user_permissions.set(Permission.objects.filter(codename="view_dispatch"))
    client.force_login(staff)
    pending = make_dispatch(Status.PENDING)

    response = client.post(
        reverse(CHANGELIST), {"action": "cancel", "_selected_action": [pending.pk]}
    )

    assert response.status_code == 200  # the list, without the action
    assert 'value="cancel"' not in response.content.decode()
    assert Dispatch.objects.get(pk=pending.pk).dispatch_status == Status.PENDING


@pytest.mark.pg  # PostgreSQL reads past an uncommitted claim unless the row is locked
@pytest.mark.django_db(transaction=True)
def test_cancel_waits_for_a_claim_in_flight_and_skips_the_claimed_row(admin_client):
    pending = make_dispatch(Status.PENDING)
    claimed, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=claim_until, args=(pending.pk, claimed, release))
    worker.start()
    try:
        assert claimed.wait(10)
        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        notes = cancel(admin_client, [pending])
        waited = time.monotonic() - started
    finally:
        release.set()
        worker.join(10)

    assert notes == [
        (
            SUCCESS,
            "0 dispatches cancelled; 1 skipped (only pending or error dispatches can be cancelled)",
        )
    ]
    assert waited >= 0.4
    row = Dispatch.objects.get(pk=pending.pk)
    assert (row.dispatch_status, row.lease_owner) == (Status.PROCESSING, "w:9:t")
    assert not row.errors.exists()


def claim_until(pk: int, claimed: threading.Event, release: threading.Event) -> None:
    """Claims a dispatch the way the pipeline does, on a connection of its own, and commits
    only once ``release`` is set: a worker whose claim is in flight."""
    conn = connections.create_connection(DEFAULT_DB_ALIAS)
    try:
        conn.set_autocommit(False)
        with conn.cursor() as cursor:
            cursor.execute(
                f"UPDATE {conn.ops.quote_name(Dispatch._meta.db_table)} "
                "SET dispatch_status = %s, lease_owner = %s WHERE id = %s",
                [Status.PROCESSING, "w:9:t", pk],
            )
        claimed.set()
        release.wait(10)
        conn.commit()
    finally:
        conn.close()


# The message list and page: counts per status, and a message's dispatches a page at a time.


def message_with(*statuses: int, priority: int = 0) -> Message:
    message = make_dispatch(statuses[0], priority=priority).message
    Dispatch.objects.bulk_create(
        Dispatch(message=message, messenger="smtp", address="x@example.com", dispatch_status=s)
        for s in statuses[1:]
    )
    return message


def counts_on(html: str, message: Message) -> dict[str, str]:
    """The count columns of a message's row in the message list."""
    row = re.search(rf'<tr><td class="action-checkbox">[^\n]*?>{message.pk}</a></th>.*?</tr>', html)
    assert row is not None
    return dict(re.findall(r'<td class="field-(n_\w+)">(?:<a href="[^"]*">)?(\d+)', row[0]))


@pytest.mark.django_db
def test_the_message_list_counts_dispatches_per_status_in_one_query_for_the_page(admin_client):
    one = message_with(Status.SENT, Status.SENT, Status.FAILED, Status.PENDING)
    two = message_with(Status.ERROR)
    url = reverse("admin:sitemessage_message_changelist")

    with CaptureQueriesContext(connection) as few:
        html = admin_client.get(url).content.decode()
    for _ in range(20):
        message_with(Status.SENT, Status.PROCESSING)
    with CaptureQueriesContext(connection) as many:
        admin_client.get(url)

    assert counts_on(html, one) == {
        "n_pending": "1",
        "n_processing": "0",
        "n_sent": "2",
        "n_error": "0",
        "n_failed": "1",
    }
    assert counts_on(html, two)["n_error"] == "1"
    query = urlencode({"message__id__exact": one.pk, "dispatch_status__exact": Status.SENT})
    assert f'href="{reverse(CHANGELIST)}?{query.replace("&", "&amp;")}">2</a>' in html
    assert len(many) == len(few)  # not one query per row
    reading_dispatches = [q["sql"] for q in few if "sitemessage_dispatch" in q["sql"]]
    assert len(reading_dispatches) == 1  # one grouped query for the page
    assert "GROUP BY" in reading_dispatches[0] and "IN (" in reading_dispatches[0]


def inline_rows(html: str) -> list[str]:
    return re.findall(r'<td class="field-address">\s*<p>([^<]*)</p>', html)


@pytest.mark.django_db
def test_the_message_page_shows_its_dispatches_a_page_at_a_time(admin_client):
    message = make_dispatch(Status.SENT, address="r0@example.com").message
    Dispatch.objects.bulk_create(
        Dispatch(message=message, messenger="smtp", address=f"r{n}@example.com")
        for n in range(1, 2 * INLINE_DISPATCHES + 50)
    )
    url = reverse("admin:sitemessage_message_change", args=[message.pk])

    def page(number: object) -> str:
        response = admin_client.get(url, {PAGE_PARAM: number})
        assert response.status_code == 200
        return response.content.decode()

    first, third = page(1), page(3)
    assert inline_rows(first) == [f"r{n}@example.com" for n in range(INLINE_DISPATCHES)]
    assert inline_rows(third) == [f"r{n}@example.com" for n in range(200, 250)]
    assert "Dispatches 201 to 250 of 250" in third
    assert f'<a href="?{PAGE_PARAM}=1">1</a>' in third
    assert '<span class="this-page" aria-current="page">3</span>' in third
    assert inline_rows(page(99)) == inline_rows(third)  # past the end: the last page
    assert inline_rows(page("x")) == inline_rows(first)


@pytest.mark.pg
@pytest.mark.django_db
def test_a_message_of_50000_dispatches_opens_on_any_page_with_a_few_queries(admin_client):
    message = make_dispatch(Status.SENT).message
    Dispatch.objects.bulk_create(
        (
            Dispatch(message=message, messenger="smtp", address=f"r{n}@example.com")
            for n in range(1, 50_000)
        ),
        batch_size=5000,
    )
    url = reverse("admin:sitemessage_message_change", args=[message.pk])

    for number in (1, 500):
        started = time.perf_counter()
        with CaptureQueriesContext(connection) as queries:
            response = admin_client.get(url, {PAGE_PARAM: number})
        elapsed = time.perf_counter() - started
        print(
            f"\n{connection.vendor}: page {number} of 50,000 dispatches in {elapsed * 1000:.0f} ms"
        )
        html = response.content.decode()
        assert response.status_code == 200
        assert len(inline_rows(html)) == INLINE_DISPATCHES
        assert "of 50000" in html
        assert len(queries) <= 12
    assert inline_rows(html)[-1] == "r49999@example.com"


# The dispatch list: filters, the task id, staff only.


def listed(client, **params: object) -> list[int]:
    response = client.get(reverse(CHANGELIST), params)
    assert response.status_code == 200
    return sorted(row.pk for row in response.context["cl"].result_list)


@pytest.mark.django_db
def test_the_dispatch_list_filters_by_status_messenger_priority_and_date(admin_client):
    now = timezone.now()
    sent_today = make_dispatch(Status.SENT, sent_at=now, priority=7)
    sent_before = make_dispatch(
        Status.SENT, sent_at=now - timedelta(days=40), time_created=now - timedelta(days=40)
    )
    failed = make_dispatch(Status.FAILED, messenger="xmpp", priority=7)

    assert listed(admin_client, dispatch_status__exact=Status.SENT) == [
        sent_today.pk,
        sent_before.pk,
    ]
    assert listed(admin_client, messenger="xmpp") == [failed.pk]
    assert listed(admin_client, priority="7") == sorted([sent_today.pk, failed.pk])
    assert listed(admin_client, priority="high") == []
    today = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
    assert listed(admin_client, sent_at__gte=str(today)) == [sent_today.pk]  # "Today"
    recent = str(today - timedelta(days=7))  # "Past 7 days"
    assert listed(admin_client, time_created__gte=recent) == sorted([sent_today.pk, failed.pk])


@pytest.mark.django_db
def test_the_dispatch_list_filters_offer_choices_without_reading_every_dispatch(admin_client):
    make_dispatch(Status.SENT, priority=3)

    with CaptureQueriesContext(connection) as queries:
        html = admin_client.get(reverse(CHANGELIST)).content.decode()

    assert "?priority=3" in html and "?messenger=smtp" in html
    assert "By sent at" in html.replace("\n", " ") or "sent at" in html
    distinct = [q["sql"] for q in queries if "DISTINCT" in q["sql"]]
    assert distinct and all("sitemessage_dispatch" not in sql for sql in distinct)


@pytest.mark.django_db
def test_the_task_id_is_shown_and_linked_to_flower_when_configured(admin_client, settings):
    dispatch = make_dispatch(Status.SENT, task_id="4f2c-task")
    untracked = make_dispatch(Status.SENT)  # delivered in-process: no task
    change = reverse("admin:sitemessage_dispatch_change", args=[dispatch.pk])

    assert ">4f2c-task<" in admin_client.get(change).content.decode()
    assert "flower" not in admin_client.get(reverse(CHANGELIST)).content.decode()
    settings.SITEMESSAGE_FLOWER_URL = "https://flower.example.com/ops/"
    link = '<a href="https://flower.example.com/ops/task/4f2c-task">4f2c-task</a>'
    assert link in admin_client.get(change).content.decode()
    listing = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert link in listing
    row = re.search(
        rf'<tr><td class="action-checkbox">[^\n]*?>{untracked.pk}</a></th>.*?</tr>', listing
    )
    assert row is not None and '<td class="field-task">-</td>' in row[0]


@pytest.mark.django_db
def test_the_dispatch_and_message_pages_refuse_a_user_who_is_not_staff(client, django_user_model):
    dispatch = make_dispatch(Status.SENT)
    user = django_user_model.objects.create_user("ann", password="pw")
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="sitemessage"))
    client.force_login(user)

    for url in [
        reverse(CHANGELIST),
        reverse("admin:sitemessage_dispatch_change", args=[dispatch.pk]),
        reverse("admin:sitemessage_message_changelist"),
        reverse("admin:sitemessage_message_change", args=[dispatch.message_id]),
    ]:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
