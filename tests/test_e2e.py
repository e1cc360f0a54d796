"""End to end: a real broker, a real `celery worker` process, a real SMTP server.

Runs on whatever DATABASE_URL and CELERY_BROKER_URL say; `make test` runs it on SQLite + Redis,
PostgreSQL + Redis and SQLite + RabbitMQ.
"""

import time

import pytest

from dispatcher.models import Dispatch
from sitemessage.messages.email import EmailTextMessage
from sitemessage.toolbox import recipients, schedule_messages
from tests.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_thousand_emails_arrive_exactly_once(smtp_server, start_worker):
    sink, port = smtp_server
    start_worker(["messenger.smtp"], env={"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port)})
    addresses = [f"user{i}@example.com" for i in range(1000)]

    started = time.monotonic()
    [(message, _)] = schedule_messages(
        EmailTextMessage("Quarterly report", "Numbers are up.\nSee you."),
        recipients("smtp", addresses),
    )
    sink.wait_for(1000, timeout=120)
    assert wait_until(
        lambda: Dispatch.objects.filter(status=Dispatch.Status.SENT).count() == 1000, timeout=30
    )
    elapsed = time.monotonic() - started
    print(f"\n1000 e-mails delivered in {elapsed:.2f}s ({1000 / elapsed:.0f}/s)")

    assert sorted(sink.recipients()) == sorted(addresses)  # each exactly once
    rows = {d.address: d for d in Dispatch.objects.filter(message=message)}
    assert {d.attempts for d in rows.values()} == {1}
    for (rcpt,), email in sink.messages:
        assert email["Subject"] == "Quarterly report"
        assert email["To"] == rcpt
        assert email["From"] == "sitemessage@localhost"
        assert email["Date"]
        assert email.get_payload().replace("\r\n", "\n").strip() == "Numbers are up.\nSee you."
        assert email["Message-ID"] == rows[rcpt].provider_message_id
        assert email["Message-ID"].startswith(f"<sitemessage.{message.pk}.{rows[rcpt].pk}@")
