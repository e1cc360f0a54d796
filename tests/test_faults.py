"""Fault injection with real worker processes, a real broker and a real SMTP server: killed
workers, a broker that loses its queues, an SMTP server that goes away or refuses recipients,
duplicate tasks, a locked database and a message that cannot render.

Timings are shrunk through the settings (leases of seconds, backoff under a second) and the
sweep is called from the test process instead of waiting for beat. Each test prints its
figures: scheduled, delivered, duplicates, lost, failed, seconds.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.db import connection
from kombu import Queue

from dispatcher import toolbox
from dispatcher.models import Dispatch, DispatchError
from dispatcher.sweep import sweep
from sitemessage.messages.email import EmailTextMessage
from sitemessage.toolbox import recipients
from tests.faultsapp.sitemessages import PoisonMessage
from tests.support import SMTPSink, purge, wait_until
from workers import broker
from workers.app import app
from workers.queues import DEFAULT_QUEUE

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

Status = Dispatch.Status
QUEUE = "messenger.smtp"
#: Retries come back within a second in these tests.
FAST_RETRIES = {"SITEMESSAGE_RETRY_BACKOFF": "0.2", "SITEMESSAGE_RETRY_BACKOFF_MAX": "1"}


def addresses(count: int) -> list[str]:
    return [f"user{i}@example.com" for i in range(count)]


def schedule(to: list[str], messages: object = None, publish: bool = True) -> None:
    toolbox.schedule(
        messages or EmailTextMessage("Fault test", "Hello."),
        recipients("smtp", to),
        publish=publish,
    )


def statuses() -> Counter[int]:
    return Counter(Dispatch.objects.values_list("dispatch_status", flat=True))


def all_final(count: int) -> bool:
    counts = statuses()
    return counts[Status.SENT] + counts[Status.FAILED] == count


def sweep_until(done: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """Runs the sweep, as beat would, until ``done()`` or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        sweep()
        time.sleep(interval)
    return True


def report(name: str, sink: SMTPSink, scheduled: list[str], started: float) -> dict[str, int]:
    """Prints and returns the figures of a fault test."""
    received = Counter(sink.recipients())
    failed = set(
        Dispatch.objects.filter(dispatch_status=Status.FAILED).values_list("address", flat=True)
    )
    figures = {
        "scheduled": len(scheduled),
        "delivered": len(set(scheduled) & set(received)),
        "duplicates": sum(n - 1 for n in received.values()),
        "lost": len(set(scheduled) - set(received) - failed),
        "failed": len(failed),
    }
    seconds = time.monotonic() - started
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()) + f", {seconds:.1f}s")
    return figures


def sent_exactly_once(sink: SMTPSink, to: list[str]) -> bool:
    return sorted(sink.recipients()) == sorted(to)


def test_workers_killed_mid_delivery_recover_within_a_minute(smtp_server, start_worker, start_beat):
    """SIGKILL a whole worker (main process and pool) during 2,000 e-mails, with the default
    lease and sweep interval: a replacement worker and beat deliver the rest within 60 s of
    the kill (the redelivered tasks take their rows back at once where the broker requeues
    them, RabbitMQ; otherwise the short renewed lease expires and the sweep frees them, Redis),
    with at most one duplicate per killed sending process."""
    sink, port = smtp_server
    env = {"EMAIL_PORT": str(port)}
    first = start_worker([QUEUE], concurrency=2, env=env)
    to = addresses(2000)
    started = time.monotonic()

    schedule(to)
    assert wait_until(lambda: len(sink.messages) >= 500, timeout=60), "delivery did not start"
    children = first.children()
    for pid in [first.proc.pid, *children]:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    first.proc.wait(10)
    assert wait_until(lambda: not any(_alive(pid) for pid in children), timeout=10)
    stuck = Dispatch.objects.filter(dispatch_status=Status.PROCESSING)
    stuck_ids = set(stuck.values_list("pk", flat=True))
    # The killed processes that were in the middle of a batch: each may have sent one e-mail
    # whose outcome it could not record.
    sending = {owner.split(":")[1] for owner in stuck.values_list("lease_owner", flat=True)}
    assert sending <= {str(pid) for pid in children}
    assert len(sink.messages) < len(to), "everything was delivered before the kill"

    second = start_worker([QUEUE, DEFAULT_QUEUE], concurrency=2, env=env, purge_first=False)
    beat = start_beat(env)
    assert wait_until(lambda: statuses()[Status.SENT] == len(to), timeout=70, interval=0.5), (
        f"{statuses()}\n{beat.text()[-2000:]}\n{second.text()[-3000:]}"
    )
    recovered = time.monotonic() - killed_at

    figures = report("killed workers", sink, to, started)
    print(f"killed processes: {len(children) + 1}, of which sending: {len(sending)}, "
          f"{len(stuck_ids)} dispatches held; all sent {recovered:.1f}s after the kill")  # fmt: skip
    assert recovered < 60
    assert figures["lost"] == 0 and figures["failed"] == 0
    assert figures["delivered"] == len(to)
    assert figures["duplicates"] <= len(sending)
    released = DispatchError.objects.filter(exc_type__in=["LeaseExpired", "WorkerLost"])
    assert stuck_ids <= set(released.values_list("dispatch_id", flat=True))


def test_a_killed_pool_process_s_batch_is_taken_back_by_its_redelivered_task(
    smtp_server, start_worker
):
    """SIGKILL one pool process mid-batch: Celery delivers its task again (reject on worker
    lost) with the same id, and that run takes the rows back at once, without waiting for the
    lease (here 60 s) and without any sweep."""
    sink, port = smtp_server
    env = {"EMAIL_PORT": str(port), "SITEMESSAGE_LEASE_SECONDS": "60"}
    worker = start_worker([QUEUE], concurrency=1, env=env)
    to = addresses(1500)

    schedule(to)
    assert wait_until(lambda: len(sink.messages) >= 150, timeout=60), "delivery did not start"
    [child] = worker.children()
    holding = Dispatch.objects.filter(
        dispatch_status=Status.PROCESSING, lease_owner__contains=f":{child}:"
    )
    # Mid-batch, not in the moment between two (a loaded machine can land there).
    assert wait_until(holding.exists, timeout=10, interval=0.001), "the child holds no batch"
    os.kill(child, signal.SIGKILL)
    killed_at = time.monotonic()
    held = set(
        Dispatch.objects.filter(
            dispatch_status=Status.PROCESSING, lease_owner__contains=f":{child}:"
        ).values_list("pk", flat=True)
    )

    assert wait_until(lambda: statuses()[Status.SENT] == len(to), timeout=30)
    recovered = time.monotonic() - killed_at
    figures = report("killed pool process", sink, to, time.monotonic() - recovered)
    print(f"{len(held)} dispatches held by the killed process; all sent {recovered:.1f}s later")
    assert recovered < 30  # half the lease: taken back, not expired
    assert figures["delivered"] == len(to) and figures["duplicates"] <= 1
    taken_back = DispatchError.objects.filter(exc_type="WorkerLost")
    assert held and held <= set(taken_back.values_list("dispatch_id", flat=True))


def _alive(pid: int) -> bool:
    """Whether a process still runs (a zombie waiting for init to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def lose_queued_tasks() -> None:
    """What a broker restarted without its data does: Redis loses every key, RabbitMQ the queue."""
    if urlsplit(app.conf.broker_url).scheme == "redis":
        import redis

        redis.Redis.from_url(app.conf.broker_url).flushdb()  # only the broker's own database
    else:
        with app.connection_for_write() as conn:
            Queue(QUEUE, channel=conn.default_channel).delete()


def test_broker_that_lost_its_queues(smtp_server, start_worker, settings):
    sink, port = smtp_server
    settings.SITEMESSAGE_REPUBLISH_AFTER = 1
    purge([QUEUE])
    to = addresses(2000)
    started = time.monotonic()

    schedule(to)
    assert queued(QUEUE) == 20  # 2,000 ids in batches of 100, waiting for a worker
    lose_queued_tasks()
    assert queued(QUEUE) == 0
    start_worker([QUEUE], concurrency=2, env={"EMAIL_PORT": str(port)})
    assert len(sink.messages) == 0

    assert sweep_until(lambda: statuses()[Status.SENT] == len(to), timeout=60, interval=1)

    figures = report("broker lost its queues", sink, to, started)
    assert figures["delivered"] == len(to) and figures["lost"] == 0
    assert figures["duplicates"] == 0 and figures["failed"] == 0
    assert sent_exactly_once(sink, to)


def queued(name: str) -> int:
    with app.connection_for_write() as conn:
        declared: Any = Queue(name, channel=conn.default_channel).queue_declare()
        return int(declared.message_count)


def test_smtp_server_down_then_back(start_worker, smtp_servers):
    server = smtp_servers()
    sink = server.sink
    env = {"EMAIL_PORT": str(server.port), "EMAIL_TIMEOUT": "2", **FAST_RETRIES}
    start_worker([QUEUE], concurrency=2, env=env)  # warm: connected to the server
    to = addresses(1000)
    server.stop()
    started = time.monotonic()
    schedule(to)
    retried = Dispatch.objects.filter(retry_count__gte=2)
    assert sweep_until(retried.exists, timeout=30), "no retry while the server was down"
    down = time.monotonic() - started
    assert len(sink.messages) == 0
    server.start()
    assert sweep_until(lambda: statuses()[Status.SENT] == len(to), timeout=60)

    figures = report("SMTP server down", sink, to, started)
    attempts = Counter(Dispatch.objects.values_list("retry_count", flat=True))
    print(f"down {down:.1f}s; dispatches per attempt count: {dict(sorted(attempts.items()))}")
    assert figures["delivered"] == len(to) and figures["lost"] == 0
    assert figures["failed"] == 0 and figures["duplicates"] == 0
    assert max(attempts) > 1
    errors = DispatchError.objects.all()
    assert errors.exists()
    assert set(errors.values_list("exc_type", flat=True)) == {"TemporaryDeliveryError"}


def test_permanent_rejection_fails_exactly_those_recipients(smtp_server, start_worker):
    sink, port = smtp_server
    to = addresses(500)
    rejected = to[::10]
    sink.reject.update(dict.fromkeys(rejected, "550 5.1.1 no such user"))
    start_worker([QUEUE], concurrency=2, env={"EMAIL_PORT": str(port), **FAST_RETRIES})
    started = time.monotonic()

    schedule(to)
    assert wait_until(lambda: all_final(len(to)), timeout=60)

    figures = report("550 for some recipients", sink, to, started)
    failed = Dispatch.objects.filter(dispatch_status=Status.FAILED)
    assert sorted(failed.values_list("address", flat=True)) == sorted(rejected)
    assert set(failed.values_list("retry_count", flat=True)) == {1}
    assert sorted(DispatchError.objects.values_list("dispatch__address", flat=True)) == sorted(
        rejected
    )
    assert all("550 5.1.1" in e for e in DispatchError.objects.values_list("error_log", flat=True))
    assert sent_exactly_once(sink, sorted(set(to) - set(rejected)))
    assert figures["lost"] == 0 and figures["duplicates"] == 0


CLAIMED = re.compile(r"smtp batch of \d+ ids: (\d+) claimed")


@pytest.mark.pg
def test_same_ids_enqueued_three_times_are_sent_once(smtp_server, start_worker):
    sink, port = smtp_server
    purge([QUEUE])
    to = addresses(1000)
    schedule(to, publish=False)
    ids = sorted(Dispatch.objects.values_list("pk", flat=True))
    for start in range(0, len(ids), 100):  # the three copies of a batch side by side
        for _ in range(3):
            broker.enqueue({"smtp": ids[start : start + 100]}, batch_size=100)
    assert queued(QUEUE) == 30
    started = time.monotonic()

    env = {"EMAIL_PORT": str(port)}
    workers = [start_worker([QUEUE], concurrency=1, env=env, purge_first=False) for _ in "ab"]

    def claims() -> list[list[int]]:
        return [[int(n) for n in CLAIMED.findall(w.text())] for w in workers]

    # Every row claimed once; a copy may claim rows waiting for another task (the doorbell
    # claim), and one whose claim filled its batch rings once more for the rest.
    assert wait_until(lambda: sum(map(sum, claims())) == len(to), timeout=60)
    assert wait_until(lambda: sum(len(c) for c in claims()) >= 30, timeout=60)
    per_worker = claims()
    print(
        f"\nbatches run per worker: {[len(c) for c in per_worker]}, rows claimed: {[sum(c) for c in per_worker]}"
    )
    assert all(per_worker), "one of the two workers did nothing"

    figures = report(f"ids enqueued 3 times ({connection.vendor})", sink, to, started)
    assert figures["delivered"] == len(to) and figures["duplicates"] == 0
    assert sent_exactly_once(sink, to)
    assert set(Dispatch.objects.values_list("retry_count", flat=True)) == {1}


@contextmanager
def database_locked() -> Iterator[None]:
    """Holds the write lock of the dispatch table from another connection."""
    if connection.vendor == "sqlite":
        lite = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None, timeout=30)
        lite.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            lite.execute("COMMIT")
            lite.close()
    elif connection.vendor == "postgresql":
        import psycopg

        s = connection.settings_dict
        with psycopg.connect(
            host=s["HOST"] or "127.0.0.1", port=s["PORT"] or 5432, user=s["USER"], dbname=s["NAME"]
        ) as other:
            # Blocks every write (and SELECT FOR UPDATE), lets plain reads through.
            other.execute("LOCK TABLE sitemessage_dispatch IN EXCLUSIVE MODE")
            yield
    else:
        pytest.skip(f"no way to lock a {connection.vendor} database here")


def test_database_locked_during_delivery(smtp_server, start_worker):
    sink, port = smtp_server
    worker = start_worker([QUEUE], concurrency=2, env={"EMAIL_PORT": str(port), **FAST_RETRIES})
    children = worker.children()
    to = addresses(1000)
    started = time.monotonic()

    schedule(to)
    assert wait_until(lambda: len(sink.messages) >= 200, timeout=60), "delivery did not start"
    with database_locked():
        sent_before, mails_before = statuses()[Status.SENT], len(sink.messages)
        time.sleep(2)
        sent_after, mails_after = statuses()[Status.SENT], len(sink.messages)
    assert wait_until(lambda: statuses()[Status.SENT] == len(to), timeout=60)

    figures = report("database locked for 2 s", sink, to, started)
    print(
        f"during the lock: {sent_after - sent_before} rows written, {mails_after - mails_before} e-mails sent"
    )
    assert sent_after == sent_before, "the lock did not hold the writers"
    assert worker.proc.poll() is None and worker.children() == children
    assert figures["delivered"] == len(to) and figures["lost"] == 0
    assert figures["duplicates"] == 0 and figures["failed"] == 0
    assert not DispatchError.objects.exists()


def test_poison_message_fails_after_its_retry_limit_without_blocking_others(
    smtp_server, start_worker
):
    sink, port = smtp_server
    start_worker([QUEUE], concurrency=2, env={"EMAIL_PORT": str(port), **FAST_RETRIES})
    to = addresses(50)
    started = time.monotonic()

    # One batch holds the dispatches of both messages.
    schedule(to, [PoisonMessage(), EmailTextMessage("Healthy", "Still delivered.")])
    poison = Dispatch.objects.filter(message__cls=PoisonMessage.alias)
    healthy = Dispatch.objects.exclude(message__cls=PoisonMessage.alias)
    assert wait_until(
        lambda: healthy.filter(dispatch_status=Status.SENT).count() == len(to), timeout=30
    )
    assert set(healthy.values_list("retry_count", flat=True)) == {1}
    assert sweep_until(lambda: all_final(2 * len(to)), timeout=60)
    time.sleep(1)
    after = sweep()

    figures = report("poison message", sink, to, started)
    limit = PoisonMessage.send_retry_limit
    assert after["published"] == 0 and statuses()[Status.FAILED] == len(to)
    assert set(poison.values_list("dispatch_status", "retry_count")) == {(Status.FAILED, limit)}
    errors = DispatchError.objects.filter(dispatch__in=poison)
    assert errors.count() == limit * len(to)
    assert set(errors.values_list("exc_type", flat=True)) == {"PoisonRenderError"}
    assert sent_exactly_once(sink, to)
    assert {email["Subject"] for _, email in sink.messages} == {"Healthy"}
    assert figures["delivered"] == len(to) and figures["duplicates"] == 0
