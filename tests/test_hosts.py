"""Several worker hosts on one broker and one PostgreSQL (README "Running on several hosts").

Two `celery -A workers worker -Q messenger.smtp` "hosts" with different node names serve one
queue while this process schedules 5,000 e-mails in batches; every e-mail arrives exactly once,
and both hosts sent some. Each host sends to an SMTP server of its own (one sink per host), so
the servers count what each host sent.

- ``test_two_hosts_in_network_namespaces``: each host is a network namespace made here (as
  root, with `ip netns`), joined to this machine by a veth pair on a /30 of 10.201.0.0/16; the
  worker in it reaches PostgreSQL and the broker only through forwarders (socat) bound on the
  host side of its veth, and its SMTP server there, so every connection crosses the veth (the
  SMTP server sees the namespace's address). Skipped, with the reason, where namespaces
  cannot be made.
- ``test_two_worker_processes_on_one_machine``: the same with two worker processes on
  loopback; it runs everywhere.

Both need PostgreSQL (`make test` runs them in its PostgreSQL pass): several hosts share one
database server, which a SQLite file cannot be.

The example deployment in deploy/ (docker-compose.yml, systemd units) cannot run here; its tests
read it: the Celery app is `workers`, one worker per queue, exactly one beat, Flower with basic
auth on loopback, and `systemd-analyze verify` accepts the units.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from aiosmtpd.controller import Controller
from django.db import connection

from dispatcher.messages import EmailTextMessage
from dispatcher.models import Dispatch, DispatchError
from dispatcher.toolbox import recipients, schedule
from tests.support import ROOT, SMTPSink, WorkerProcess, database_url, free_port, purge, worker_env
from workers.app import app
from workers.queues import DEFAULT_QUEUE, queue_for

QUEUE = "messenger.smtp"
EMAILS = 5000
#: Recipients per schedule() call: the test schedules while the hosts deliver.
BATCH = 500
#: Seconds the hosts get to deliver the 5,000 e-mails.
DEADLINE = 90


class PeerSink(SMTPSink):
    """An SMTPSink that also keeps the address each message came from."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: Counter[str] = Counter()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.peers[session.peer[0]] += 1
        return await super().handle_DATA(server, session, envelope)


@dataclass
class Host:
    """A worker "host": its node name, the command prefix that runs a program on it, the
    address it reaches the services at, and the SMTP server it sends to."""

    name: str
    prefix: list[str]
    address: str
    sink: PeerSink = field(default_factory=PeerSink)
    smtp_port: int = 0


#: The port of a URL that names none, by scheme.
DEFAULT_PORTS = {"postgres": 5432, "postgresql": 5432, "redis": 6379, "amqp": 5672}


def endpoint(url: str) -> tuple[str, int]:
    """The (host, port) a database or broker URL points at."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORTS[parts.scheme]


def with_host(url: str, address: str) -> str:
    """``url`` (a database or broker URL) pointing at ``address``, with its port and the rest."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@" if credentials else ""
    return parts._replace(netloc=f"{netloc}{address}:{endpoint(url)[1]}").geturl()


def wait_for_port(address: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_smtp(stack: ExitStack, host: Host) -> None:
    """An SMTP server for ``host`` alone, on its address, stopped with ``stack``."""
    host.smtp_port = free_port()
    controller = Controller(host.sink, hostname=host.address, port=host.smtp_port)
    controller.start()
    stack.callback(controller.stop)


def start_forwarder(stack: ExitStack, address: str, target: tuple[str, int]) -> None:
    """socat on ``address``, at the target's port, forwarding each connection to ``target``;
    it and the processes it forks for connections are stopped with ``stack``."""
    forwarder = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{target[1]},bind={address},fork,reuseaddr",
         f"TCP:{target[0]}:{target[1]}"],
        start_new_session=True,  # its own process group: the forks go with it
    )  # fmt: skip
    stack.callback(stop_group, forwarder)
    wait_for_port(address, target[1])


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    proc.wait(10)


def start_worker(stack: ExitStack, host: Host, log: Path) -> WorkerProcess:
    """`celery -A workers worker -Q messenger.smtp -n <host>@%h` on ``host``, reaching the
    database and the broker at the host's address; returns once it is ready."""
    env = worker_env(
        {
            "DATABASE_URL": with_host(database_url(), host.address),
            "CELERY_BROKER_URL": with_host(app.conf.broker_url, host.address),
            "EMAIL_HOST": host.address,
            "EMAIL_PORT": str(host.smtp_port),
        }
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*host.prefix, sys.executable, "-m", "celery", "-A", "workers", "worker",
             "-Q", QUEUE, "-n", f"{host.name}@%h", "-c", "2", "-P", "prefork",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    worker = WorkerProcess(proc, log, host.name)
    stack.callback(worker.stop)
    deadline = time.monotonic() + 60
    while " ready." not in worker.text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{host.name} did not start:\n{worker.text()[-3000:]}")
        time.sleep(0.1)
    return worker


@pytest.fixture
def postgres() -> None:
    if connection.vendor != "postgresql":
        pytest.skip(
            "several hosts share one PostgreSQL: run with DATABASE_URL=postgres://... "
            "(`make test` does, in its PostgreSQL pass)"
        )


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def namespaces_unavailable() -> str:
    """Why network namespaces cannot be made here, or "" when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("socat") is None:
        return "needs `ip` (iproute2) and socat"
    probe = f"smprobe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    ip("netns", "delete", probe, check=False)
    return ""


def add_namespace(stack: ExitStack, n: int) -> Host:
    """Network namespace n (1 or 2) with a veth pair on 10.201.<subnet>.0/30, a subnet of this
    test run's own: .1 on this machine's side, .2 inside. Deleted with ``stack``, after every
    process left in it is killed."""
    tag = f"{os.getpid() % 100000}{n}"
    namespace, outside, inside = f"smhost{tag}", f"smh{tag}o", f"smh{tag}i"
    subnet = 2 * (os.getpid() % 127) + n  # 1 to 254
    ip("netns", "add", namespace)
    stack.callback(delete_namespace, namespace, outside)
    ip("link", "add", outside, "type", "veth", "peer", "name", inside)
    ip("link", "set", inside, "netns", namespace)
    ip("addr", "add", f"10.201.{subnet}.1/30", "dev", outside)
    ip("link", "set", outside, "up")
    for command in (
        ["addr", "add", f"10.201.{subnet}.2/30", "dev", inside],
        ["link", "set", inside, "up"],
        ["link", "set", "lo", "up"],
    ):
        ip("netns", "exec", namespace, "ip", *command)
    return Host(f"host{n}", ["ip", "netns", "exec", namespace], f"10.201.{subnet}.1")


def delete_namespace(namespace: str, outside: str) -> None:
    for pid in ip("netns", "pids", namespace, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)  # a worker child that outlived its parent
        except ProcessLookupError:
            pass
    ip("link", "delete", outside, check=False)  # takes its peer inside along
    ip("netns", "delete", namespace, check=False)


@pytest.fixture
def namespace_hosts(postgres) -> Iterator[list[Host]]:
    """Two hosts in network namespaces of their own (skipped where those cannot be made)."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"{reason}; test_two_worker_processes_on_one_machine covers the rest")
    with ExitStack() as stack:
        hosts = [add_namespace(stack, n) for n in (1, 2)]
        for host in hosts:
            for target in (endpoint(database_url()), endpoint(app.conf.broker_url)):
                start_forwarder(stack, host.address, target)
            start_smtp(stack, host)
        yield hosts


@pytest.fixture
def process_hosts(postgres) -> Iterator[list[Host]]:
    """Two hosts that are plain processes on this machine."""
    with ExitStack() as stack:
        hosts = [Host(f"host{n}", [], "127.0.0.1") for n in (1, 2)]
        for host in hosts:
            start_smtp(stack, host)
        yield hosts


def deliver_through(hosts: list[Host], tmp_path: Path) -> tuple[list[str], float]:
    """Starts a worker on each host, schedules EMAILS e-mails in batches of BATCH while they
    deliver, and waits until every dispatch is SENT; returns the addresses and the seconds."""
    purge([QUEUE])
    addresses = [f"r{n:05d}-{uuid.uuid4().hex[:6]}@example.com" for n in range(EMAILS)]
    with ExitStack() as stack:
        for host in hosts:
            start_worker(stack, host, tmp_path / f"{host.name}.log")
        started = time.monotonic()
        for start in range(0, EMAILS, BATCH):
            schedule(
                EmailTextMessage(f"Batch {start // BATCH}", "Hello from one of several hosts."),
                recipients("smtp", addresses[start : start + BATCH]),
            )
        sent = Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT)
        while sent.count() < EMAILS and time.monotonic() - started < DEADLINE:
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        time.sleep(1)  # what a host would send twice has time to arrive
    return addresses, elapsed


def check_exactly_once(hosts: list[Host], addresses: list[str], elapsed: float) -> None:
    """Every address got one e-mail and every e-mail one Message-ID; each host sent some."""
    per_host = {host.name: len(host.sink.messages) for host in hosts}
    print(f"{EMAILS} e-mails in {elapsed:.1f} s, per host: {per_host}")
    assert Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() == EMAILS
    assert not DispatchError.objects.exists()  # no dispatch needed a second attempt
    delivered = Counter(rcpt for host in hosts for rcpt in host.sink.recipients())
    assert sorted(delivered) == sorted(addresses)
    assert delivered.most_common(1)[0][1] == 1, "an address got two e-mails"
    ids = Counter(email["Message-ID"] for host in hosts for _, email in host.sink.messages)
    assert len(ids) == sum(per_host.values()) == EMAILS
    assert all(count > 0 for count in per_host.values()), per_host


@pytest.mark.e2e
@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_two_hosts_in_network_namespaces(namespace_hosts, tmp_path):
    addresses, elapsed = deliver_through(namespace_hosts, tmp_path)

    check_exactly_once(namespace_hosts, addresses, elapsed)
    for host in namespace_hosts:
        # Every e-mail a host sent came from its namespace's side of its veth.
        inside = host.address.removesuffix(".1") + ".2"
        assert set(host.sink.peers) == {inside}, host.sink.peers


@pytest.mark.e2e
@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_two_worker_processes_on_one_machine(process_hosts, tmp_path):
    addresses, elapsed = deliver_through(process_hosts, tmp_path)

    check_exactly_once(process_hosts, addresses, elapsed)


# deploy/: the example deployment

DEPLOY = ROOT / "deploy"


def compose_services() -> dict[str, dict]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]


def celery_commands(services: dict[str, dict]) -> dict[str, list[str]]:
    """The services that run Celery, and their commands after `celery -A workers`."""
    commands = {}
    for name, service in services.items():
        command = service.get("command", [])
        if command[:1] == ["celery"]:
            assert command[1:3] == ["-A", "workers"], name  # the app of README's commands
            commands[name] = command[3:]
    return commands


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_compose_runs_a_worker_per_queue_one_beat_and_flower_with_basic_auth():
    services = compose_services()
    commands = celery_commands(services)

    assert {"postgres", "redis", "web", "beat", "flower"} <= set(services)
    beats = [name for name, command in commands.items() if command[0] == "beat"]
    assert beats == ["beat"]  # exactly one
    workers = {name: command for name, command in commands.items() if command[0] == "worker"}
    assert sorted(option(c, "-Q") for c in workers.values()) == sorted(
        [DEFAULT_QUEUE, queue_for("smtp")]
    )
    nodes = [option(c, "-n") for c in workers.values()]
    assert len(set(nodes)) == len(nodes) and all(node.endswith("@%h") for node in nodes)
    for name in [*workers, *beats, "web"]:
        env = services[name]["environment"]
        assert env["CELERY_BROKER_URL"] == "redis://redis:6379/0", name  # one broker
        assert env["DATABASE_URL"].endswith("@postgres:5432/sitemessage"), name  # one database
        assert env["DJANGO_SECRET_KEY"] == "${DJANGO_SECRET_KEY:?set DJANGO_SECRET_KEY}", name
    flower = services["flower"]
    assert commands["flower"][0] == "flower"
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert "DATABASE_URL" not in flower["environment"]  # it needs the broker only
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert services["web"]["ports"] == ["127.0.0.1:8000:8000"]


def unit(name: str) -> dict[str, list[str]]:
    """The settings of a systemd unit file in deploy/systemd, each with its values in order."""
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_units_run_the_workers_app_per_queue_and_one_beat():
    worker = unit("sitemessage-worker@.service")
    beat = unit("sitemessage-beat.service")
    flower = unit("sitemessage-flower.service")

    [start] = worker["ExecStart"]
    assert start.startswith("/opt/sitemessage/.venv/bin/celery -A workers worker -Q %i -n %i@%%h ")
    assert int(worker["TimeoutStopSec"][0]) > 300  # beyond the task time limit: batches finish
    [start] = beat["ExecStart"]
    assert start.startswith("/opt/sitemessage/.venv/bin/celery -A workers beat ")
    [start] = flower["ExecStart"]
    assert (
        start
        == "/opt/sitemessage/.venv/bin/celery -A workers flower --address=127.0.0.1 --port=5555"
    )
    assert "/etc/sitemessage/flower.env" in flower["EnvironmentFile"]  # FLOWER_BASIC_AUTH
    for settings in (worker, beat, flower):
        assert settings["User"] == ["sitemessage"]
        assert settings["EnvironmentFile"][0] == "/etc/sitemessage/sitemessage.env"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    # With this checkout in place of /opt/sitemessage, so the executables exist.
    for path in (DEPLOY / "systemd").iterdir():
        text = path.read_text().replace("/opt/sitemessage", str(ROOT))
        (tmp_path / path.name).write_text(text)
    units = ["sitemessage-beat.service", "sitemessage-flower.service",
             "sitemessage-worker@messenger.smtp.service"]  # fmt: skip

    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"./{name}" for name in units)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert (done.returncode, done.stdout + done.stderr) == (0, "")
