"""Helpers of the test suite, imported by test modules (conftest.py holds only fixtures): an
aiosmtpd SMTP server on loopback, real `celery worker` processes, waiting, the test database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from email import message_from_bytes
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from django.db import connection
from kombu import Queue

ROOT = Path(__file__).resolve().parent.parent


class SMTPSink:
    """Collects what the server accepted; ``reject`` maps addresses to SMTP replies. It offers
    PIPELINING, as most servers do; set ``pipelining`` False for one that does not."""

    pipelining = True

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self.reject: dict[str, str] = {}
        self.lock = threading.Lock()
        #: SMTP sessions opened (EHLO), whether or not they sent anything.
        self.sessions = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.sessions += 1
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

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


class SMTPServer:
    """An aiosmtpd server on a loopback port; it keeps its port across stop() and start(), so
    a test can take it down and bring it back. ``options`` go to aiosmtpd's Controller (TLS,
    authentication, ...)."""

    def __init__(self, sink: Any = None, port: int | None = None, **options: Any) -> None:
        self.sink = sink if sink is not None else SMTPSink()
        self.port = port or free_port()
        self.options = options
        self.controller: Controller | None = None

    def start(self) -> SMTPServer:
        if self.controller is None:
            controller = Controller(self.sink, hostname="127.0.0.1", port=self.port, **self.options)
            controller.start()
            self.controller = controller
        return self

    def stop(self) -> None:
        controller, self.controller = self.controller, None
        if controller is not None:
            controller.stop()


def resolve_to_loopback(monkeypatch: Any, name: str) -> None:
    """Makes the host name ``name`` resolve to 127.0.0.1 for this test (TLS still checks it)."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real_getaddrinfo("127.0.0.1" if host == name else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


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
    from workers import broker
    from workers.app import app

    with app.connection_for_write() as conn:
        for name in queues:
            queue = Queue(name, channel=conn.default_channel)
            queue.declare()
            queue.purge()
    broker.silence(queues)


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


def worker_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker (or manage.py) process on the test database."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url(),
        **(env or {}),
    }


def run_python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``python ARGS`` (``manage.py ...``, ``-m celery ...``) on the test database."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
