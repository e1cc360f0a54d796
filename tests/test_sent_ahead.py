"""SENT marks sent ahead (dispatcher/inflight.py): on PostgreSQL the SMTP messenger's SENT mark
travels while the next e-mail is prepared, and is stored before that e-mail's content goes
(the one-duplicate guarantee). Real PostgreSQL (make test's second pass), real SMTP server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.core.mail import EmailMessage
from django.db import connection

from dispatcher import inflight, pipeline, toolbox
from dispatcher.messages import PlainTextMessage, register_message_types
from dispatcher.models import Dispatch
from messengers.base import MessengerBase
from messengers.registry import get_registered_messenger_object, register_messenger_objects
from sitemessage.messengers.smtp import SMTPMessenger
from tests.support import SMTPSink

Status = Dispatch.Status
TABLE = Dispatch._meta.db_table


def on_postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("SENT marks are sent ahead on PostgreSQL only (make test runs it there)")


class OwnEmailMessage(PlainTextMessage):
    """Builds its e-mail itself and reads the database while doing so."""

    alias = "own_email_reading"

    @classmethod
    def build_email(cls, message_model, dispatch, defaults):
        known = Dispatch.objects.filter(message_id=message_model.pk).count()
        email = EmailMessage(f"one of {known}", "body", defaults["from_email"], [dispatch.address])
        email.extra_headers["Message-ID"] = defaults["message_id"]
        return email


register_message_types(OwnEmailMessage)


class Watching(SMTPSink):
    """Notes, as each e-mail arrives, how many of the batch's rows the database holds SENT."""

    def __init__(self, pipelining: bool) -> None:
        super().__init__()
        self.pipelining = pipelining
        self.sent_at_arrival: list[int] = []
        self.db: psycopg.Connection | None = None

    async def handle_DATA(self, server, session, envelope):
        if self.db is not None:
            query = f"SELECT count(*) FROM {TABLE} WHERE dispatch_status = %s"
            [(count,)] = self.db.execute(query, [Status.SENT]).fetchall()
            self.sent_at_arrival.append(count)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture(params=[True, False], ids=["pipelining", "no-pipelining"])
def smtp(request, registries, no_publish, smtp_servers, settings) -> Iterator[Watching]:
    server = smtp_servers(Watching(pipelining=request.param))
    settings.DEFAULT_FROM_EMAIL = "noreply@example.com"
    register_messenger_objects(
        SMTPMessenger(host="127.0.0.1", port=server.port, use_tls=False, timeout=5)
    )
    try:
        yield server.sink
    finally:
        get_registered_messenger_object("smtp").after_send()


@pytest.fixture
def sent_ahead(monkeypatch) -> list[int]:
    """The dispatch ids whose SENT mark was sent ahead."""
    ids: list[int] = []
    real = pipeline.send_sent

    def send_sent(dispatch: Dispatch, owner: str) -> inflight.InFlight:
        ids.append(dispatch.pk)
        return real(dispatch, owner)

    monkeypatch.setattr(pipeline, "send_sent", send_sent)
    return ids


@pytest.fixture
def sql() -> Iterator[Any]:
    """Runs statements on the test database from a connection of its own; the triggers and
    functions it made are dropped at the end."""
    on_postgresql()
    db = psycopg.connect(**_conninfo(), autocommit=True)
    made: list[str] = []

    def run(statement: str, drop: str = "") -> None:
        db.execute(statement)
        if drop:
            made.append(drop)

    try:
        yield run
    finally:
        for drop in reversed(made):
            db.execute(drop)
        db.close()


def slow_sent_marks(sql: Any, seconds: float) -> None:
    """Each UPDATE of a dispatch row takes ``seconds`` longer."""
    sql(
        "CREATE FUNCTION sm_test_slow() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$",
        drop="DROP FUNCTION sm_test_slow()",
    )
    sql(
        f"CREATE TRIGGER sm_test_slow BEFORE UPDATE ON {TABLE} FOR EACH ROW "
        "WHEN (NEW.dispatch_status = 2) EXECUTE FUNCTION sm_test_slow()",
        drop=f"DROP TRIGGER sm_test_slow ON {TABLE}",
    )


def schedule(addresses: list[str], message: Any = None) -> list[int]:
    [(_, dispatches)] = toolbox.schedule(
        message or PlainTextMessage("hello"), toolbox.recipients("smtp", addresses)
    )
    return [d.pk for d in dispatches]


def deliver(ids: list[int]) -> pipeline.BatchResult:
    return pipeline.deliver("smtp", ids, pipeline.lease_owner("t-ahead"), waiting=True)


def statuses(ids: list[int]) -> set[int]:
    return set(Dispatch.objects.filter(pk__in=ids).values_list("dispatch_status", flat=True))


def test_only_the_smtp_messenger_itself_settles_its_outcomes():
    class Subclass(SMTPMessenger):
        pass

    assert SMTPMessenger().settles_outcomes is True
    assert Subclass().settles_outcomes is False  # its code may query the database meanwhile
    assert MessengerBase().settles_outcomes is False


@pytest.mark.pg
@pytest.mark.django_db
def test_elsewhere_than_postgresql_every_mark_waits(smtp, sent_ahead):
    if connection.vendor == "postgresql":
        pytest.skip("the SQLite pass checks the other databases")
    ids = schedule([f"u{i}@example.com" for i in range(3)])
    assert deliver(ids).sent == 3
    assert sent_ahead == []


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_each_sent_mark_is_stored_before_the_next_emails_content_goes(smtp, sent_ahead, sql):
    """With each SENT write slowed to 50 ms, an e-mail whose content went before the previous
    mark was stored would arrive with fewer rows SENT than e-mails before it."""
    on_postgresql()
    slow_sent_marks(sql, 0.05)
    ids = schedule([f"u{i}@example.com" for i in range(5)])
    smtp.db = psycopg.connect(**_conninfo(), autocommit=True)
    try:
        result = deliver(ids)
    finally:
        smtp.db.close()
    assert (result.claimed, result.sent) == (5, 5)
    assert statuses(ids) == {Status.SENT}
    assert smtp.sent_at_arrival == [0, 1, 2, 3, 4]
    assert sent_ahead == ids


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_a_sent_mark_that_fails_on_its_way_is_written_again(smtp, sent_ahead, sql, caplog):
    on_postgresql()
    sql("CREATE SEQUENCE sm_test_once", drop="DROP SEQUENCE sm_test_once")
    sql(
        "CREATE FUNCTION sm_test_fail_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF nextval('sm_test_once') = 2 THEN RAISE EXCEPTION 'injected'; END IF; "
        "RETURN NEW; END $$",
        drop="DROP FUNCTION sm_test_fail_once()",
    )
    sql(
        f"CREATE TRIGGER sm_test_fail_once BEFORE UPDATE ON {TABLE} FOR EACH ROW "
        "WHEN (NEW.dispatch_status = 2) EXECUTE FUNCTION sm_test_fail_once()",
        drop=f"DROP TRIGGER sm_test_fail_once ON {TABLE}",
    )
    ids = schedule([f"u{i}@example.com" for i in range(4)])
    result = deliver(ids)
    assert (result.claimed, result.sent) == (4, 4)  # the second mark failed once
    assert statuses(ids) == {Status.SENT}
    assert len(sent_ahead) == 4
    assert "dropped" not in caplog.text


@pytest.mark.pg
@pytest.mark.django_db
def test_a_stored_mark_whose_answer_was_lost_counts_as_sent(smtp, sent_ahead, monkeypatch, caplog):
    """Written again, the mark finds the row SENT already (its lease cleared): that is this
    run's own write, told by its sent_at, not a lease another run took."""
    on_postgresql()
    real = inflight.InFlight.rowcount

    def lost(self: inflight.InFlight) -> int | None:
        real(self)
        return None

    monkeypatch.setattr(inflight.InFlight, "rowcount", lost)
    ids = schedule([f"u{i}@example.com" for i in range(3)])
    result = deliver(ids)
    assert (result.claimed, result.sent) == (3, 3)
    assert "dropped" not in caplog.text


@pytest.mark.pg
@pytest.mark.django_db
def test_a_type_that_builds_its_own_email_may_query_the_database(smtp, sent_ahead):
    on_postgresql()
    ids = schedule([f"u{i}@example.com" for i in range(3)], OwnEmailMessage("x"))
    result = deliver(ids)
    assert (result.claimed, result.sent) == (3, 3)
    assert {message["Subject"] for _, message in smtp.messages} == {"one of 3"}


@pytest.mark.pg
@pytest.mark.django_db
def test_a_failed_recipient_between_two_sent_ones_is_stored_with_them(smtp, sent_ahead):
    on_postgresql()
    smtp.reject["u1@example.com"] = "550 5.1.1 no such user"
    ids = schedule([f"u{i}@example.com" for i in range(3)])
    result = deliver(ids)
    assert (result.sent, result.failed) == (2, 1)
    by_id = dict(Dispatch.objects.filter(pk__in=ids).values_list("pk", "dispatch_status"))
    assert [by_id[pk] for pk in ids] == [Status.SENT, Status.FAILED, Status.SENT]


def _conninfo() -> dict[str, Any]:
    settings = connection.settings_dict
    return {
        "host": settings["HOST"] or None,
        "port": settings["PORT"] or None,
        "user": settings["USER"],
        "dbname": settings["NAME"],
    }
