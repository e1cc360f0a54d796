"""The per-messenger rate limit shared by every worker process, kept in the real Redis."""

from __future__ import annotations

import bisect
import json
import threading
import time
import uuid

import pytest

from dispatcher import pipeline
from dispatcher.models import Dispatch
from dispatcher.ratelimit import LOCAL_REDIS, RateLimiter, redis_url
from messengers.base import seconds_per_send
from messengers.exceptions import MessengerConfigurationError
from messengers.registry import messenger_from_settings, register_messenger_objects
from sitemessage.messages.plain import PlainTextMessage
from sitemessage.toolbox import recipients, schedule_messages
from tests.faultsapp.helpers import manage
from tests.support import SMTPSink, wait_until
from tests.test_messengers import MyMessenger, Outbox


def max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    return max(bisect.bisect_left(times, t + window) - i for i, t in enumerate(times))


@pytest.mark.parametrize(
    ("rate", "seconds"), [("20/s", 0.05), ("30/m", 2.0), ("1.5/h", 2400.0), (" 4 / s ", 0.25)]
)
def test_rates_are_read_per_second_minute_or_hour(rate, seconds):
    assert seconds_per_send(rate) == pytest.approx(seconds)


def test_the_slots_live_on_the_broker_given_in_the_environment():
    # The README's promise, as a deployment sees it: only CELERY_BROKER_URL is set.
    broker = "redis://broker.example:6379/0"
    done = manage(
        "shell", "-v", "0", "-c", "from dispatcher.ratelimit import redis_url; print(redis_url())",
        env={"CELERY_BROKER_URL": broker},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == broker


@pytest.mark.parametrize(
    ("broker", "configured", "expected"),
    [
        ("redis://cache.internal:6380/3", None, "redis://cache.internal:6380/3"),
        ("rediss://:pw@cache.internal:6380/3", None, "rediss://:pw@cache.internal:6380/3"),
        ("amqp://guest:guest@127.0.0.1:5672//", None, LOCAL_REDIS),
        ("amqp://guest:guest@127.0.0.1:5672//", "redis://limits:6379/2", "redis://limits:6379/2"),
        ("redis://cache.internal:6380/3", "redis://limits:6379/2", "redis://limits:6379/2"),
    ],
)
def test_the_slots_live_on_the_configured_redis(
    broker, configured, expected, monkeypatch, settings
):
    monkeypatch.setenv("CELERY_BROKER_URL", broker)  # what Celery reads first
    settings.SITEMESSAGE_RATE_LIMIT_REDIS_URL = configured
    assert redis_url() == expected


@pytest.mark.parametrize("rate", ["20", "20/d", "0/s", "-1/s", "fast", ""])
def test_a_malformed_rate_is_refused_with_the_alias(rate, registries):
    with pytest.raises(MessengerConfigurationError, match=r"messenger 'smtp'.*not of the form"):
        messenger_from_settings("smtp", {"rate_limit": rate})
    messenger = MyMessenger(Outbox())
    messenger.rate_limit = rate
    with pytest.raises(MessengerConfigurationError, match="'mymessenger'"):
        register_messenger_objects(messenger)


def test_settings_override_the_class_rate():
    assert messenger_from_settings("smtp", {"rate_limit": "5/s"}).rate_limit == "5/s"
    assert messenger_from_settings("smtp", {}).rate_limit is None


def test_processes_share_one_schedule():
    """Two limiters (as in two worker processes) on one key: 21 slots at 50/s, spaced 20 ms.

    Only the server's slot times are exact; a thread sees its slot some time after it was
    taken (scheduling jitter on a loaded machine). So the test bounds what it observes from
    below, which jitter cannot break: the k-th slot taken is at least k intervals after the
    start, whichever thread took it. A burst fails at k=1, two unshared schedules (10 ms
    apart in all) at k=20.
    """
    alias = f"bench-{uuid.uuid4().hex[:8]}"
    taken: list[float] = []

    def take(count: int) -> None:
        limiter = RateLimiter(alias, "50/s", max_wait=10)
        for _ in range(count):
            assert limiter.acquire() == 0
            taken.append(time.monotonic())

    threads = [threading.Thread(target=take, args=(n,)) for n in (11, 10)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(taken) == 21
    late = [
        (k, round(t - start, 4))
        for k, t in enumerate(sorted(taken))
        if t - start < k * 0.02 - 0.001
    ]
    assert not late, f"slots taken sooner than 20 ms apart: {late}"


def test_no_slot_before_the_deadline_takes_none():
    alias = f"bench-{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter(alias, "1/m", max_wait=1)
    assert limiter.acquire() == 0
    wait = limiter.acquire()
    assert 58 < wait <= 60
    assert RateLimiter(alias, "1/m", max_wait=1).acquire() == pytest.approx(wait, abs=1)


@pytest.mark.django_db
def test_dispatches_without_a_slot_are_deferred_without_spending_an_attempt(
    registries, no_publish, settings
):
    settings.SITEMESSAGE_RATE_LIMIT_MAX_WAIT = 1
    outbox = Outbox()
    messenger = MyMessenger(outbox)
    messenger.alias = f"limited{uuid.uuid4().hex[:6]}"
    messenger.rate_limit = "2/m"
    register_messenger_objects(messenger)
    [(message, dispatches)] = schedule_messages(
        PlainTextMessage("hi"), recipients(messenger.alias, ["a", "b", "c"])
    )
    result = pipeline.deliver(messenger.alias, [d.pk for d in dispatches], owner="t")
    assert (result.claimed, result.sent) == (3, 1)
    assert outbox.accepted == ["a"]
    rows = Dispatch.objects.filter(message=message).order_by("pk")
    deferred = [row for row in rows if row.dispatch_status == Dispatch.Status.ERROR]
    assert [row.address for row in deferred] == ["b", "c"]
    assert {row.retry_count for row in deferred} == {0}
    assert all(
        row.next_attempt_at is not None and row.next_attempt_at > message.time_created
        for row in deferred
    )
    assert not deferred[0].errors.exists()


class TimedSink(SMTPSink):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def handle_DATA(self, server, session, envelope):
        self.times.append(time.monotonic())
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_two_worker_processes_hold_twenty_per_second(start_worker, smtp_servers, settings):
    server = smtp_servers(TimedSink())
    sink = server.sink
    start_worker(
        ["messenger.smtp"],
        concurrency=2,
        env={
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(server.port),
            "SITEMESSAGE_MESSENGERS": json.dumps({"smtp": {"rate_limit": "20/s"}}),
        },
    )
    settings.SITEMESSAGE_BATCH_SIZE = 20  # 10 tasks, so both processes send at once
    addresses = [f"r{i}@example.com" for i in range(200)]
    schedule_messages(PlainTextMessage("limited"), recipients("smtp", addresses))
    sink.wait_for(200, timeout=40)
    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() == 200, 10
    )
    elapsed = max(sink.times) - min(sink.times)
    busiest = max_in_window(sink.times)
    print(f"\n200 e-mails at 20/s over 2 processes: {elapsed:.2f}s, busiest second {busiest}")
    assert sorted(sink.recipients()) == sorted(addresses)
    # The limiter grants slots 50 ms apart on the Redis clock; an e-mail arrives one send later,
    # and that latency varies (a loaded 2-core machine: a busiest second of 22 was seen). So
    # 21 consecutive arrivals (20 slot intervals, 1 s) must span at least 0.8 s; unlimited,
    # 200 e-mails arrive within a few tenths of a second.
    times = sorted(sink.times)
    assert min(b - a for a, b in zip(times, times[20:], strict=False)) >= 0.8, busiest
    assert elapsed >= 9
