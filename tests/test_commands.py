"""The management commands, through call_command and as `manage.py` subprocesses: what they
print, what they change and publish (read back from the real broker), and their exit codes."""

from __future__ import annotations

import io
from datetime import datetime, timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from kombu.exceptions import OperationalError

from dispatcher.models import Dispatch, Message
from dispatcher.validation import MAX_PRIORITY
from tests.faultsapp.helpers import drain, make_dispatch, manage, published_ids
from tests.support import free_port, purge
from workers.app import app

Status = Dispatch.Status
QUEUE = "messenger.smtp"


def run(command: str, *args: str) -> tuple[str, CommandError | None]:
    out = io.StringIO()
    try:
        call_command(command, *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


def past(seconds: float = 60) -> datetime:
    return timezone.now() - timedelta(seconds=seconds)


@pytest.fixture
def queue():
    purge([QUEUE])
    yield QUEUE
    purge([QUEUE])


# sitemessage_send_scheduled


@pytest.mark.django_db
def test_send_scheduled_publishes_due_and_stale_rows_and_gives_back_expired_leases(queue):
    stale = make_dispatch(Status.PENDING, retry_count=0, next_attempt_at=past())
    waiting = make_dispatch(Status.PENDING, retry_count=0, next_attempt_at=past(-600))
    due = make_dispatch(Status.ERROR, next_attempt_at=past())
    later = make_dispatch(Status.ERROR, next_attempt_at=past(-600))
    dead = make_dispatch(
        Status.PROCESSING, lease_owner="gone:1:x", lease_expires_at=past(), next_attempt_at=None
    )
    sent = make_dispatch(Status.SENT)

    out, error = run("sitemessage_send_scheduled")

    assert error is None
    assert "1 given back for a retry, 0 failed" in out and "3 dispatches published" in out
    assert published_ids(drain(queue)) == sorted([stale.pk, due.pk, dead.pk])
    statuses = dict(Dispatch.objects.values_list("pk", "dispatch_status"))
    assert statuses[dead.pk] == statuses[due.pk] == statuses[stale.pk] == Status.PENDING
    assert (statuses[waiting.pk], statuses[later.pk], statuses[sent.pk]) == (
        Status.PENDING,
        Status.ERROR,
        Status.SENT,
    )
    assert Dispatch.objects.get(pk=dead.pk).errors.get().exc_type == "LeaseExpired"


@pytest.mark.django_db
def test_send_scheduled_with_priority_publishes_only_that_priority(queue):
    low = make_dispatch(Status.ERROR, priority=1, next_attempt_at=past())
    high = make_dispatch(Status.ERROR, priority=5, next_attempt_at=past())

    out, error = run("sitemessage_send_scheduled", "--priority", "5")

    assert error is None and "1 dispatches of priority 5 published" in out
    assert published_ids(drain(queue)) == [high.pk]
    assert Dispatch.objects.get(pk=low.pk).dispatch_status == Status.ERROR


@pytest.mark.django_db(transaction=True)
def test_send_scheduled_subprocess_exits_0_and_publishes(queue):
    due = make_dispatch(Status.ERROR, next_attempt_at=past())

    done = manage("sitemessage_send_scheduled")

    assert done.returncode == 0, done.stderr
    assert "1 dispatches published" in done.stdout
    assert published_ids(drain(queue)) == [due.pk]


@pytest.mark.django_db(transaction=True)
def test_send_scheduled_with_the_broker_down_exits_1_and_changes_nothing(queue):
    due = make_dispatch(Status.ERROR, next_attempt_at=past())
    before = Dispatch.objects.get(pk=due.pk)

    done = manage(
        "sitemessage_send_scheduled",
        env={"CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/13"},
    )

    assert done.returncode == 1
    assert "unreachable" in done.stderr and "stay in the database" in done.stderr
    assert "Traceback" not in done.stderr
    after = Dispatch.objects.get(pk=due.pk)
    assert (after.dispatch_status, after.next_attempt_at) == (
        before.dispatch_status,
        before.next_attempt_at,
    )
    assert drain(queue) == []


@pytest.mark.django_db
def test_send_scheduled_fails_when_publishing_fails_after_the_broker_check(
    queue, monkeypatch, caplog
):
    def broker_gone(*args, **kwargs):
        # The broker dying between the check and the publish cannot be timed with a real
        # one: the publish raises what kombu raises then.
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(app, "send_task", broker_gone)
    row = make_dispatch(Status.ERROR, next_attempt_at=past())

    out, error = run("sitemessage_send_scheduled")

    assert "0 dispatches published" in out
    assert isinstance(error, CommandError)
    assert str(error).startswith("publishing failed for 1 dispatches")
    assert "could not publish 1 smtp dispatches" in caplog.text
    assert "Connection refused" in caplog.text
    row.refresh_from_db()  # due again at the next sweep, not after REPUBLISH_AFTER
    assert row.dispatch_status == Status.PENDING
    assert row.next_attempt_at is not None and row.next_attempt_at <= timezone.now()


# sitemessage_check_undelivered


def undelivered_rows() -> dict[str, Dispatch]:
    return {
        "failed": make_dispatch(
            Status.FAILED, errors=["SMTP 451 try later", "SMTP 550 5.1.1 no such user"]
        ),
        "failed_other": make_dispatch(
            Status.FAILED, messenger="recorder", errors=["recorder refused it"]
        ),
        "stuck": make_dispatch(Status.PROCESSING, lease_owner="gone:1:x", lease_expires_at=past()),
        # Not undelivered: a lease still running, a retry still to come, a sent one.
        "running": make_dispatch(
            Status.PROCESSING, lease_owner="alive:2:y", lease_expires_at=past(-600)
        ),
        "retrying": make_dispatch(Status.ERROR, errors=["SMTP 421 closing"]),
        "sent": make_dispatch(Status.SENT),
    }


@pytest.mark.django_db
def test_check_undelivered_with_nothing_undelivered_exits_0():
    make_dispatch(Status.SENT)
    make_dispatch(Status.ERROR, errors=["SMTP 451 try later"])

    out, error = run("sitemessage_check_undelivered")

    assert error is None
    assert out.strip() == "Undelivered dispatches count: 0."  # django-sitemessage's line


@pytest.mark.django_db
def test_check_undelivered_reports_failed_and_expired_leases_per_messenger():
    rows = undelivered_rows()

    out, error = run("sitemessage_check_undelivered")

    assert isinstance(error, CommandError) and str(error) == "3 undelivered dispatches"
    assert out.splitlines()[0] == "Undelivered dispatches count: 3."
    assert "smtp: 1 failed, 1 stuck past their lease" in out
    assert "recorder: 1 failed, 0 stuck past their lease" in out
    assert f"dispatch {rows['failed'].pk}, attempt 2" in out
    assert "SMTP 550 5.1.1 no such user" in out and "451" not in out  # the most recent only
    assert "recorder refused it" in out


@pytest.mark.django_db
def test_check_undelivered_emails_the_report(smtp_server, settings):
    sink, port = smtp_server
    settings.EMAIL_PORT = port
    undelivered_rows()

    out, error = run(
        "sitemessage_check_undelivered", "--to", "ops@example.com", "--to", "dev@example.com"
    )

    assert isinstance(error, CommandError) and str(error) == "3 undelivered dispatches"
    assert "Report e-mailed to ops@example.com, dev@example.com." in out
    assert sorted(sink.recipients()) == ["dev@example.com", "ops@example.com"]
    email = sink.messages[0][1]
    assert email["Subject"] == "[sitemessage] 3 undelivered dispatches"
    body = email.get_payload().replace("\r\n", "\n")
    assert "smtp: 1 failed, 1 stuck past their lease" in body
    assert "SMTP 550 5.1.1 no such user" in body
    report = Message.objects.get(priority=MAX_PRIORITY)
    assert set(report.dispatches.values_list("dispatch_status", flat=True)) == {Status.SENT}


@pytest.mark.django_db
def test_check_undelivered_says_when_the_report_cannot_be_sent(settings):
    settings.EMAIL_PORT = free_port()  # nothing listens there
    undelivered_rows()

    out, error = run("sitemessage_check_undelivered", "--to", "ops@example.com")

    assert isinstance(error, CommandError)
    assert str(error).startswith("sending the report failed for 1 of 1 addresses")
    assert "cannot connect to SMTP server" in str(error)
    assert "Report e-mailed" not in out
    # The report is stored as an ordinary dispatch: the sweep retries it.
    [report] = Dispatch.objects.filter(address="ops@example.com")
    assert report.dispatch_status == Status.ERROR and report.next_attempt_at is not None


@pytest.mark.django_db
def test_check_undelivered_says_when_the_server_refuses_the_address(smtp_server, settings):
    sink, port = smtp_server
    settings.EMAIL_PORT = port
    sink.reject["ops@example.com"] = "550 5.1.1 no such user"
    undelivered_rows()

    _, error = run("sitemessage_check_undelivered", "--to", "ops@example.com", "dev@example.com")

    assert isinstance(error, CommandError)
    assert "failed for 1 of 2 addresses" in str(error) and "550 5.1.1" in str(error)
    assert sink.recipients() == ["dev@example.com"]


@pytest.mark.django_db
def test_check_undelivered_refuses_a_bad_address_before_storing_anything():
    undelivered_rows()
    count = Dispatch.objects.count()

    _, error = run("sitemessage_check_undelivered", "--to", "not an address")

    assert isinstance(error, CommandError)
    assert "cannot send the report" in str(error) and "not a valid e-mail address" in str(error)
    assert Dispatch.objects.count() == count


@pytest.mark.django_db(transaction=True)
def test_check_undelivered_subprocess_exit_codes(smtp_server):
    sink, port = smtp_server
    make_dispatch(Status.SENT)

    clean = manage("sitemessage_check_undelivered")
    assert (clean.returncode, clean.stdout.strip()) == (0, "Undelivered dispatches count: 0.")

    make_dispatch(Status.FAILED, errors=["SMTP 550 5.1.1 no such user"])
    dirty = manage(
        "sitemessage_check_undelivered", "--to", "ops@example.com", env={"EMAIL_PORT": str(port)}
    )
    assert dirty.returncode == 1, dirty.stderr
    assert "smtp: 1 failed, 0 stuck" in dirty.stdout
    assert "1 undelivered dispatches" in dirty.stderr and "Traceback" not in dirty.stderr
    assert sink.recipients() == ["ops@example.com"]


@pytest.mark.django_db
def test_check_undelivered_without_to_emails_the_admins(smtp_server, settings):
    sink, port = smtp_server
    settings.EMAIL_PORT = port
    settings.ADMINS = [("Ops", "ops@example.com")]
    undelivered_rows()

    out, error = run("sitemessage_check_undelivered")

    assert isinstance(error, CommandError) and str(error) == "3 undelivered dispatches"
    assert "Report e-mailed to ops@example.com." in out
    assert sink.recipients() == ["ops@example.com"]


# sitemessage_cleanup


def sent_days_ago(days: float) -> Dispatch:
    when = timezone.now() - timedelta(days=days)
    return make_dispatch(Status.SENT, sent_at=when, time_dispatched=when)


@pytest.mark.django_db
def test_cleanup_deletes_the_sent_dispatches_older_than_ago_and_their_messages():
    old, recent = sent_days_ago(10), sent_days_ago(1)
    pending = make_dispatch(Status.PENDING)

    out, error = run("sitemessage_cleanup", "--ago", "5")

    assert error is None
    assert out.splitlines() == [
        "Cleaning up dispatches and messages sent 5 days ago ...",
        "Deleted 1 dispatches and 1 messages.",
        "Cleanup done.",
    ]
    assert set(Dispatch.objects.values_list("pk", flat=True)) == {recent.pk, pending.pk}
    assert not Message.objects.filter(pk=old.message_id).exists()


@pytest.mark.django_db
def test_cleanup_dispatches_only_keeps_the_messages():
    rows = [sent_days_ago(10), sent_days_ago(0)]

    out, error = run("sitemessage_cleanup", "--dispatches_only")

    assert error is None and out.splitlines()[0] == "Cleaning up dispatches ..."
    assert not Dispatch.objects.exists()
    assert Message.objects.filter(pk__in=[r.message_id for r in rows]).count() == 2


@pytest.mark.django_db(transaction=True)
def test_cleanup_subprocess_exit_codes():
    sent_days_ago(10)

    done = manage("sitemessage_cleanup")
    assert done.returncode == 0, done.stderr
    assert "Deleted 1 dispatches and 1 messages." in done.stdout
    assert not Dispatch.objects.exists()

    bad = manage("sitemessage_cleanup", "--ago", "-1")
    assert bad.returncode == 1 and "0 or more" in bad.stderr and "Traceback" not in bad.stderr
