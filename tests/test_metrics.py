"""dispatcher.metrics and dispatcher.monitoring: the workers' counters, added up over the prefork
pool's processes, and /metrics with its database gauges and its protection.

The end-to-end test runs a real `celery worker` (prefork, two children) against the real SMTP
sink and scrapes /metrics through the Django test client, which reads the files the worker's
processes wrote into the test's own metrics directory.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from django.test import override_settings
from django.utils import timezone
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import metrics
from dispatcher.models import Dispatch
from dispatcher.monitoring import STATUS_LABELS
from sitemessage.messages.email import EmailTextMessage
from sitemessage.toolbox import recipients, schedule_messages
from tests.faultsapp.helpers import make_dispatch
from tests.support import wait_until

Status = Dispatch.Status
TOKEN = "a-scraper-token-of-32-characters"


def scrape(client, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics; its samples as {(name, sorted labels): value}."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return samples(response.content.decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def staff(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("ops", password="pw", is_staff=True))
    return client


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_the_counters_add_up_the_prefork_processes_and_match_the_database(
    smtp_server, start_worker, tmp_path, client, django_user_model
):
    sink, port = smtp_server
    sink.reject["gone@example.com"] = "550 5.1.1 no such user"
    sink.reject["later@example.com"] = "451 4.3.0 try again later"
    directory = tmp_path / "metrics"
    worker = start_worker(
        ["messenger.smtp"],
        concurrency=2,
        env={
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(port),
            "SITEMESSAGE_METRICS_DIR": str(directory),
            "SITEMESSAGE_BATCH_SIZE": "2",  # 17 tasks, so both children take some
        },
    )
    good = [f"user{i}@example.com" for i in range(32)]

    with override_settings(SITEMESSAGE_METRICS_DIR=str(directory), SITEMESSAGE_BATCH_SIZE=2):
        schedule_messages(
            EmailTextMessage("Report", "Numbers."),
            recipients("smtp", [*good, "gone@example.com", "later@example.com"]),
        )
        sink.wait_for(len(good), timeout=60)
        rows = Dispatch.objects.filter(messenger="smtp")
        assert wait_until(
            lambda: (
                sorted(rows.values_list("dispatch_status", flat=True))
                == sorted([Status.SENT] * len(good) + [Status.ERROR, Status.FAILED])
            ),
            timeout=30,
        )
        client.force_login(
            django_user_model.objects.create_user("ops", password="pw", is_staff=True)
        )
        response = client.get("/metrics")
        with override_settings(SITEMESSAGE_METRICS_TOKEN=TOKEN):
            client.logout()
            by_token = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            refused = client.get("/metrics")

    assert response.status_code == by_token.status_code == 200
    assert refused.status_code == 401
    text = response.content.decode()
    assert "@example.com" not in text  # no address in any label
    found = samples(text)
    assert samples(by_token.content.decode()) == found

    # Worker counters: every dispatch counted once, by whichever process sent it; one series
    # per worker node.
    [node_dir] = directory.iterdir()
    assert node_dir.name == worker.name.replace("%h", socket.gethostname())
    mine = {"messenger": "smtp", "worker": node_dir.name}
    assert len(sink.messages) == len(good)
    outcome = "sitemessage_outcomes_total"
    assert value(found, outcome, **mine, outcome="sent") == len(good)
    assert value(found, outcome, **mine, outcome="failed") == 1
    assert value(found, outcome, **mine, outcome="retried") == 1
    attempts = len(good) + 2
    assert value(found, "sitemessage_send_seconds_count", **mine) == attempts
    assert value(found, "sitemessage_send_seconds_bucket", **mine, le="+Inf") == attempts
    assert 0 < value(found, "sitemessage_send_seconds_sum", **mine) < 60
    # ... and the sent ones came from both pool children, each writing its own file.
    writers = {int(re.sub(r"\D", "", p.stem)) for p in node_dir.glob("counter_*.db")}
    children = worker.children()
    assert len(children) == 2
    assert set(children) <= writers

    # Database gauges: what the table holds.
    for status, label in STATUS_LABELS.items():
        expected = rows.filter(dispatch_status=status).count()
        assert value(found, "sitemessage_dispatches", messenger="smtp", status=label) == expected
    assert value(found, "sitemessage_expired_leases", messenger="smtp") == 0
    assert value(found, "sitemessage_oldest_pending_seconds", messenger="smtp") == 0


@pytest.mark.django_db
def test_the_database_gauges_count_statuses_waiting_age_and_expired_leases(staff):
    now = timezone.now()
    for status in (Status.SENT, Status.SENT, Status.FAILED, Status.ERROR):
        make_dispatch(status)
    make_dispatch(Status.PENDING, time_created=now - timedelta(seconds=300))
    make_dispatch(Status.PENDING, time_created=now - timedelta(seconds=5))
    # Waiting since its send_at (60 s), not since it was created; one not yet due is no backlog.
    make_dispatch(
        Status.PENDING,
        messenger="telegram",
        time_created=now - timedelta(days=2),
        send_at=now - timedelta(seconds=60),
    )
    make_dispatch(
        Status.PENDING,
        messenger="telegram",
        time_created=now - timedelta(days=3),
        send_at=now + timedelta(days=1),
    )
    make_dispatch(Status.PROCESSING, lease_expires_at=now - timedelta(seconds=1))
    make_dispatch(Status.PROCESSING, lease_expires_at=now - timedelta(hours=1))
    make_dispatch(Status.PROCESSING, lease_expires_at=now + timedelta(seconds=30))

    found = scrape(staff)

    counts = {"sent": 2, "failed": 1, "error": 1, "pending": 2, "processing": 3}
    for label, expected in counts.items():
        assert value(found, "sitemessage_dispatches", messenger="smtp", status=label) == expected
    assert value(found, "sitemessage_dispatches", messenger="telegram", status="pending") == 2
    assert value(found, "sitemessage_dispatches", messenger="telegram", status="sent") == 0
    # recorder: registered by a test app, no rows, still has its series.
    assert value(found, "sitemessage_dispatches", messenger="recorder", status="pending") == 0
    assert 300 <= value(found, "sitemessage_oldest_pending_seconds", messenger="smtp") < 330
    assert 60 <= value(found, "sitemessage_oldest_pending_seconds", messenger="telegram") < 90
    assert value(found, "sitemessage_oldest_pending_seconds", messenger="recorder") == 0
    assert value(found, "sitemessage_expired_leases", messenger="smtp") == 2
    assert value(found, "sitemessage_expired_leases", messenger="telegram") == 0


@pytest.mark.django_db
def test_metrics_are_refused_without_staff_or_the_token(client, django_user_model):
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous["WWW-Authenticate"] == 'Bearer realm="sitemessage metrics"'

    # No token configured: a bearer header opens nothing.
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
    with override_settings(SITEMESSAGE_METRICS_TOKEN=TOKEN):
        wrong = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN[:-1]}x"})
        assert wrong.status_code == 401
        assert 'error="invalid_token"' in wrong["WWW-Authenticate"]
        assert client.get("/metrics", headers={"Authorization": TOKEN}).status_code == 401
        right = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200
        assert b"sitemessage_dispatches" in right.content
        assert (
            client.post("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405
        )

    user = django_user_model.objects.create_user("someone", password="pw")
    client.force_login(user)
    assert client.get("/metrics").status_code == 403
    user.is_staff = True
    user.save()
    assert client.get("/metrics").status_code == 200
    user.is_active = False
    user.save()
    assert client.get("/metrics").status_code == 401


@pytest.mark.django_db
def test_openmetrics_is_served_when_the_scraper_asks(staff):
    response = staff.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.decode().endswith("# EOF\n")


def test_a_short_token_is_refused_by_name():
    from django.core.exceptions import ImproperlyConfigured

    from dispatcher import conf

    with pytest.raises(ImproperlyConfigured, match="SITEMESSAGE_METRICS_TOKEN must be at least 16"):
        conf.METRICS_TOKEN.check("short")


@pytest.fixture
def worker_process(monkeypatch):
    """Lets this process play a worker's main process (metrics.start_worker), then undoes what
    that changes in it: the environment variable, prometheus_client's value class, the cache."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    metrics._collectors.cache_clear()
    yield
    metrics._collectors.cache_clear()


def test_a_starting_worker_empties_its_own_directory_only(tmp_path, worker_process):
    mine, other = tmp_path / "celery@here", tmp_path / "other@here"
    for directory in (mine, other):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"stale")

    with override_settings(SITEMESSAGE_METRICS_DIR=str(tmp_path)):
        started = metrics.start_worker("celery@here", ["smtp"])
        metrics.count_outcome("smtp", "sent")
        metrics.observe_send("smtp", 0.02)

    assert started == mine
    assert os.environ[metrics.MULTIPROC_ENV] == str(mine)
    assert not (mine / "counter_1.db").exists()
    assert (other / "counter_1.db").read_bytes() == b"stale"
    # The other worker's files: a copy of this one's, as if it had counted the same.
    (other / "counter_1.db").unlink()
    [counts] = mine.glob("counter_*.db")
    shutil.copy(counts, other / "counter_2.db")

    found = samples_of(metrics.WorkerCounters(tmp_path))
    for worker in ("celery@here", "other@here"):
        assert found[("sitemessage_outcomes_total", "smtp", "sent", worker)] == 1
        # Declared at start, so a first failure is a rise from 0.
        assert found[("sitemessage_outcomes_total", "smtp", "failed", worker)] == 0
    assert found[("sitemessage_send_seconds_count", "smtp", "", "celery@here")] == 1


def test_outside_a_worker_nothing_is_counted_and_no_file_written(tmp_path, worker_process):
    with override_settings(SITEMESSAGE_METRICS_DIR=str(tmp_path)):
        metrics.count_outcome("smtp", "sent")
        metrics.observe_send("smtp", 0.1)
    assert metrics._collectors() is None
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_outcome_is_refused():
    with pytest.raises(ValueError, match="unknown outcome 'bounced'"):
        metrics.count_outcome("smtp", "bounced")


def test_the_metrics_directory_defaults_to_var_dir(settings):
    settings.SITEMESSAGE_METRICS_DIR = None
    assert metrics.metrics_dir() == Path(settings.VAR_DIR) / "metrics"
    settings.SITEMESSAGE_METRICS_DIR = "/srv/counters"
    assert metrics.metrics_dir() == Path("/srv/counters")
    assert metrics.worker_dir(Path("/m"), "celery@host/../x") == Path("/m/celery@host_.._x")


def samples_of(collector: metrics.WorkerCounters) -> dict[tuple[str, str, str, str], float]:
    """{(sample name, messenger, outcome or "", worker): value}, buckets left out."""
    return {
        (
            sample.name,
            sample.labels["messenger"],
            sample.labels.get("outcome", ""),
            sample.labels["worker"],
        ): sample.value
        for family in collector.collect()
        for sample in family.samples
        if "le" not in sample.labels
    }
