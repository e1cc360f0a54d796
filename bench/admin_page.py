"""How long the admin takes to show a message of 50,000 dispatches, on SQLite and PostgreSQL.

    .venv/bin/python bench/admin_page.py [--db sqlite|postgres|both] [--dispatches N]

Each database runs in a process of its own, on a fresh database (a SQLite file under
$SITEMESSAGE_VAR_DIR, default var/bench; PostgreSQL's ``bench_admin_page``, dropped and created,
or BENCH_ADMIN_PG_URL's, whose name must start with ``bench_``). It stores one message with N
dispatches (bulk_create), then times, through Django's test client as a logged-in superuser,
the median of 5 requests of: the message's page (first, middle and last page of its dispatches),
the message list, the dispatch list filtered to the message, and the dashboard's figures
(dispatcher.dashboard.delivery_figures(), without the 1 s wait for the workers' answer).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from common import ROOT, VAR_ROOT, configure_django, fresh_postgres

PG_URL = os.environ.get("BENCH_ADMIN_PG_URL", "postgres://postgres@127.0.0.1:5432/bench_admin_page")
BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/11")
ROUNDS = 5


def fresh_database(db: str) -> str:
    """The URL of an empty database for this run."""
    if db == "sqlite":
        path = VAR_ROOT / "admin_page" / "db.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in path.parent.glob("db.sqlite3*"):
            leftover.unlink()
        return f"sqlite:///{path}"
    return fresh_postgres(PG_URL, "BENCH_ADMIN_PG_URL")


def median_ms(action: Callable[[], object]) -> float:
    action()  # warm: templates compiled, connection open
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def run(db: str, dispatches: int) -> None:
    """One database's figures, printed one line each."""
    configure_django("tests.settings", VAR_ROOT / "admin_page", fresh_database(db), BROKER_URL, 25)
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment
    from django.urls import reverse

    from dispatcher import dashboard
    from dispatcher.admin import INLINE_DISPATCHES, PAGE_PARAM
    from dispatcher.models import Dispatch, Message

    setup_test_environment()  # the test client's host is allowed
    message = Message.objects.create(cls="email_plain", context={"subject": "s", "stext_": "t"})
    Dispatch.objects.bulk_create(
        (
            Dispatch(
                message=message,
                messenger="smtp",
                address=f"r{n}@example.com",
                dispatch_status=Dispatch.Status.SENT if n % 10 else Dispatch.Status.PENDING,
            )
            for n in range(dispatches)
        ),
        batch_size=5000,
    )
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("bench", password="bench"))
    change = reverse("admin:sitemessage_message_change", args=[message.pk])
    last = -(-dispatches // INLINE_DISPATCHES)

    def get(url: str, **params: int) -> Callable[[], object]:
        def request() -> None:
            response = client.get(url, params)
            assert response.status_code == 200, response.status_code

        return request

    figures = [
        ("message page, first dispatches", get(change)),
        ("message page, middle page", get(change, **{PAGE_PARAM: last // 2})),
        ("message page, last page", get(change, **{PAGE_PARAM: last})),
        ("message list", get(reverse("admin:sitemessage_message_changelist"))),
        (
            "dispatch list of the message",
            get(reverse("admin:sitemessage_dispatch_changelist"), message__id__exact=message.pk),
        ),
        ("dashboard figures (4 queries)", dashboard.delivery_figures),
    ]
    for what, action in figures:
        print(
            f"{connection.vendor:<10} {dispatches:>7,} dispatches  {what:<32} {median_ms(action):7.1f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--dispatches", type=int, default=50_000)
    parser.add_argument("--run", choices=["sqlite", "postgres"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(args.run, args.dispatches)
        return 0
    status = 0
    for db in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
        command = [sys.executable, __file__, "--run", db, "--dispatches", str(args.dispatches)]
        status |= subprocess.run(command, cwd=ROOT, check=False).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
