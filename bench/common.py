"""What the benchmarks share: the SMTP sink in its own process, the smtplib baseline, real worker
processes, process memory, statistics over rounds, and delivering through the pipeline.

Every figure is timed against the sink's own clock: the sink records ``time.monotonic()`` (one
clock for every process of the machine) when a message arrives, so a benchmark measures from
its call to the arrival of the last message, not to when it noticed.

The functions of the last section need Django set up first (configure_django()); they import
the project lazily so that a process that only runs the sink or the baseline never loads it.

Services: BENCH_REDIS_URL (default redis://127.0.0.1:6379/11), BENCH_AMQP_URL (default
amqp://guest:guest@127.0.0.1:5672/bench), BENCH_PG_URL (default
postgres://postgres@127.0.0.1:5432/bench_suite; the database is dropped and created, so its
name must start with ``bench_``). Run directories (SQLite files, worker logs) go under
$SITEMESSAGE_VAR_DIR, default var/bench.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiosmtpd.smtp import SMTP

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
#: Fresh interpreters for helper processes: forking a process that holds Django's database
#: connections, a broker connection and their threads is not safe.
SPAWN = multiprocessing.get_context("spawn")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/bench")
PG_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/bench_suite")
VAR_ROOT = Path(os.environ.get("SITEMESSAGE_VAR_DIR", ROOT / "var" / "bench")).resolve()
MB = 1024 * 1024
SENDER = "bench@localhost"
SUBJECT, TEXT = "Bench", "Numbers are up."


def fresh_postgres(url: str, variable: str) -> str:
    """Drops and creates the PostgreSQL database of ``url`` (its name must start with
    ``bench_``: ``variable`` names the setting to change otherwise); returns ``url``."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name.startswith("bench_"):
        raise ValueError(f"{variable}: {name!r} would be dropped; name one bench_...")
    with psycopg.connect(parts._replace(path="/postgres").geturl(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url


def script_database(db: str, var: Path, name: str) -> str:
    """The database URL of a bench script: a fresh PostgreSQL database ``bench_<name>`` next
    to the suite's, or SQLite in ``var``."""
    if db == "postgres":
        return fresh_postgres(f"{PG_URL.rsplit('/', 1)[0]}/bench_{name}", "BENCH_PG_URL")
    return f"sqlite:///{var / 'db.sqlite3'}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def timeout_for(count: int) -> float:
    """Seconds to wait for ``count`` messages: generous (50 msg/s), so only a stall times out."""
    return 30 + count / 50


def addresses(count: int, prefix: str = "u") -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(count)]


def text_of(size: int) -> str:
    """About ``size`` bytes of plain text (a large newsletter)."""
    line = "All figures are up this quarter; details follow in the attachment.\n"
    return line * (size // len(line))


class Sink:
    """An aiosmtpd server that accepts everything, in its own process (``running()``), so that
    its CPU is not the benchmark's. It counts messages and SMTP sessions (EHLO) and records when
    the last message arrived, in memory shared with every process the Sink is handed to."""

    def __init__(self) -> None:
        self.port = free_port()
        self._arrivals = SPAWN.RawValue("q", 0)
        self._sessions = SPAWN.RawValue("q", 0)
        self._last = SPAWN.RawValue("d", 0.0)

    @property
    def arrivals(self) -> int:
        return int(self._arrivals.value)

    @property
    def sessions(self) -> int:
        return int(self._sessions.value)

    def wait_for(self, count: int, timeout: float) -> float:
        """Waits until ``count`` messages have arrived since the sink started; returns when the
        last of them arrived (time.monotonic()). Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while self._arrivals.value < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sink has {self.arrivals} of {count} messages")
            time.sleep(0.001)
        return float(self._last.value)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self._sessions.value += 1
        session.host_name = hostname
        responses.insert(-1, "250-PIPELINING")  # as most servers do (RFC 2920)
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._last.value = time.monotonic()  # before the count: who sees the count sees the time
        self._arrivals.value += 1
        return "250 OK"

    def serve(self) -> None:
        """The sink process's body."""
        try:
            asyncio.run(self._serve())
        except KeyboardInterrupt:
            pass

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(self, hostname="bench-sink"), "127.0.0.1", self.port
        )
        await server.serve_forever()

    def running(self) -> _Running:
        return _Running(self)


class _Running:
    """``with Sink().running() as sink:`` the sink's process, stopped on the way out."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.process = SPAWN.Process(target=sink.serve, name="bench-sink", daemon=True)

    def __enter__(self) -> Sink:
        self.process.start()
        wait_port(self.sink.port)
        return self.sink

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(10)


def prebuilt(address: str, text: str = TEXT) -> bytes:
    email = EmailMessage()
    email["Subject"], email["From"], email["To"] = SUBJECT, SENDER, address
    email.set_content(text)
    return email.as_bytes()


def send_prebuilt(port: int, recipients: list[str], ready: Any, pipelined: bool) -> None:
    """One smtplib connection sending pre-built messages, from when every sender is connected
    (``ready``, a barrier): the baseline's body, in a process of its own. ``pipelined``: MAIL,
    RCPT and DATA as one group (RFC 2920), else smtplib's sendmail(), four round trips."""
    messages = [(address, prebuilt(address)) for address in recipients]
    with smtplib.SMTP("127.0.0.1", port) as conn:
        conn.ehlo()
        ready.wait()
        for address, data in messages:
            if not pipelined:
                conn.sendmail(SENDER, [address], data)
                continue
            conn.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{address}>\r\nDATA\r\n".encode())
            replies = [conn.getreply()[0] for _ in range(3)]
            if replies != [250, 250, 354]:
                raise smtplib.SMTPException(f"the sink replied {replies}")
            conn.send(_DOT_AT_LINE_START.sub(b"..", data).rstrip(b"\r\n") + b"\r\n.\r\n")
            if conn.getreply()[0] != 250:
                raise smtplib.SMTPException("the sink refused a message")


_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")


def smtp_rate(sink: Sink, connections: int, count: int, pipelined: bool = False) -> float:
    """Messages per second of ``connections`` smtplib connections in parallel, each in its own
    process with its share of ``count`` pre-built messages: from the moment all are connected
    to the last arrival. One connection is the baseline; several measure the sink's ceiling."""
    share = count // connections
    ready = SPAWN.Barrier(connections + 1)
    senders = [
        SPAWN.Process(
            target=send_prebuilt, args=(sink.port, addresses(share, f"b{i}-"), ready, pipelined)
        )
        for i in range(connections)
    ]
    for sender in senders:
        sender.start()
    try:
        first = sink.arrivals
        ready.wait(60)
        started = time.monotonic()
        last = sink.wait_for(first + share * connections, timeout_for(count))
    finally:
        for sender in senders:
            sender.join(10)
            if sender.is_alive():
                sender.terminate()
    return share * connections / (last - started)


@dataclass(frozen=True)
class Stat:
    """The values of the rounds of one figure."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def map(self, convert: Callable[[float], float]) -> Stat:
        return Stat.of(convert(value) for value in self.values)


def percentile(values: Sequence[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def memory(pid: int, field: str = "VmRSS") -> int:
    """A process's resident set (``VmRSS``) or its peak since start (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


class Worker:
    """A real ``celery -A workers worker -Q messenger.smtp -c PROCS`` with this process's
    environment (database, broker, SMTP port, var dir), its output in ``log``."""

    def __init__(self, procs: int, log: Path) -> None:
        self.procs, self.log = procs, log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "workers",
                    "worker",
                    "-Q",
                    "messenger.smtp",
                    "-c",
                    str(procs),
                    "-n",
                    f"bench{procs}.{os.getpid()}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "-l",
                    "WARNING",
                ],
                cwd=ROOT,
                env=os.environ.copy(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def pool(self) -> list[int]:
        """The pids of the pool processes."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in out.stdout.split()]

    def wait_pool(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.pool()) < self.procs:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start {self.procs} processes; {self.log}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), a kill after 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# Everything below needs Django set up (configure_django()).


def configure_django(
    settings: str, var_dir: Path, database_url: str, broker_url: str, smtp_port: int
) -> None:
    """Sets the environment that this process and the workers it starts share, sets Django
    up and migrates the database."""
    var_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        DJANGO_SETTINGS_MODULE=settings,
        DJANGO_SECRET_KEY="bench",
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=broker_url,
        SITEMESSAGE_VAR_DIR=str(var_dir),
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(smtp_port),
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def email(text: str = TEXT) -> Any:
    from dispatcher.messages import EmailTextMessage

    return EmailTextMessage(SUBJECT, text)


def clear() -> None:
    """Empties the tables a delivery writes, so each round starts from the same state."""
    from django.db import connection

    from dispatcher.models import Dispatch, DispatchError, Message

    with connection.cursor() as cursor:
        for model in (DispatchError, Dispatch, Message):
            cursor.execute(f"DELETE FROM {model._meta.db_table}")


def purge_smtp_queues() -> None:
    """Drops the delivery tasks waiting in the smtp queues (both lanes)."""
    from kombu import Queue

    from workers import broker
    from workers.app import app
    from workers.queues import queue_for

    with app.connection_for_write() as conn:
        for name in (queue_for("smtp"), queue_for("smtp", urgent=True)):
            queue = Queue(name, channel=conn.default_channel)
            queue.declare()
            queue.purge()
    broker.silence([queue_for("smtp"), queue_for("smtp", urgent=True)])


def wait_delivered(sink: Sink, count: int, timeout: float) -> float:
    """sink.wait_for(), and when it times out, what the database says about why."""
    from django.db.models import Count

    from dispatcher.models import Dispatch, DispatchError

    try:
        return sink.wait_for(count, timeout)
    except TimeoutError as exc:
        rows = Dispatch.objects.values_list("dispatch_status").annotate(n=Count("id"))
        statuses = {Dispatch.Status(status).label: n for status, n in rows}
        error = DispatchError.objects.order_by("-id").values_list("error_log", flat=True).first()
        raise TimeoutError(f"{exc}; dispatches: {statuses}; last error: {error}") from None


def settle(timeout: float = 60) -> None:
    """Waits until no dispatch is pending or in progress: the sink has a message before its
    worker records it as sent, and the next round must not race that write."""
    from dispatcher.models import Dispatch

    busy = Dispatch.objects.filter(
        dispatch_status__in=[Dispatch.Status.PENDING, Dispatch.Status.PROCESSING]
    )
    deadline = time.monotonic() + timeout
    while busy.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{busy.count()} dispatches still pending after {timeout} s")
        time.sleep(0.02)


def deliver_bulk(sink: Sink, to: list[str], message: Any) -> float:
    """One schedule_messages() call for every address; seconds from the call to the arrival of
    the last message."""
    from dispatcher import toolbox

    clear()
    first = sink.arrivals
    started = time.monotonic()
    toolbox.schedule_messages(message, toolbox.recipients("smtp", to))
    last = wait_delivered(sink, first + len(to), timeout_for(len(to)))
    settle()
    return last - started


def deliver_singles(sink: Sink, to: list[str]) -> tuple[float, float]:
    """One schedule_messages() call per address, as fast as this process makes them, while the
    workers consume; returns the seconds from the first call to the last arrival, and the
    seconds of scheduling per call."""
    from dispatcher import toolbox

    clear()
    first = sink.arrivals
    started = time.monotonic()
    for address in to:
        toolbox.schedule_messages(email(), toolbox.recipients("smtp", [address]))
    scheduled = time.monotonic()
    last = wait_delivered(sink, first + len(to), timeout_for(len(to)))
    settle()
    return last - started, (scheduled - started) / len(to)


def start_worker(sink: Sink, procs: int, log: Path) -> Worker:
    """A worker whose pool processes are up and which has delivered a few messages (warm)."""
    worker = Worker(procs, log)
    try:
        worker.wait_pool()
        deliver_singles(sink, addresses(2 * procs, "warm"))
    except BaseException:
        worker.stop()
        raise
    return worker
