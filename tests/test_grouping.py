"""Messages scheduled without recipients (their dispatches made later from the subscribers by
prepare_dispatches(), also run by the sweep) and grouping (``group_mark``: new content merged
into a still unsent message to exactly the same recipients). The concurrency tests run real
processes on the test database at once: ``pytest -m pg`` runs them again on PostgreSQL, where
they depend on row locks rather than SQLite's one writer at a time."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connections

from dispatcher import pipeline, toolbox
from dispatcher.messages import MessageBase, PlainTextMessage, register_message_types
from dispatcher.models import Dispatch, Message, ScheduleRequest, Subscription
from dispatcher.sweep import sweep
from dispatcher.toolbox import prepare_dispatches, recipients, schedule_messages
from tests.support import ROOT, worker_env

pytestmark = pytest.mark.django_db
Status = Dispatch.Status
TEXT = MessageBase.SIMPLE_TEXT_ID


class Digest(PlainTextMessage):
    """Texts of one sender to one set of recipients, grouped into one unsent message."""

    alias = "grouping_digest"
    group_mark = "digest"


class MailNews(PlainTextMessage):
    """A type sent only by e-mail (its subscribers through other messengers are left out)."""

    alias = "grouping_mail_news"
    supported_messengers = ["smtp"]


class Tally(MessageBase):
    """A grouped type with its own merge_context: counts add up."""

    alias = "grouping_tally"
    group_mark = "tally"

    def __init__(self, count: int) -> None:
        super().__init__({"count": count})

    @classmethod
    def merge_context(cls, context: dict[str, Any], new_context: dict[str, Any]) -> dict[str, Any]:
        return {**context, "count": context["count"] + new_context["count"]}


TYPES = (Digest, MailNews, Tally)


@pytest.fixture(autouse=True)
def types(registries):
    register_message_types(*TYPES)


@pytest.fixture
def user():
    return get_user_model().objects.create(username="ann", email="ann@example.com")


def make_user(name: str, **fields: Any) -> Any:
    return get_user_model().objects.create(username=name, email=f"{name}@example.com", **fields)


def texts_of(message: Message) -> list[str]:
    return message.context[TEXT].split("\n")


def targets(dispatches: Any) -> set[tuple[str, str, int | None]]:
    return {(d.messenger, d.address, d.recipient_id) for d in dispatches}


# Scheduling without recipients; prepare_dispatches().


def test_schedule_without_recipients_stores_a_message_waiting_for_its_dispatches(no_publish):
    [(message, dispatches)] = schedule_messages(MailNews("news"))
    assert dispatches == [] and no_publish == []
    stored = Message.objects.get()
    assert (stored.pk, stored.cls, stored.dispatches_ready) == (
        message.pk,
        "grouping_mail_news",
        False,
    )
    assert texts_of(stored) == ["news"] and not Dispatch.objects.exists()


def test_prepare_dispatches_sends_to_the_subscribers_a_type_can_reach(caplog):
    ann, bob = make_user("ann"), make_user("bob")
    gone = make_user("gone", is_active=False)
    no_email = get_user_model().objects.create(username="mute", email="")
    for subscriber in (ann, bob, gone, no_email, "list@example.com"):
        Subscription.create(subscriber, MailNews, "smtp")
    Subscription.create("not-an-email", MailNews, "smtp")  # the messenger refuses it
    Subscription.create("chat-room", MailNews, "recorder")  # a messenger the type does not support
    Subscription.objects.create(
        message_cls=MailNews.alias, messenger_cls="unregistered", address="x"
    )
    Subscription.create(make_user("other"), Digest, "smtp")  # another type's subscriber
    [(message, _)] = schedule_messages(MailNews("news"))

    with caplog.at_level(logging.WARNING, logger="dispatcher.toolbox"):
        created = prepare_dispatches()

    assert (
        targets(created)
        == targets(Dispatch.objects.all())
        == {
            ("smtp", "ann@example.com", ann.pk),
            ("smtp", "bob@example.com", bob.pk),
            ("smtp", "list@example.com", None),
        }
    )
    assert {d.message_id for d in created} == {message.pk}
    assert {d.dispatch_status for d in created} == {Status.PENDING}
    assert Message.objects.get().dispatches_ready
    # Both left out are logged by what went wrong, never by their address.
    assert "InvalidAddressError" in caplog.text and "UnsupportedMessengerError" in caplog.text
    assert "not-an-email" not in caplog.text and "chat-room" not in caplog.text


def test_get_subscribers_includes_inactive_users_only_when_asked(user):
    inactive = make_user("gone", is_active=False)
    for subscriber in (user, inactive):
        Subscription.create(subscriber, MailNews, "smtp")
    assert {r.user for r in MailNews.get_subscribers()} == {user}
    assert {r.user for r in MailNews.get_subscribers(active_only=False)} == {user, inactive}


def test_prepare_dispatches_is_idempotent(user):
    Subscription.create(user, MailNews, "smtp")
    schedule_messages([MailNews("one"), MailNews("two")])
    first = prepare_dispatches()
    assert len(first) == 2 and {d.message_id for d in first} == set(
        Message.objects.values_list("pk", flat=True)
    )
    assert prepare_dispatches() == []
    assert Dispatch.objects.count() == 2


def test_a_message_without_subscribers_is_marked_ready_and_not_scanned_again(
    user, django_assert_max_num_queries
):
    schedule_messages(MailNews("nobody listens"))
    assert prepare_dispatches() == []
    assert Message.objects.get().dispatches_ready and not Dispatch.objects.exists()
    # A subscriber who comes later does not get the old message.
    Subscription.create(user, MailNews, "smtp")
    with django_assert_max_num_queries(1):  # the scan for waiting messages, finding none
        assert prepare_dispatches() == []
    assert not Dispatch.objects.exists()


def test_a_message_of_an_unregistered_type_waits_without_holding_up_the_others(user, caplog):
    Subscription.create(user, MailNews, "smtp")
    unknown = Message.objects.create(cls="grouping_not_here", context={TEXT: "later"})
    [(known, _)] = schedule_messages(MailNews("now"))

    # One message per run: the unregistered one, older, must not take the place every time.
    with caplog.at_level(logging.WARNING, logger="dispatcher.toolbox"):
        created = prepare_dispatches(limit=1)

    assert [d.message_id for d in created] == [known.pk]
    assert not Message.objects.get(pk=unknown.pk).dispatches_ready
    assert not Dispatch.objects.filter(message=unknown).exists()


def test_upstreams_message_type_prepare_dispatches(user):
    Subscription.create(user, MailNews, "smtp")
    message, _ = MailNews("x").schedule()
    explicit = MailNews.prepare_dispatches(message, recipients("smtp", "bob@example.com"))
    assert targets(explicit) == {("smtp", "bob@example.com", None)}
    message, _ = MailNews("y").schedule()
    assert targets(MailNews.prepare_dispatches(message)) == {("smtp", user.email, user.pk)}
    assert Message.objects.get(pk=message.pk).dispatches_ready


def test_the_sweep_prepares_and_publishes_the_dispatches(user, no_publish):
    Subscription.create(user, MailNews, "smtp")
    Subscription.create("list@example.com", MailNews, "smtp")
    schedule_messages(MailNews("news"))

    result = sweep()

    ids = sorted(Dispatch.objects.values_list("pk", flat=True))
    assert (result["prepared"], result["published"]) == (2, 2)
    assert [sorted(ids_) for batch in no_publish for ids_ in batch.values()] == [ids]
    assert sweep()["prepared"] == 0


def test_delay_without_recipients_stores_a_waiting_message(user, monkeypatch):
    published: list[int] = []
    monkeypatch.setattr(toolbox, "publish_schedule_request", lambda pk, *a: published.append(pk))
    Subscription.create(user, MailNews, "smtp")
    schedule_messages.delay(MailNews("later"))
    [(message, dispatches)] = toolbox.expand_schedule_request(ScheduleRequest.objects.get().pk)
    assert dispatches == [] and not Message.objects.get(pk=message.pk).dispatches_ready
    assert targets(prepare_dispatches()) == {("smtp", user.email, user.pk)}


# Grouping.


def test_group_mark_merges_the_texts_of_one_sender_to_the_same_recipients(user, no_publish):
    to = recipients("smtp", [user, "bob@example.com"])
    [(first, first_dispatches)] = schedule_messages(Digest("one"), to)
    [(again, dispatches)] = schedule_messages(Digest("two"), list(reversed(to)))
    [(third, _)] = schedule_messages(Digest("three"), to)

    assert first.pk == again.pk == third.pk and Message.objects.count() == 1
    assert texts_of(Message.objects.get()) == ["one", "two", "three"]
    assert sorted(d.pk for d in dispatches) == sorted(d.pk for d in first_dispatches)
    assert Dispatch.objects.count() == 2
    assert sweep()["published"] == 0  # published when scheduled: not again by the next sweep


def test_the_type_merge_context_is_used():
    to = recipients("smtp", "a@example.com")
    for count in (1, 2, 3):
        schedule_messages(Tally(count), to)
    assert Message.objects.get().context["count"] == 6


def test_a_group_never_spans_recipients_senders_or_marks(user):
    ann_only = recipients("smtp", user)
    bob = recipients("smtp", "bob@example.com")
    schedule_messages(Digest("to ann"), ann_only)
    schedule_messages(Digest("to bob"), bob)  # upstream merged this and dropped bob
    schedule_messages(Digest("to both"), ann_only + bob)  # a superset is another group
    schedule_messages(Digest("through another messenger"), recipients("recorder", user.email))
    schedule_messages(Digest("from ann"), ann_only, sender=user)  # upstream ignored the sender
    Message.create(Digest.alias, {TEXT: "other mark"}, ann_only, group_mark="elsewhere")
    assert Message.objects.count() == 6
    assert all(len(texts_of(m)) == 1 for m in Message.objects.all())
    assert {(d.message.context[TEXT], d.address) for d in Dispatch.objects.all()} == {
        ("to ann", user.email),
        ("to bob", "bob@example.com"),
        ("to both", user.email),
        ("to both", "bob@example.com"),
        ("through another messenger", user.email),
        ("from ann", user.email),
        ("other mark", user.email),
    }


@pytest.mark.parametrize("status", [Status.PROCESSING, Status.SENT, Status.ERROR, Status.FAILED])
def test_a_message_with_any_dispatch_past_pending_is_not_merged_into(user, status):
    to = recipients("smtp", [user, "bob@example.com"])
    [(first, [_, bobs])] = schedule_messages(Digest("one"), to)
    Dispatch.objects.filter(pk=bobs.pk).update(dispatch_status=status)
    [(second, dispatches)] = schedule_messages(Digest("two"), to)
    assert second.pk != first.pk and texts_of(Message.objects.get(pk=first.pk)) == ["one"]
    assert texts_of(second) == ["two"] and targets(dispatches) == targets(first.dispatches.all())
    # The new message is the group's from now on.
    [(third, _)] = schedule_messages(Digest("three"), to)
    assert third.pk == second.pk and texts_of(Message.objects.get(pk=second.pk)) == ["two", "three"]


def test_a_message_whose_retry_waits_pending_is_not_merged_into(user, no_publish):
    to = recipients("smtp", user)
    [(first, [dispatch])] = schedule_messages(Digest("one"), to)
    # A try that failed for now (the provider may have delivered it all the same), published
    # again by the sweep: pending once more, but tried.
    Dispatch.objects.filter(pk=dispatch.pk).update(
        dispatch_status=Status.ERROR, retry_count=1, next_attempt_at=None
    )
    sweep()
    assert Dispatch.objects.get(pk=dispatch.pk).dispatch_status == Status.PENDING
    [(second, _)] = schedule_messages(Digest("two"), to)
    assert second.pk != first.pk and texts_of(Message.objects.get(pk=first.pk)) == ["one"]


def test_grouped_messages_without_recipients_merge_until_prepared(user):
    Subscription.create(user, Digest, "smtp")
    schedule_messages(Digest("one"))
    schedule_messages(Digest("two"))
    assert texts_of(Message.objects.get()) == ["one", "two"]
    [dispatch] = prepare_dispatches()
    # A message with recipients given is not the waiting one's group, nor the other way round.
    schedule_messages(Digest("explicit"), recipients("smtp", user))
    schedule_messages(Digest("three"))
    assert Message.objects.count() == 2
    assert texts_of(Message.objects.get(pk=dispatch.message_id)) == ["one", "two", "explicit"]
    [waiting] = Message.objects.filter(dispatches_ready=False)
    assert texts_of(waiting) == ["three"]


def test_a_merged_message_is_delivered_once_with_every_text(user, registries, no_publish):
    from messengers.registry import register_messenger_objects
    from sitemessage.utils import MessengerBase

    bodies: list[tuple[str, str]] = []

    class Collector(MessengerBase):
        alias = "grouping_collector"

        def send(self, message_cls, message_model, dispatch_models):
            for dispatch in dispatch_models:
                bodies.append((dispatch.address, dispatch.message_cache))
                self.mark_sent(dispatch)

    register_messenger_objects(Collector())
    to = recipients("grouping_collector", ["a", "b"])
    for text in ("one", "two"):
        [(_, dispatches)] = schedule_messages(Digest(text), to)
    result = pipeline.deliver("grouping_collector", [d.pk for d in dispatches], owner="w:1:t")
    assert result.sent == 2 and sorted(bodies) == [("a", "one\ntwo"), ("b", "one\ntwo")]
    # Sent: the next text starts a message of its own.
    [(message, _)] = schedule_messages(Digest("three"), to)
    assert texts_of(message) == ["three"] and Message.objects.count() == 2


# Concurrency: real processes on the test database, started together.


def child() -> None:
    """A child process of the concurrency tests (``python -c``, Django set up): reads its job
    (JSON) from argv, says "ready", waits for "go" on stdin, does the job, prints what it did as
    JSON and closes its connection."""
    register_message_types(*TYPES)
    job = json.loads(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        result = JOBS[job["do"]](job)
    finally:
        connections.close_all()
    print(json.dumps(result), flush=True)


def schedule_texts(job: dict[str, Any]) -> list[int]:
    """Schedules each text as a Digest (to the job's addresses, or to the subscribers);
    returns the message ids."""
    to = None if job["to"] is None else recipients("recorder", job["to"])
    ids = []
    for text in job["texts"]:
        [(message, _)] = toolbox.schedule(Digest(text), to, publish=False)
        ids.append(message.pk)
        time.sleep(0.005)  # SQLite's busy wait is not fair: let the claimer in between
    return ids


def claim_until_stopped(job: dict[str, Any]) -> list[list[Any]]:
    """Claims the group's pending dispatches as a worker does, until the stop file appears
    (and once more); returns [dispatch id, message id, text at claim time] per claim."""
    claimed: list[list[Any]] = []
    stop = Path(job["stop"])
    while True:
        last = stop.exists()
        pending = Dispatch.objects.filter(dispatch_status=Status.PENDING, message__cls=Digest.alias)
        ids = list(pending.values_list("pk", flat=True))
        if ids:
            for dispatch in pipeline.claim(
                "recorder", ids, f"claimer:{os.getpid()}:{len(claimed)}"
            ):
                claimed.append([dispatch.pk, dispatch.message_id, dispatch.message.context[TEXT]])
        if last:
            return claimed
        time.sleep(0.02)  # a worker's pace, so texts also merge between two claims


def prepare_until_stopped(job: dict[str, Any]) -> list[int]:
    """Runs prepare_dispatches() until the stop file appears (and once more); returns the ids
    of the dispatches it made."""
    made: list[int] = []
    stop = Path(job["stop"])
    while True:
        last = stop.exists()
        made += [d.pk for d in prepare_dispatches()]
        if last:
            return made
        time.sleep(0.002)


JOBS = {
    "schedule": schedule_texts,
    "claim": claim_until_stopped,
    "prepare": lambda job: [d.pk for d in prepare_dispatches()],
    "prepare_until_stopped": prepare_until_stopped,
}


class Children:
    """Child processes started together: each gets ready (Django set up), then all are told
    to go at the same moment."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, **job: Any) -> subprocess.Popen[str]:
        code = "import django; django.setup(); from tests.test_grouping import child; child()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(job)],
            cwd=ROOT,
            env=worker_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def go(self) -> None:
        for proc in self.procs:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready and proc.stdout.readline().strip() == "ready", "a child did not start"
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def result(self, proc: subprocess.Popen[str]) -> Any:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"child exited with {proc.returncode}"
        return json.loads(out.strip().splitlines()[-1])

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def children():
    started = Children()
    try:
        yield started
    finally:
        started.stop_all()


def group_texts() -> Counter[str]:
    messages = Message.objects.filter(cls=Digest.alias)
    return Counter(text for m in messages for text in texts_of(m))


def batches(name: str, processes: int, per_process: int) -> list[list[str]]:
    return [[f"{name}{p}-{n}" for n in range(per_process)] for p in range(processes)]


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_processes_scheduling_into_one_group_lose_nothing_and_claim_nothing_half_merged(
    children, tmp_path
):
    to = ["a@example.com", "b@example.com"]
    stop = tmp_path / "stop"
    toolbox.schedule(Digest("seed"), recipients("recorder", to), publish=False)
    texts = batches("t", 3, 40)
    schedulers = [children.start(do="schedule", texts=t, to=to) for t in texts]
    claimer = children.start(do="claim", stop=str(stop))
    started = time.monotonic()
    children.go()
    for proc in schedulers:
        children.result(proc)
    stop.touch()
    claimed = children.result(claimer)
    elapsed = time.monotonic() - started

    # Every text is in exactly one message.
    assert group_texts() == Counter(["seed", *(t for batch in texts for t in batch)])
    messages = Message.objects.filter(cls=Digest.alias)
    # Every message goes to exactly the recipients it was scheduled for, once each.
    for message in messages:
        assert sorted(message.dispatches.values_list("address", flat=True)) == to
    # A claimed dispatch sends its message as it is stored: nothing merged after the claim.
    final = dict(messages.values_list("pk", "context"))
    assert claimed, "the claimer claimed nothing: the test proved nothing"
    assert [c for c in claimed if final[c[1]][TEXT] != c[2]] == []
    assert sorted(c[0] for c in claimed) == sorted(
        Dispatch.objects.filter(message__in=messages).values_list("pk", flat=True)
    )
    # Merging happened (the test is about it): fewer messages than texts.
    print(f"\n{len(texts) * len(texts[0]) + 1} texts -> {messages.count()} messages, "
          f"{len(claimed)} dispatches claimed while scheduling, {elapsed:.2f} s")  # fmt: skip
    assert messages.count() < sum(map(len, texts))


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_processes_merging_into_a_waiting_message_while_it_is_prepared_lose_nothing(
    children, tmp_path
):
    subscribers = [make_user(f"s{n}") for n in range(3)]
    for subscriber in subscribers:
        Subscription.create(subscriber, Digest, "smtp")
    stop = tmp_path / "stop"
    texts = batches("w", 2, 40)
    schedulers = [children.start(do="schedule", texts=t, to=None) for t in texts]
    preparer = children.start(do="prepare_until_stopped", stop=str(stop))
    children.go()
    for proc in schedulers:
        children.result(proc)
    stop.touch()
    made = children.result(preparer)

    assert group_texts() == Counter(t for batch in texts for t in batch)
    assert not Message.objects.filter(dispatches_ready=False).exists()
    emails = sorted(s.email for s in subscribers)
    for message in Message.objects.all():
        assert sorted(message.dispatches.values_list("address", flat=True)) == emails
    assert sorted(made) == sorted(Dispatch.objects.values_list("pk", flat=True))


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_two_processes_preparing_at_once_make_each_dispatch_once(children):
    subscribers = [make_user(f"s{n}") for n in range(5)]
    for subscriber in subscribers:
        Subscription.create(subscriber, MailNews, "smtp")
    Subscription.create("list@example.com", MailNews, "smtp")
    for n in range(60):
        toolbox.schedule(MailNews(f"news {n}"), None, publish=False)
    procs = [children.start(do="prepare") for _ in range(2)]
    children.go()
    made = [children.result(proc) for proc in procs]

    all_ids = sorted(Dispatch.objects.values_list("pk", flat=True))
    assert sorted(made[0] + made[1]) == all_ids and not set(made[0]) & set(made[1])
    assert len(all_ids) == 60 * 6
    per_message = Counter(Dispatch.objects.values_list("message_id", "address"))
    assert set(per_message.values()) == {1} and len(per_message) == 60 * 6
    assert not Message.objects.filter(dispatches_ready=False).exists()
