"""Storing a scheduled message and its dispatches in as few statements as the database allows.

Scheduling is on the caller's request path, so its cost is the number of round trips more
than the work: the ORM's bulk_create sends one INSERT per 999 parameters on SQLite (176
statements for 10,000 recipients) and per 500 rows on PostgreSQL, and a message needs BEGIN
and COMMIT around its two INSERTs. Here:

- PostgreSQL: one statement, ``WITH m AS (INSERT message RETURNING id) INSERT dispatches
  SELECT ... FROM m, unnest(arrays)``, which is atomic on its own: outside a transaction no
  BEGIN or COMMIT is sent, and the commit waits for one disk flush instead of two round trips.
- SQLite: the message, then ``INSERT dispatches SELECT ... FROM json_each(?)``: two statements
  (SQLite runs in process, so round trips are cheap; the number of statements stays constant).
- Any other database: the ORM, as before.

The rows are the same the ORM would write: every value goes through its field's
get_db_prep_save(), and the ids come back with RETURNING, matched by (messenger, address),
which is unique within a message.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

from django.db import connections, router, transaction
from django.db.models.signals import post_save, pre_save

from .models import Dispatch, Message

#: Dispatch columns that differ per recipient; every other column but ``message`` is the same
#: for all dispatches of a message.
PER_RECIPIENT = ("messenger", "recipient", "address")


def atomic_alone() -> bool:
    """Whether store() is one atomic statement here (PostgreSQL): the caller needs no
    transaction around it."""
    db = router.db_for_write(Message)
    return connections[db].vendor == "postgresql" and router.db_for_write(Dispatch) == db


def store(message: Message, dispatches: list[Dispatch]) -> None:
    """Inserts the unsaved ``message`` and its unsaved ``dispatches`` (at least one, the same
    values in every column but PER_RECIPIENT and ``message``), setting their ids. One atomic
    statement on PostgreSQL, a transaction of two on SQLite, the ORM elsewhere."""
    db = router.db_for_write(Message)
    vendor = connections[db].vendor
    if vendor not in _VENDORS or router.db_for_write(Dispatch) != db:
        with transaction.atomic(using=db, savepoint=False):
            message.save(using=db, force_insert=True)
            for dispatch in dispatches:
                dispatch.message = message
            Dispatch.objects.using(db).bulk_create(dispatches, batch_size=500)
        return
    _VENDORS[vendor](db, message, dispatches)
    for row in (message, *dispatches):
        row._state.adding, row._state.db = False, db


def _on_postgresql(db: str, message: Message, dispatches: list[Dispatch]) -> None:
    connection = connections[db]
    signalled = _pre_save(db, message)
    params: list[Any] = _values(message, _columns(Message), connection)
    params += _values(dispatches[0], _constant_fields(), connection)
    params += [
        [field.get_db_prep_save(getattr(d, field.attname), connection) for d in dispatches]
        for field in _per_recipient_fields()
    ]
    with connection.cursor() as cursor:
        cursor.execute(_postgresql_sql(db), params)
        rows = cursor.fetchall()
    _assign_ids(message, dispatches, rows)
    if signalled:
        _post_save(db, message)


def _pre_save(db: str, message: Message) -> bool:
    """Sends pre_save for a message about to be inserted, as Message.objects.create() would;
    returns whether anything listens to its save signals (then _post_save() follows)."""
    signalled = pre_save.has_listeners(Message) or post_save.has_listeners(Message)
    if signalled:
        pre_save.send(Message, instance=message, raw=False, using=db, update_fields=None)
    return signalled


def _post_save(db: str, message: Message) -> None:
    message._state.adding, message._state.db = False, db
    post_save.send(Message, instance=message, created=True, raw=False, using=db, update_fields=None)


@functools.cache
def _postgresql_sql(db: str) -> str:
    connection = connections[db]
    quote = connection.ops.quote_name
    insert_message = f"{_insert_sql(db)} RETURNING {quote('id')}"
    constant_fields, per_row = _constant_fields(), _per_recipient_fields()
    columns = [Dispatch._meta.get_field("message"), *per_row, *constant_fields]
    arrays = ", ".join(f"%s::{_cast_type(f, connection)}[]" for f in per_row)
    names = ", ".join(f"r{i}" for i in range(len(per_row)))
    # Typed: PostgreSQL cannot tell the type of a NULL parameter in a SELECT list.
    constants = ", ".join(f"%s::{_cast_type(f, connection)}" for f in constant_fields)
    return (
        f"WITH m AS ({insert_message}) "  # noqa: S608
        f"INSERT INTO {quote(Dispatch._meta.db_table)} "
        f"({', '.join(quote(f.column) for f in columns)}) "
        f"SELECT m.{quote('id')}, {names}, {constants} "
        f"FROM m, unnest({arrays}) AS r({names}) "
        f"RETURNING {quote('id')}, {quote('message_id')}, {quote('messenger')}, {quote('address')}"
    )


def _on_sqlite(db: str, message: Message, dispatches: list[Dispatch]) -> None:
    connection = connections[db]
    signalled = _pre_save(db, message)
    with transaction.atomic(using=db, savepoint=False):
        # The message's INSERT as save() writes it, without the ORM building it each time.
        with connection.cursor() as cursor:
            cursor.execute(_insert_sql(db), _values(message, _columns(Message), connection))
            message.pk = cursor.lastrowid
        per_row = _per_recipient_fields()
        recipients = json.dumps(
            [
                [field.get_db_prep_save(getattr(d, field.attname), connection) for field in per_row]
                for d in dispatches
            ]
        )
        params = [message.pk, *_values(dispatches[0], _constant_fields(), connection), recipients]
        with connection.cursor() as cursor:
            cursor.execute(_sqlite_sql(db), params)
            rows = [(pk, message.pk, messenger, address) for pk, messenger, address in cursor]
    _assign_ids(message, dispatches, rows)
    if signalled:
        _post_save(db, message)


@functools.cache
def _insert_sql(db: str) -> str:
    quote = connections[db].ops.quote_name
    fields = _columns(Message)
    # Only the model's own table and column names go in; every value is a parameter.
    return (
        f"INSERT INTO {quote(Message._meta.db_table)} "  # noqa: S608
        f"({', '.join(quote(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))})"
    )


@functools.cache
def _sqlite_sql(db: str) -> str:
    quote = connections[db].ops.quote_name
    constant_fields, per_row = _constant_fields(), _per_recipient_fields()
    columns = [Dispatch._meta.get_field("message"), *per_row, *constant_fields]
    picked = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(per_row)))
    # Only the model's own table and column names go in; every value is a parameter.
    return (
        f"INSERT INTO {quote(Dispatch._meta.db_table)} "  # noqa: S608
        f"({', '.join(quote(f.column) for f in columns)}) "
        f"SELECT %s, {picked}, {', '.join(['%s'] * len(constant_fields))} "
        f"FROM json_each(%s) ORDER BY key "
        f"RETURNING {quote('id')}, {quote('messenger')}, {quote('address')}"
    )


@functools.cache
def _columns(model: type[Any]) -> tuple[Any, ...]:
    """The concrete fields an INSERT writes: all but the auto primary key."""
    return tuple(f for f in model._meta.concrete_fields if not f.primary_key)


@functools.cache
def _constant_fields() -> tuple[Any, ...]:
    return tuple(f for f in _columns(Dispatch) if f.name not in (*PER_RECIPIENT, "message"))


@functools.cache
def _per_recipient_fields() -> tuple[Any, ...]:
    return tuple(Dispatch._meta.get_field(name) for name in PER_RECIPIENT)


def _cast_type(field: Any, connection: Any) -> str:
    target = field.target_field if field.is_relation else field
    return str(target.cast_db_type(connection))


def _values(row: Any, fields: Sequence[Any], connection: Any) -> list[Any]:
    return [field.get_db_prep_save(field.pre_save(row, True), connection) for field in fields]


def _assign_ids(
    message: Message, dispatches: list[Dispatch], rows: Sequence[Sequence[Any]]
) -> None:
    ids = {(messenger, address): pk for pk, message_id, messenger, address in rows}
    message.pk = rows[0][1]
    for dispatch in dispatches:
        dispatch.pk = ids[(dispatch.messenger, dispatch.address)]
        dispatch.message = message


_VENDORS: dict[str, Callable[[str, Message, list[Dispatch]], None]] = {
    "postgresql": _on_postgresql,
    "sqlite": _on_sqlite,
}
