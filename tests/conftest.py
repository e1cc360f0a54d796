"""Fixtures with real components: an aiosmtpd SMTP server on loopback, real `celery worker`
processes on a real broker (CELERY_BROKER_URL), the real database of the test run."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message as EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from django.db import connection
from kombu import Queue

from messengers import registry

pytest_plugins = ["tests.fake_apis"]  # the local X and Telegram API servers
ROOT = Path(__file__).resolve().parent.parent
logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every SMTP command


class SMTPSink:
    """Collects what the server accepted; ``reject`` maps addresses to SMTP replies."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self.reject: dict[str, str] = {}
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.reject:
            return self.reject[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 Message accepted for delivery"

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def recipients(self) -> list[str]:
        with self.lock:
            return [rcpt for rcpts, _ in self.messages for rcpt in rcpts]


@pytest.fixture
def smtp_server() -> Iterator[tuple[SMTPSink, int]]:
    sink = SMTPSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()


@pytest.fixture
def registered() -> Iterator[None]:
    """Restores the messenger registry after a test that registers its own messengers."""
    saved = dict(registry._registry)
    try:
        yield
    finally:
        registry._registry.clear()
        registry._registry.update(saved)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url() -> str:
    """The URL of the database this test run uses (the test database, not the configured one)."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def purge(queues: list[str]) -> None:
    from workers import app

    with app.connection_for_write() as conn:
        for name in queues:
            queue = Queue(name, channel=conn.default_channel)
            queue.declare()
            queue.purge()


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, log: Path, name: str) -> None:
        self.proc, self.log, self.name = proc, log, name

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in out.stdout.split()]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


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
        log = tmp_path / f"worker-{len(started)}.log"
        proc_env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": database_url(),
            **(env or {}),
        }
        cmd = [
            sys.executable, "-m", "celery", "-A", "workers", "worker",
            "-Q", ",".join(queues), "-c", str(concurrency), "-P", pool, "-n", name,
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=proc_env, stdout=out, stderr=subprocess.STDOUT
            )
        worker = WorkerProcess(proc, log, name)
        started.append(worker)
        deadline = time.monotonic() + 60
        while " ready." not in worker.text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{worker.text()[-3000:]}")
            time.sleep(0.1)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
