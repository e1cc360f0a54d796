"""dispatcher.storing: a message and its dispatches in a constant number of statements (one on
PostgreSQL), writing exactly the rows the ORM writes. Runs on SQLite and again on PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection
from django.db.models.signals import post_save
from django.forms.models import model_to_dict
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from dispatcher import storing, toolbox
from dispatcher.messages import PlainTextMessage
from dispatcher.models import Dispatch, Message
from messengers.base import Recipient

pytestmark = [pytest.mark.pg, pytest.mark.django_db(transaction=True)]


def rows_of(message: Message, created_at: Any = None) -> list[dict[str, Any]]:
    """The message's dispatch rows without their ids (``created_at``: as if created then)."""
    rows = []
    for dispatch in Dispatch.objects.filter(message=message).order_by("address"):
        row = {k: v for k, v in model_to_dict(dispatch).items() if k not in {"id", "message"}}
        if created_at is not None:
            row["time_created"] = created_at
        rows.append(row)
    return rows


def message_row(message: Message) -> dict[str, Any]:
    return {k: v for k, v in model_to_dict(Message.objects.get(pk=message.pk)).items() if k != "id"}


def test_the_rows_are_the_ones_the_orm_writes(no_publish):
    user = get_user_model().objects.create(username="ann", email="ann@example.com")
    now = timezone.now()
    window = {"send_at": now + timedelta(hours=1), "expires_at": now + timedelta(days=2)}
    recipients = [
        Recipient("smtp", user, "ann@example.com"),
        Recipient("smtp", None, "bob@example.com"),
        Recipient("smtp", None, "zoë@exämple.com"),
    ]

    def message() -> Message:
        return Message(
            cls="plain", context={"stext_": "héllo ✓", "n": [1, None]}, sender=user, priority=3
        )

    fast = message()
    dispatches = Dispatch.build(fast, recipients, now, **window)
    storing.store(fast, dispatches)

    slow = message()
    slow.time_created = fast.time_created
    slow.save()
    orm = Dispatch.store(slow, recipients, now, **window)

    assert message_row(fast) == message_row(slow)
    assert rows_of(fast) == rows_of(slow, created_at=dispatches[0].time_created)
    # Returned like bulk_create's: ids set, each the row of its own recipient, saved state.
    for dispatch in dispatches:
        stored = Dispatch.objects.get(pk=dispatch.pk)
        assert (stored.address, stored.message_id) == (dispatch.address, fast.pk)
        assert dispatch.message is fast and not dispatch._state.adding
    assert not fast._state.adding and len({d.pk for d in dispatches + orm}) == 6


@pytest.mark.parametrize("count", [1, 100, 10_000])
def test_a_schedule_call_costs_the_same_statements_for_any_number_of_recipients(no_publish, count):
    addresses = [f"r{i}@example.com" for i in range(count)]
    with CaptureQueriesContext(connection) as queries:
        [(message, dispatches)] = toolbox.schedule(
            PlainTextMessage("hello"), toolbox.recipients("smtp", addresses)
        )
    statements = [q["sql"] for q in queries.captured_queries]
    if connection.vendor == "postgresql":
        assert len(statements) == 1 and statements[0].startswith("WITH m AS (INSERT")
    else:  # SQLite: BEGIN, the message, the dispatches, COMMIT (Django logs BEGIN only)
        assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "INSERT", "COMMIT"]
    assert Dispatch.objects.filter(message=message).count() == count == len(dispatches)
    assert sorted(d.address for d in dispatches) == sorted(addresses)
    published = sorted(pk for batch in no_publish for pk in batch["smtp"])
    assert published == sorted(d.pk for d in dispatches)  # after the commit, every one


def test_a_statement_that_fails_leaves_no_message_behind(no_publish):
    missing_user = get_user_model()(pk=987654)  # not in the table: the foreign key fails
    before = Message.objects.count()
    message = Message(cls="plain", context={"stext_": "x"})
    dispatches = Dispatch.build(message, [Recipient("smtp", missing_user, "a@example.com")])
    with pytest.raises(IntegrityError):
        storing.store(message, dispatches)
    assert Message.objects.count() == before
    assert not Dispatch.objects.exists()


def test_a_message_save_signal_is_sent_once_as_by_the_orm(no_publish):
    seen: list[tuple[int | None, bool]] = []

    def receiver(instance: Message, created: bool, **_: Any) -> None:
        seen.append((instance.pk, created))

    post_save.connect(receiver, sender=Message)
    try:
        [(message, _)] = toolbox.schedule(
            PlainTextMessage("hello"), toolbox.recipients("smtp", ["s@example.com"])
        )
    finally:
        post_save.disconnect(receiver, sender=Message)
    assert seen == [(message.pk, True)]
