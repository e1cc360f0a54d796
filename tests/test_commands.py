"""The management commands, through call_command and as `manage.py` subprocesses: what they
print, what they change and publish (read back from the real broker), their exit codes, their
--help, and their progress (a tqdm bar on a pseudo-terminal, plain lines through a pipe)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from datetime import datetime, timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from kombu.exceptions import OperationalError

from dispatcher.models import Dispatch, Message
from dispatcher.validation import MAX_PRIORITY
from tests.faultsapp.helpers import drain, make_dispatch, manage, published_ids
from tests.support import ROOT, free_port, purge, worker_env
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


# Every command: --help, failures, progress


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (
            "sitemessage_check_undelivered",
            [
                "Reports undelivered dispatches (failed ones, and ones stuck past their lease",
                "Exits 0 when nothing is undelivered, 1 when something is",
                "--to ADDRESS [ADDRESS ...] e-mail the report to these addresses",
            ],
        ),
        (
            "sitemessage_cleanup",
            [
                "Deletes sent dispatches",
                "Exits 1 when the database fails",
                "--ago DAYS only dispatches sent at least this many days ago",
                "--dispatches-only, --dispatches_only delete the dispatches only",
            ],
        ),
        (
            "sitemessage_probe",
            [
                "Sends one test message through a messenger now",
                "Exits 1 when the messenger is unknown",
                "alias alias of a registered messenger",
                "--to ADDRESS address to send the test message to",
                "--text TEXT text of the test message",
            ],
        ),
        (
            "sitemessage_send_scheduled",
            [
                "Runs the sweep now, as beat does",
                "Exits 1 when the broker or the database fails",
                "--priority N only publish dispatches of messages with this priority",
            ],
        ),
    ],
)
def test_help_says_what_the_command_does_and_what_each_argument_means(command, says):
    done = manage(command, "--help")

    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps to the terminal's width
    assert text.startswith(f"usage: manage.py {command} ")
    for phrase in says:
        assert phrase in text


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ("sitemessage_check_undelivered", "cannot read the dispatches: no such table"),
        ("sitemessage_cleanup", "cleanup failed on the database: no such table"),
        ("sitemessage_send_scheduled", "the sweep failed on the database: no such table"),
    ],
)
def test_a_database_without_the_tables_exits_1_with_the_reason(tmp_path, queue, command, error):
    # A database that was never migrated: every query the command makes fails.
    done = manage(command, env={"DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}"})

    assert done.returncode == 1
    assert error in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("command", "args", "error"),
    [
        ("sitemessage_cleanup", ["--ago", "-1"], "ago must be a number of days, 0 or more"),
        ("sitemessage_probe", ["nosuchmessenger"], "nosuchmessenger"),
        ("sitemessage_probe", ["smtp"], "smtp needs an address: pass --to"),
    ],
)
def test_bad_input_raises_command_error(command, args, error):
    with pytest.raises(CommandError, match=error):
        call_command(command, *args, stdout=io.StringIO(), stderr=io.StringIO())


def sent_rows(count: int) -> None:
    """``count`` SENT dispatches of one message, for the cleanup to work through."""
    message = make_dispatch(Status.SENT).message
    Dispatch.objects.bulk_create(
        Dispatch(message=message, address=f"r{n}@example.com", dispatch_status=Status.SENT)
        for n in range(1, count)
    )


def progress_lines(stderr: str, what: str) -> list[str]:
    """The plain progress lines among what a command wrote to stderr (the test apps warn
    there too)."""
    return [line for line in stderr.splitlines() if line.startswith(f"{what}: ")]


def in_terminal(*args: str) -> tuple[int, str]:
    """Runs ``manage.py ARGS`` on the test database with stdout and stderr on a pseudo-terminal
    of 120 columns; returns its exit status and everything it wrote there."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=ROOT, env=worker_env(), stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
    )  # fmt: skip
    os.close(secondary)
    output = bytearray()
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        output += data
    os.close(primary)
    return proc.wait(60), output.decode(errors="replace")


@pytest.mark.django_db(transaction=True)
def test_cleanup_shows_a_progress_bar_in_a_terminal():
    sent_rows(1200)  # three chunks of DELETE_CHUNK (500)

    status, output = in_terminal("sitemessage_cleanup")

    assert status == 0, output
    assert "\r" in output  # the bar redraws itself in place
    assert "deleting:  42%|" in output and "500/1200" in output  # after the first chunk
    assert "deleting: 100%|" in output and "1200/1200" in output
    assert "dispatches/s]" in output
    assert "Deleted 1200 dispatches and 1 messages." in output
    assert not Dispatch.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_cleanup_writes_plain_progress_lines_into_a_pipe():
    sent_rows(1200)

    done = manage("sitemessage_cleanup")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [  # the report is unchanged
        "Cleaning up dispatches and messages ...",
        "Deleted 1200 dispatches and 1 messages.",
        "Cleanup done.",
    ]
    # The first chunk at once, then one line per LOG_EVERY seconds, and the last one.
    lines = progress_lines(done.stderr, "deleting")
    assert lines[0] == "deleting: 500 of 1200 dispatches (42%)"
    assert lines[-1] == "deleting: 1200 of 1200 dispatches (100%)"
    assert "\r" not in done.stderr and "|" not in done.stderr


@pytest.mark.django_db(transaction=True)
def test_cleanup_at_verbosity_0_shows_no_progress():
    sent_rows(600)

    done = manage("sitemessage_cleanup", "-v", "0")
    status, output = in_terminal("sitemessage_cleanup", "-v", "0")

    assert done.returncode == status == 0
    assert progress_lines(done.stderr, "deleting") == []
    assert "%" not in output and "deleting" not in output


@pytest.mark.django_db(transaction=True)
def test_send_scheduled_shows_the_sweep_steps(queue):
    due = make_dispatch(Status.ERROR, next_attempt_at=past())

    piped = manage("sitemessage_send_scheduled")
    status, output = in_terminal("sitemessage_send_scheduled")

    assert piped.returncode == status == 0
    assert progress_lines(piped.stderr, "sweep") == [
        "sweep: 1 of 5 steps (20%)",
        "sweep: 5 of 5 steps (100%)",
    ]
    assert "sweep: 100%|" in output and "5/5" in output and "\r" in output
    assert published_ids(drain(queue)) == [due.pk]


@pytest.mark.django_db(transaction=True)
def test_check_undelivered_shows_its_progress_per_messenger():
    undelivered_rows()  # two messengers

    piped = manage("sitemessage_check_undelivered")
    status, output = in_terminal("sitemessage_check_undelivered")

    assert piped.returncode == status == 1
    assert progress_lines(piped.stderr, "reading") == [
        "reading: 1 of 2 messengers (50%)",
        "reading: 2 of 2 messengers (100%)",
    ]
    assert "reading: 100%|" in output and "2/2" in output
    assert "Undelivered dispatches count: 3." in output
