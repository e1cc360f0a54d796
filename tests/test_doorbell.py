"""Doorbells (workers.broker): while a delivery task of a queue waits, one-recipient calls
publish none, and the worker that answers the waiting one claims their rows too.

Against the real Redis broker of the test run; each task taken from the queue is run in this
process as the worker runs it (answer the doorbell, claim with the waiting rows, deliver).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import current_app

from dispatcher import tasks, toolbox
from dispatcher.messages import PlainTextMessage
from dispatcher.models import Dispatch
from messengers.registry import register_messenger_objects
from sitemessage.utils import MessengerBase
from tests.support import purge
from workers import broker

pytestmark = [
    pytest.mark.pg,  # the claim of waiting rows differs on PostgreSQL
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        broker._bells() is None, reason="doorbells need a Redis broker (RabbitMQ: a task each)"
    ),
]
QUEUE = "messenger.bell"


class Bell(MessengerBase):
    alias = "bell"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def send(self, message_cls, message_model, dispatch_models):
        self.batches.append([d.address for d in dispatch_models])
        for dispatch in dispatch_models:
            self.mark_sent(dispatch)


@pytest.fixture
def bell(registries, settings) -> Any:
    settings.SITEMESSAGE_DOORBELL_SECONDS = 10
    messenger = Bell()
    register_messenger_objects(messenger)
    purge([QUEUE, QUEUE + ".urgent"])  # also clears their doorbells
    yield messenger
    purge([QUEUE, QUEUE + ".urgent"])


def schedule_one(address: str) -> int:
    [(_, [dispatch])] = toolbox.schedule(
        PlainTextMessage("hello"), toolbox.recipients("bell", [address])
    )
    return dispatch.pk


def waiting_tasks() -> int:
    return broker.queue_lengths([QUEUE])[QUEUE] or 0


def take_task() -> tuple[str, list[int]]:
    """The oldest delivery task of the queue, removed from it: (alias, dispatch ids)."""
    with current_app.connection_for_read() as conn:
        channel: Any = conn.default_channel
        raw = channel.basic_get(QUEUE, no_ack=True)
    assert raw is not None, "no task waiting"
    args, _kwargs, _embed = raw.decode()
    return args[0], args[1]


def run_task(alias: str, ids: list[int]) -> dict[str, int]:
    return tasks.send_dispatches.apply(args=(alias, ids)).get()


def sent() -> int:
    return Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count()


def test_calls_made_while_a_doorbell_waits_publish_nothing_and_its_worker_sends_them(bell):
    first = schedule_one("a")
    for address in "bcde":
        schedule_one(address)
    assert waiting_tasks() == 1  # the first call's; the other four rang a pending doorbell

    alias, ids = take_task()
    assert (alias, ids) == ("bell", [first])
    result = run_task(alias, ids)
    assert result["claimed"] == result["sent"] == 5
    assert bell.batches == [["a"], ["b"], ["c"], ["d"], ["e"]]  # one task run, a send each

    schedule_one("f")  # answered: the next call publishes again
    assert waiting_tasks() == 1


def test_a_worker_whose_claim_filled_the_batch_rings_again_for_the_rest(bell, settings):
    settings.SITEMESSAGE_BATCH_SIZE = 3
    for index in range(7):
        schedule_one(f"r{index}")
    assert waiting_tasks() == 1

    runs = []
    while waiting_tasks():
        runs.append(run_task(*take_task()))
    assert [run["claimed"] for run in runs] == [3, 3, 1]
    assert [run["more"] for run in runs] == [1, 1, 0]
    assert sent() == 7
    assert waiting_tasks() == 0


def test_a_failed_publish_leaves_no_doorbell_behind(bell, monkeypatch):
    real = broker._publish

    def unreachable(*args: Any) -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(broker, "_publish", unreachable)
    lost = schedule_one("lost")  # stays pending for the sweep, logged
    monkeypatch.setattr(broker, "_publish", real)
    schedule_one("next")
    assert waiting_tasks() == 1  # no doorbell was left pending by the failed call
    run_task(*take_task())
    assert Dispatch.objects.get(pk=lost).dispatch_status == Dispatch.Status.SENT


def test_a_doorbell_whose_task_was_lost_expires(bell, settings):
    settings.SITEMESSAGE_DOORBELL_SECONDS = 0.3
    schedule_one("x")
    with current_app.connection_for_write() as conn:  # the task is lost, its doorbell stays
        channel: Any = conn.default_channel
        channel.queue_purge(QUEUE)
    schedule_one("y")
    assert waiting_tasks() == 0
    time.sleep(0.4)
    schedule_one("z")
    assert waiting_tasks() == 1
    assert run_task(*take_task())["sent"] == 3


def test_without_doorbells_each_call_publishes_its_task(bell, settings):
    settings.SITEMESSAGE_DOORBELL_SECONDS = 0
    for address in "abc":
        schedule_one(address)
    assert waiting_tasks() == 3


def test_a_bulk_call_publishes_every_batch_even_while_a_doorbell_waits(bell, settings):
    settings.SITEMESSAGE_BATCH_SIZE = 2
    schedule_one("single")
    toolbox.schedule(PlainTextMessage("bulk"), toolbox.recipients("bell", list("abcde")))
    assert waiting_tasks() == 1 + 3


def test_the_sweep_and_the_admin_publish_even_while_a_doorbell_waits(bell):
    """They publish rows whose task may be lost: a doorbell left by that task must not stop
    them (it would until it expires)."""
    schedule_one("a")
    lost = schedule_one("b")
    assert waiting_tasks() == 1
    toolbox.publish_dispatches([(lost, "bell")])
    assert waiting_tasks() == 2


def test_an_urgent_call_always_publishes_its_own_task(bell, settings):
    """A worker claims waiting rows oldest first: an urgent row left to a doorbell would wait
    behind the normal lane's backlog, which its lane exists to skip."""
    settings.SITEMESSAGE_URGENT_PRIORITY = 10
    for address in "abc":
        toolbox.schedule(
            PlainTextMessage("code"), toolbox.recipients("bell", [address]), priority=10
        )
    lanes = broker.queue_lengths([QUEUE, QUEUE + ".urgent"])
    assert lanes == {QUEUE: 0, QUEUE + ".urgent": 3}
