"""The Dispatch admin's "Retry now" action, posted by a logged-in superuser through Django's
test client: what it resets, what it publishes on the real broker, and that a real worker then
delivers the retried dispatch."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.messages import ERROR, SUCCESS
from django.urls import reverse
from django.utils import timezone

from dispatcher.models import Dispatch
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
    failed = make_dispatch(Status.FAILED, attempts=10)
    error = make_dispatch(Status.ERROR, attempts=3, next_attempt_at=later)
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
        assert (row.status, row.attempts, row.lease_owner, row.lease_expires_at) == (
            Status.PENDING,
            0,
            "",
            None,
        )
        assert row.next_attempt_at is not None
        assert before <= row.next_attempt_at <= timezone.now()
    assert Dispatch.objects.get(pk=sent.pk).status == Status.SENT
    assert Dispatch.objects.get(pk=running.pk).lease_owner == "w:1:t"
    assert published_ids(drain(QUEUE)) == sorted([failed.pk, error.pk])


@pytest.mark.django_db
def test_retry_now_is_refused_to_a_user_without_change_permission(client, django_user_model):
    staff = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    client.force_login(staff)
    failed = make_dispatch(Status.FAILED)

    response = client.post(
        reverse(CHANGELIST), {"action": "retry_now", "_selected_action": [failed.pk]}
    )

    assert response.status_code == 403
    assert Dispatch.objects.get(pk=failed.pk).status == Status.FAILED


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
    failed = make_dispatch(Status.FAILED, attempts=10)

    notes = retry_now(admin_client, [failed])

    [(level, text)] = notes
    assert level == ERROR
    assert text.startswith("1 dispatches reset to pending, but publishing failed for 1 of them")
    assert text.endswith("the next sweep publishes them")
    row = Dispatch.objects.get(pk=failed.pk)
    assert (row.status, row.attempts) == (Status.PENDING, 0)


@pytest.mark.django_db(transaction=True)
def test_a_retried_dispatch_is_delivered_by_a_worker(admin_client, smtp_server, start_worker):
    sink, port = smtp_server
    failed = make_dispatch(
        Status.FAILED, address="back@example.com", attempts=10, errors=["SMTP 550 no such user"]
    )
    start_worker([QUEUE], concurrency=1, env={"EMAIL_PORT": str(port)})

    assert retry_now(admin_client, [failed])[0][0] == SUCCESS

    assert wait_until(lambda: Dispatch.objects.get(pk=failed.pk).status == Status.SENT, 30)
    row = Dispatch.objects.get(pk=failed.pk)
    assert row.attempts == 1
    assert sink.recipients() == ["back@example.com"]
    assert sink.messages[0][1]["Message-ID"] == row.provider_message_id
