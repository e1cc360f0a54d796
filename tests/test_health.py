"""``manage.py sitemessage_health``, run as a container health check would: a real worker up, no
worker, a dispatch stuck past its lease, a broker that does not answer.

The test settings register three messengers (smtp from SITEMESSAGE_MESSENGERS, recorder and
mymessenger from the test apps), so a healthy deployment has a worker on each of their queues.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from dispatcher.models import Dispatch
from tests.faultsapp.helpers import make_dispatch, manage
from tests.support import free_port

pytestmark = [pytest.mark.django_db(transaction=True)]

QUEUES = ["messenger.mymessenger", "messenger.recorder", "messenger.smtp"]
URGENT = {"SITEMESSAGE_URGENT_PRIORITY": "5"}
#: What registering tests.seedapp's messenger (it has no send()) logs in every process.
SEED_WARNING = "messenger MyMessenger does not implement send("


def problems(result) -> list[str]:
    """The command's lines on stderr (without the seed app's registration warning)."""
    return [line for line in result.stderr.splitlines() if not line.startswith(SEED_WARNING)]


@pytest.mark.e2e
def test_healthy_with_a_worker_on_every_queue_and_both_lanes(start_worker):
    start_worker(QUEUES, concurrency=1)  # it consumes the urgent lanes too

    for env in (None, URGENT):
        health = manage("sitemessage_health", "--timeout", "2", env=env)
        assert (health.returncode, problems(health)) == (0, [])
        expected = 6 if env else 3
        assert health.stdout == (
            f"OK: {expected} queues have a worker, no dispatch is stuck past its lease\n"
        )


@pytest.mark.e2e
def test_a_queue_without_a_worker_is_named(start_worker):
    start_worker(["messenger.smtp", "messenger.mymessenger"], concurrency=1)

    health = manage("sitemessage_health", env=URGENT)

    assert health.returncode == 1
    assert health.stdout == ""
    assert problems(health) == [
        "queue messenger.recorder: no worker consumes it (none answered within 1 s)",
        "queue messenger.recorder.urgent: no worker consumes it (none answered within 1 s)",
    ]


@pytest.mark.e2e
def test_no_worker_at_all_fails_with_one_line_per_queue():
    health = manage("sitemessage_health", "--timeout", "0.5")

    assert health.returncode == 1
    assert problems(health) == [
        f"queue {queue}: no worker consumes it (none answered within 0.5 s)" for queue in QUEUES
    ]


@pytest.mark.e2e
def test_a_dispatch_stuck_past_its_lease_fails_even_with_workers_up(start_worker):
    start_worker(QUEUES, concurrency=1)
    now = timezone.now()
    make_dispatch(Dispatch.Status.PROCESSING, lease_expires_at=now - timedelta(hours=1))
    make_dispatch(Dispatch.Status.PROCESSING, lease_expires_at=now - timedelta(minutes=2))
    # Expired a moment ago: the next sweep gives it back, so it is no problem yet.
    make_dispatch(Dispatch.Status.PROCESSING, lease_expires_at=now - timedelta(seconds=1))
    make_dispatch(Dispatch.Status.PROCESSING, lease_expires_at=now + timedelta(seconds=30))

    health = manage("sitemessage_health", "--timeout", "2")

    assert health.returncode == 1
    [line] = problems(health)
    assert line.startswith("messenger smtp: 2 dispatches stuck past their lease (the oldest ")
    assert 3595 <= int(line.split("expired ")[1].split(" s ago")[0]) <= 3700
    assert line.endswith("s ago; is beat running the sweep?)")

    # A grace longer than every expiry: nothing is stuck.
    assert manage("sitemessage_health", "--timeout", "2", "--grace", "7200").returncode == 0
    [line] = problems(manage("sitemessage_health", "--timeout", "2", "--grace", "0"))
    assert line.startswith("messenger smtp: 3 dispatches stuck past their lease")


def test_a_broker_that_does_not_answer_is_a_problem():
    port = free_port()
    started = time.monotonic()
    health = manage(
        "sitemessage_health",
        "--timeout",
        "0.5",
        env={"CELERY_BROKER_URL": f"redis://:secret@127.0.0.1:{port}/13"},
    )

    assert time.monotonic() - started < 5  # inspect alone would retry the connection for 7 s
    assert health.returncode == 1
    [line] = problems(health)
    assert line.startswith(f"broker redis://:**@127.0.0.1:{port}/13 unreachable (")
    assert line.endswith("): cannot ask the workers which queues they consume")
    assert "secret" not in health.stderr


def test_help_says_what_it_checks_and_the_exit_status():
    helped = manage("sitemessage_health", "--help")
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    assert "has a live worker" in text
    assert "Exit status: 0 healthy, 1 a problem" in text
    assert "--timeout SECONDS" in text and "--grace SECONDS" in text

    bad = manage("sitemessage_health", "--timeout", "soon")
    assert bad.returncode == 2
    assert "not a number of seconds: 'soon'" in bad.stderr
