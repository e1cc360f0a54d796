"""Fixtures with real components: aiosmtpd SMTP servers on loopback, real `celery worker`
processes on a real broker (CELERY_BROKER_URL), the real database of the test run; and the
three ways a test keeps its effects to itself: ``no_publish`` (no task reaches the broker),
``registries`` (messengers and message types registered by the test are forgotten after it),
``smtp_servers`` (every server a test starts is stopped). Helpers live in tests/support.py."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import types
from messengers import registry
from tests.support import ROOT, SMTPServer, SMTPSink, WorkerProcess, purge, worker_env
from workers import broker

pytest_plugins = ["tests.fake_apis", "tests.browser"]  # the local X and Telegram API servers
logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every SMTP command


@pytest.fixture
def smtp_servers() -> Iterator[Callable[..., SMTPServer]]:
    """Starts SMTP servers: ``smtp_servers(sink=None, port=None, start=True, **options)``."""
    servers: list[SMTPServer] = []

    def start(sink: Any = None, port: int | None = None, start: bool = True, **options: Any):
        server = SMTPServer(sink, port, **options)
        servers.append(server)
        return server.start() if start else server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def smtp_server(smtp_servers) -> tuple[SMTPSink, int]:
    """One running SMTP server: its sink and port."""
    server = smtp_servers()
    return server.sink, server.port


@pytest.fixture(autouse=True)
def no_doorbell_left() -> None:
    """Clears the doorbells an earlier test left pending (a task published with no worker to
    answer it), which would keep this test's calls from publishing."""
    bells = broker._bells()
    if bells is not None:
        keys = bells.keys(broker._BELL_PREFIX + "*")
        if keys:
            bells.delete(*keys)


@pytest.fixture
def no_publish(monkeypatch) -> list[dict[str, list[int]]]:
    """Keeps every task from being published; returns the delivery batches that would have
    been, one dict (messenger alias -> dispatch ids) per call."""
    published: list[dict[str, list[int]]] = []

    def enqueue(
        ids_by_messenger: dict[str, list[int]],
        batch_size: int,
        urgent: bool = False,
        doorbell: float = 0,
    ) -> list[int]:
        if ids_by_messenger:
            published.append({alias: list(ids) for alias, ids in ids_by_messenger.items()})
        return []

    monkeypatch.setattr(broker, "enqueue", enqueue)
    return published


@pytest.fixture
def registries() -> Iterator[None]:
    """Restores the messenger and message type registries after a test that registers its own."""
    saved_messengers = dict(registry._registry)
    saved_types = dict(types._message_types)
    try:
        yield
    finally:
        registry._registry.clear()
        registry._registry.update(saved_messengers)
        types._message_types.clear()
        types._message_types.update(saved_types)


def launch(
    cmd: list[str], log: Path, name: str, ready: str, env: dict[str, str] | None
) -> WorkerProcess:
    """Starts ``python -m celery ...`` on the test database, logging to ``log``; returns once
    the log shows ``ready`` (raises with the log's end if it never does)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", *cmd],
            cwd=ROOT,
            env=worker_env(env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    process = WorkerProcess(proc, log, name)
    deadline = time.monotonic() + 60
    while ready not in process.text():
        if proc.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"{name} did not start:\n{process.text()[-3000:]}")
        time.sleep(0.1)
    return process


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts `celery -A workers worker` processes against the test database; stops them after."""
    started: list[WorkerProcess] = []

    def start(
        queues: list[str],
        concurrency: int = 2,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
        purge_first: bool = True,
    ) -> WorkerProcess:
        if purge_first:
            purge(queues)
        name = f"test-{uuid.uuid4().hex[:8]}@%h"
        cmd = [
            "worker", "-Q", ",".join(queues), "-c", str(concurrency), "-P", pool, "-n", name,
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
        ]  # fmt: skip
        started.append(launch(cmd, tmp_path / f"worker-{len(started)}.log", name, " ready.", env))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def start_beat(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts one `celery -A workers beat` (the sweep every SITEMESSAGE_SWEEP_INTERVAL seconds,
    from ``env`` or the default); stops it after."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str] | None = None) -> WorkerProcess:
        n = len(started)
        cmd = ["beat", "-l", "INFO", "-s", str(tmp_path / f"beat-schedule-{n}"),
               "--pidfile", str(tmp_path / f"beat-{n}.pid")]  # fmt: skip
        started.append(launch(cmd, tmp_path / f"beat-{n}.log", "beat", "beat: Starting...", env))
        return started[-1]

    yield start
    for beat in started:
        beat.stop()
