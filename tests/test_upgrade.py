"""An existing django-sitemessage 1.4 database upgrades in place with `manage.py migrate`.

The database is made by the real django-sitemessage 1.4 from PyPI, in a virtualenv of its own
(var/upstream-sitemessage-1.4, made once), with nothing of this repository on its path
(tests/upgrade/make_upstream_db.py). Then our migrations run on it, every row is compared, and
a real worker delivers what was still due: pending, error and processing dispatches are sent,
sent and failed ones are not. Runs on whatever DATABASE_URL says (SQLite or PostgreSQL).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support import ROOT, database_url, run_python, wait_until

pytestmark = pytest.mark.e2e

UPSTREAM = ["django-sitemessage==1.4.0", "django>=4.2,<5", "dj-database-url", "psycopg[binary]"]
VENV = ROOT / "var" / "upstream-sitemessage-1.4"
MAKER = Path(__file__).parent / "upgrade" / "make_upstream_db.py"

DUMP = """
import json
from django.db import connection
from dispatcher.models import Dispatch, DispatchError, Message, Subscription
tables = sorted(t for t in connection.introspection.table_names() if t.startswith("sitemessage_"))
with connection.cursor() as cursor:
    schema = {
        t: sorted(
            (c.name, c.type_code if isinstance(c.type_code, str) else str(c.type_code), c.null_ok)
            for c in connection.introspection.get_table_description(cursor, t)
        )
        for t in tables
    }
print(json.dumps({
    "messages": list(Message.objects.values("id", "cls", "context", "priority")),
    "dispatches": list(Dispatch.objects.values(
        "id", "message_id", "address", "dispatch_status", "retry_count", "recipient_id"
    ).order_by("id")),
    "errors": list(DispatchError.objects.values("dispatch_id", "error_log").order_by("id")),
    "subscriptions": list(Subscription.objects.values(
        "message_cls", "messenger_cls", "recipient_id", "address").order_by("id")),
    "schema": schema,
}, default=str))
"""


def upstream_python() -> Path:
    """The Python of a virtualenv holding django-sitemessage 1.4 (made on first use)."""
    python = VENV / "bin" / "python"
    if not (VENV / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *UPSTREAM], check=True, timeout=600
        )
        (VENV / ".installed").touch()
    return python


@pytest.fixture
def scratch_database(tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of the test run's kind (a SQLite file, or a PostgreSQL
    database created and dropped here)."""
    url = database_url()
    if not url.startswith("postgres"):
        yield f"sqlite:///{tmp_path / f'db-{uuid.uuid4().hex[:6]}.sqlite3'}"
        return
    import psycopg

    name = f"sm_upgrade_{uuid.uuid4().hex[:8]}"
    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


scratch_database_2 = scratch_database


def ours(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    result = run_python("manage.py", *args, env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def dump(url: str) -> dict:
    return json.loads(ours("shell", "-c", DUMP, url=url).stdout.strip().splitlines()[-1])


def test_a_django_sitemessage_database_upgrades_in_place_and_delivers_what_was_due(
    tmp_path, scratch_database, scratch_database_2, smtp_server, start_worker
):
    made = subprocess.run(
        [str(upstream_python()), str(MAKER), scratch_database],
        cwd=tmp_path,  # nothing of this repository on the path
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    before = json.loads(made.stdout.strip().splitlines()[-1])

    migrated = ours("migrate", url=scratch_database)
    assert "Applying sitemessage.0005_celery_delivery... OK" in migrated.stdout
    assert "Applying sitemessage.0006_subscriptions_optout_send_window... OK" in migrated.stdout
    assert "sitemessage.0001_initial" not in migrated.stdout  # django-sitemessage's, kept
    after = dump(scratch_database)

    for table in ("dispatches", "errors"):
        assert after[table] == before[table], table
    assert before["subscriptions"][2] == before["subscriptions"][0]  # the doubled one
    assert after["subscriptions"] == before["subscriptions"][:2]  # removed, the first kept
    assert after["messages"] == before["messages"]  # the context text is now JSON, same value
    ours("migrate", url=scratch_database_2)
    assert after["schema"] == dump(scratch_database_2)["schema"]  # as a fresh database

    sink, port = smtp_server
    env = {"DATABASE_URL": scratch_database, "EMAIL_PORT": str(port)}
    start_worker(["messenger.smtp"], env=env)
    ours("sitemessage_send_scheduled", url=scratch_database)
    due = ["ann@example.com", "bob@example.com", "error@example.com", "processing@example.com"]
    subscribers = ["bob@example.com", "x@example.com"]  # of the waiting message: bob once
    sink.wait_for(len(due) + len(subscribers), timeout=30)
    assert wait_until(
        lambda: (
            sorted(
                (d["address"], d["dispatch_status"]) for d in dump(scratch_database)["dispatches"]
            )
            == sorted(
                [
                    *[(a, 2) for a in due + subscribers],
                    ("sent@example.com", 2),
                    ("failed@example.com", 4),
                ]
            )
        ),
        timeout=30,
        interval=1,
    )
    # Each once; sent and failed ones never again.
    assert sorted(sink.recipients()) == sorted(due + subscribers)
    by_subject: dict[str, list[str]] = {}
    for rcpt, email in sink.messages:
        by_subject.setdefault(email["Subject"], []).extend(rcpt)
        expected = {
            "Upgrade": "Written by django-sitemessage 1.4.",
            "Digest": "For the subscribers.",
        }
        assert email.get_payload().strip() == expected[email["Subject"]]
    assert sorted(by_subject["Digest"]) == subscribers

    # Going back: our migration reverses, and django-sitemessage 1.4 reads its rows again.
    ours("migrate", "sitemessage", "0004", url=scratch_database)
    back = subprocess.run(
        [str(upstream_python()), str(MAKER), scratch_database, "--read"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert back.returncode == 0, back.stderr
    statuses = {d["address"]: d["dispatch_status"] for d in json.loads(back.stdout)["dispatches"]}
    assert statuses == {
        **{a: 2 for a in due + subscribers},
        "sent@example.com": 2,
        "failed@example.com": 4,
    }
