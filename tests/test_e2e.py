"""End to end: a real broker, a real `celery worker` process, a real SMTP server.

Runs on whatever DATABASE_URL and CELERY_BROKER_URL say; `make test` runs it on SQLite + Redis,
PostgreSQL + Redis and SQLite + RabbitMQ.
"""

import socket
import time
from typing import Any

import pytest

from dispatcher.models import Dispatch, DispatchError
from messengers.registry import register_messenger_objects
from sitemessage.messages.email import EmailTextMessage
from sitemessage.toolbox import recipients, schedule_messages
from tests.support import wait_until
from workers import broker

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
        lambda: Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() == 1000,
        timeout=30,
    )
    elapsed = time.monotonic() - started
    print(f"\n1000 e-mails delivered in {elapsed:.2f}s ({1000 / elapsed:.0f}/s)")

    assert sorted(sink.recipients()) == sorted(addresses)  # each exactly once
    rows = {d.address: d for d in Dispatch.objects.filter(message=message)}
    assert {d.retry_count for d in rows.values()} == {1}
    for (rcpt,), email in sink.messages:
        assert email["Subject"] == "Quarterly report"
        assert email["To"] == rcpt
        assert email["From"] == "sitemessage@localhost"
        assert email["Date"]
        assert email.get_payload().replace("\r\n", "\n").strip() == "Numbers are up.\nSee you."
        assert email["Message-ID"] == rows[rcpt].provider_message_id
        assert email["Message-ID"].startswith(f"<sitemessage.{message.pk}.{rows[rcpt].pk}@")


def test_a_queue_whose_messenger_the_worker_lacks_ends_failed_and_reported(
    start_worker, registries
):
    from tests.faultsapp.helpers import manage
    from tests.test_messengers import MyMessenger, Outbox

    ghost = MyMessenger(Outbox())
    ghost.alias = "ghost"
    register_messenger_objects(ghost)  # here, not in the worker
    worker = start_worker(["messenger.ghost"], concurrency=1)
    assert wait_until(
        lambda: "queue messenger.ghost has no registered messenger 'ghost'" in worker.text(), 15
    )

    schedule_messages("boo", recipients("ghost", ["a", "b"]))

    rows = Dispatch.objects.filter(messenger="ghost")
    assert wait_until(
        lambda: set(rows.values_list("dispatch_status", flat=True)) == {Dispatch.Status.FAILED}, 30
    )
    errors = DispatchError.objects.filter(dispatch__messenger="ghost")
    assert {e.exc_type for e in errors} == {"UnknownMessengerError"}
    assert all("messenger 'ghost' is not registered in worker" in e.error_log for e in errors)
    report = manage("sitemessage_check_undelivered")
    assert report.returncode == 1
    assert "ghost: 2 failed" in report.stdout
    assert "UnknownMessengerError: messenger 'ghost' is not registered in worker" in report.stdout


def test_a_large_message_is_rendered_once_and_its_body_not_stored_per_recipient(
    smtp_server, start_worker
):
    sink, port = smtp_server
    start_worker(["messenger.smtp"], env={"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port)})
    text = "".join(f"line {i:07d} of a large newsletter\n" for i in range(30_000))  # ~1 MB
    addresses = [f"reader{i}@example.com" for i in range(20)]

    schedule_messages(EmailTextMessage("Newsletter", text), recipients("smtp", addresses))

    sink.wait_for(20, timeout=60)
    assert sorted(sink.recipients()) == sorted(addresses)
    for _, email in sink.messages:
        assert email.get_payload(decode=True).decode().replace("\r\n", "\n") == text
    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() == 20,
        timeout=30,
    )
    assert set(Dispatch.objects.values_list("message_cache", flat=True)) == {""}


def test_flower_and_the_log_name_each_batch_by_messenger_and_size_and_dispatches_keep_the_task(
    smtp_server, start_worker
):
    sink, port = smtp_server
    worker = start_worker(
        ["messenger.smtp"], env={"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port)}
    )
    addresses = [f"named{i}@example.com" for i in range(3)]
    schedule_messages(EmailTextMessage("Named", "Body text"), recipients("smtp", addresses))
    sink.wait_for(3, timeout=60)
    assert wait_until(
        lambda: (
            set(Dispatch.objects.values_list("dispatch_status", flat=True))
            == {Dispatch.Status.SENT}
        ),
        timeout=30,
    )
    [task_id] = set(Dispatch.objects.values_list("task_id", flat=True))
    assert len(task_id) == 36  # a Celery task id (uuid4)
    assert wait_until(
        lambda: f"dispatcher.send_dispatches[smtp][{task_id}]" in worker.text(), timeout=10
    )
    log = worker.text()
    assert not any(address in log for address in addresses)
    assert "Body text" not in log


def test_a_published_batch_carries_the_messenger_and_its_size_for_flower_not_addresses():
    from celery import current_app

    from tests.support import purge

    purge(["messenger.smtp"])
    schedule_messages(
        EmailTextMessage("Unread", "Secret body"),
        recipients("smtp", ["one@example.com", "two@example.com"]),
    )
    with current_app.connection_for_read() as conn:
        channel: Any = conn.default_channel
        raw = None
        for _ in range(50):
            raw = channel.basic_get("messenger.smtp", no_ack=True)
            if raw is not None:
                break
            time.sleep(0.1)
    assert raw is not None
    assert raw.headers["shadow"] == "dispatcher.send_dispatches[smtp]"
    assert raw.headers["argsrepr"] == "('smtp', <2 dispatch ids>)"
    body = raw.body if isinstance(raw.body, str) else raw.body.decode()  # RabbitMQ: str
    everything = repr(raw.headers) + body
    assert "example.com" not in everything and "Secret body" not in everything


def test_workers_by_queue_names_the_live_workers_of_each_queue(start_worker):
    from workers.broker import workers_by_queue

    worker = start_worker(["messenger.smtp", "messenger.smtp.urgent"], concurrency=1)
    node = worker.name.replace("%h", socket.gethostname())
    serving = workers_by_queue(timeout=2.0)
    assert serving is not None
    assert node in serving["messenger.smtp"] and node in serving["messenger.smtp.urgent"]
    worker.stop()
    after = workers_by_queue(timeout=0.5)
    assert after is not None and node not in after.get("messenger.smtp", [])


def test_one_recipient_calls_made_as_fast_as_possible_arrive_exactly_once(
    smtp_server, start_worker
):
    """The common case: a stream of one-recipient messages while workers deliver. With a Redis
    broker most calls publish no task (a doorbell waits) and the answering worker claims
    their rows; every e-mail still arrives once."""
    sink, port = smtp_server
    worker = start_worker(
        ["messenger.smtp"], env={"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port)}
    )
    addresses = [f"single{i}@example.com" for i in range(400)]
    for address in addresses:
        schedule_messages(EmailTextMessage("One", "For you."), recipients("smtp", address))
    sink.wait_for(400, timeout=120)
    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() == 400,
        timeout=30,
    )
    assert sorted(sink.recipients()) == sorted(addresses)
    tasks_run = worker.text().count(" received")
    print(f"\n400 one-recipient calls: {tasks_run} delivery tasks")
    if broker._bells() is not None:
        assert tasks_run < 400
