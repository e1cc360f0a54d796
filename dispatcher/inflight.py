"""One statement sent to PostgreSQL without waiting for its answer, read later.

A worker stores each SENT mark before the next message goes out for good (the one-duplicate
guarantee). Waiting for that write between two e-mails costs a round trip to the database per
e-mail; sent this way, it travels while the messenger builds the next e-mail and opens its SMTP
transaction, and the worker waits only for what is still missing when the next content is due.

The statement goes on the Django connection's own psycopg 3 connection, by the simple query
protocol: one statement, committed on its own in autocommit as a cursor's would be, with its
values quoted by psycopg's client-side binding (the connection's adapters). Until ``rowcount()``
has read the answer, nothing else may use that connection: the caller keeps at most one
statement in flight and reads it before any other query.
"""

from __future__ import annotations

import select
import time
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

try:
    import psycopg
    from psycopg import pq
except ImportError:  # psycopg 2 or no PostgreSQL driver: every write waits for its answer
    psycopg = None  # type: ignore[assignment]


def supported(db: BaseDatabaseWrapper) -> bool:
    """Whether statements can be sent ahead on this connection (PostgreSQL with psycopg 3)."""
    if db.vendor != "postgresql" or psycopg is None:
        return False
    db.ensure_connection()
    return isinstance(db.connection, psycopg.Connection)


class InFlight:
    """A statement on its way; ``rowcount()`` waits for and reads its answer."""

    def __init__(self, db: BaseDatabaseWrapper, sql: str, params: list[Any]) -> None:
        db.ensure_connection()
        connection = db.connection
        query = psycopg.ClientCursor(connection).mogrify(sql, params)
        self.pgconn = connection.pgconn
        self.started = time.perf_counter()
        # Shown where the cursor's statements are (CaptureQueriesContext, debug logging).
        self.logged = {"sql": query, "time": ""} if db.queries_logged else None
        if self.logged is not None:
            db.queries_log.append(self.logged)
        self.pgconn.send_query(query.encode(connection.info.encoding))  # raises on failure
        while self.pgconn.flush():  # a non-blocking connection: what did not fit waits here
            _wait(self.pgconn.socket, select.POLLOUT)

    def rowcount(self) -> int | None:
        """The rows the statement changed; None when it failed or the connection broke (the
        caller then runs it again the usual way, which retries or reports the error)."""
        try:
            self.pgconn.consume_input()
            while self.pgconn.is_busy():
                _wait(self.pgconn.socket, select.POLLIN)
                self.pgconn.consume_input()
            results = []
            while (result := self.pgconn.get_result()) is not None:
                results.append(result)
        except psycopg.Error:
            return None
        if self.logged is not None:
            self.logged["time"] = f"{time.perf_counter() - self.started:.3f}"
        if len(results) != 1 or results[0].status != pq.ExecStatus.COMMAND_OK:
            return None
        return int(results[0].command_tuples or 0)


def _wait(fd: int, event: int) -> None:
    poller = select.poll()
    poller.register(fd, event)
    poller.poll()
