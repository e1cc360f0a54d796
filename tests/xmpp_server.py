"""A real prosody XMPP server on loopback for the tests, and a recipient client that collects
what it receives.

prosody runs in the foreground with a throw-away config under tmp_path: c2s on 127.0.0.1 at a
free port, no s2s, no TLS (the messenger is built with use_tls=False; ``prosody_tls`` is the
same server requiring STARTTLS with a self-signed certificate), plain-text accounts
created with prosodyctl, stream management (mod_smacks; ``prosody_no_smacks`` is the same
server without it) and offline storage, so messages sent while a recipient is away (a server
restart) reach it when it is back.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slixmpp import ClientXMPP

from tests.support import free_port

DOMAIN = "localhost"
SENDER, PASSWORD = f"sender@{DOMAIN}", "sender-secret"
#: Accounts created on every server: user -> password.
ACCOUNTS = {"sender": PASSWORD, **{f"rcpt{i}": f"rcpt{i}-secret" for i in range(5)}}

CONFIG = """\
pidfile = "{dir}/prosody.pid"
data_path = "{dir}/data"
certificates = "{dir}/certs"
run_as_root = true
log = {{ info = "{dir}/prosody.log" }}
interfaces = {{ "127.0.0.1" }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
s2s_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", {smacks}"offline", "disco", "ping", "tls" }}
authentication = "internal_plain"
allow_unencrypted_plain_auth = true
{tls}
s2s_require_encryption = false
limits = {{ c2s = {{ rate = "100mb/s" }} }}
VirtualHost "{domain}"
"""
NO_TLS = 'modules_disabled = { "s2s", "tls" }\nc2s_require_encryption = false'
#: STARTTLS required, with a self-signed certificate for DOMAIN (``Prosody.certificate``).
TLS = """\
modules_disabled = {{ "s2s" }}
c2s_require_encryption = true
ssl = {{ certificate = "{dir}/certs/{domain}.crt", key = "{dir}/certs/{domain}.key" }}
"""


class Prosody:
    """One prosody process; ``restart()`` keeps its accounts and offline messages."""

    def __init__(self, directory: Path, tls: bool = False, smacks: bool = True) -> None:
        if not shutil.which("prosody"):
            pytest.skip("prosody is not installed (apt-get install -y prosody)")
        self.dir, self.port = directory, free_port()
        self.config = directory / "prosody.cfg.lua"
        self.log = directory / "prosody.log"
        self.certificate = directory / "certs" / f"{DOMAIN}.crt"
        (directory / "data").mkdir(parents=True)
        (directory / "certs").mkdir()
        if tls:
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", f"/CN={DOMAIN}",
                 "-addext", f"subjectAltName=DNS:{DOMAIN}", "-out", str(self.certificate),
                 "-keyout", str(self.certificate.with_suffix(".key"))],
                check=True, capture_output=True, timeout=10,
            )  # fmt: skip
        extra = TLS.format(dir=directory, domain=DOMAIN) if tls else NO_TLS
        self.config.write_text(
            CONFIG.format(
                dir=directory,
                port=self.port,
                domain=DOMAIN,
                tls=extra,
                smacks='"smacks", ' if smacks else "",
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        for user, password in ACCOUNTS.items():
            self.register(user, password)

    def register(self, user: str, password: str) -> None:
        subprocess.run(
            ["prosodyctl", "--config", str(self.config), "register", user, DOMAIN, password],
            check=True,
            capture_output=True,
            timeout=10,
        )

    def start(self, timeout: float = 10) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            ["prosody", "--config", str(self.config), "-F"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while "Activated service 'c2s'" not in self._log_since(offset):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prosody did not start:\n{self._log_since(offset)[-3000:]}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _log_since(self, offset: int) -> str:
        if not self.log.exists():
            return ""
        with self.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


@pytest.fixture
def prosody(tmp_path: Path) -> Iterator[Prosody]:
    server = Prosody(tmp_path / "prosody")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prosody_tls(tmp_path: Path) -> Iterator[Prosody]:
    """A prosody that requires STARTTLS, with a self-signed certificate."""
    server = Prosody(tmp_path / "prosody-tls", tls=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prosody_no_smacks(tmp_path: Path) -> Iterator[Prosody]:
    """A prosody without stream management (XEP-0198): it never acknowledges a stanza."""
    server = Prosody(tmp_path / "prosody-no-smacks", smacks=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Recipient:
    """A slixmpp client logged in as ``jid`` in a thread of its own; ``bodies`` is what it
    received. It logs in again after the server dropped it (a restart), and then gets what
    the server stored for it meanwhile."""

    def __init__(self, jid: str, password: str, port: int) -> None:
        self.jid, self.port = jid, port
        self.bodies: list[str] = []
        self.lock = threading.Lock()
        self.online = threading.Event()
        self.closing = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self._call(self._make(password))

    async def _make(self, password: str) -> ClientXMPP:
        client = ClientXMPP(self.jid, password)
        client.enable_direct_tls = client.enable_starttls = False
        client.enable_plaintext = True
        client.plugin["feature_mechanisms"].unencrypted_scram = True
        client.register_plugin("xep_0199")
        client.add_event_handler("session_start", self._on_session_start)
        client.add_event_handler("connection_failed", self._on_connection_failed)
        client.add_event_handler("message", self._on_message)
        client.add_event_handler("disconnected", self._on_disconnected)
        return client

    def connect(self, timeout: float = 10) -> Recipient:
        self.online.clear()
        self.loop.call_soon_threadsafe(self.client.connect, "127.0.0.1", self.port)
        if not self.online.wait(timeout):
            self.close()
            raise RuntimeError(f"{self.jid} could not log in to 127.0.0.1:{self.port}")
        return self

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(self.bodies) >= count

    def sync(self) -> None:
        """Returns once everything the server sent this client before now is in ``bodies``:
        a ping's answer comes after them on the same stream. A no-op while offline."""
        if self.online.is_set():
            self._call(self.client.plugin["xep_0199"].ping(jid=DOMAIN, timeout=5))

    def received(self) -> list[str]:
        with self.lock:
            return list(self.bodies)

    def close(self) -> None:
        self.closing = True
        try:
            self._call(self._disconnect(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()

    async def _disconnect(self) -> None:
        self.client.cancel_connection_attempt()
        if self.client.is_connected():
            await self.client.disconnect(wait=1)
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coro, timeout: float = 10):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _on_session_start(self, _: object) -> None:
        self.client.send_presence()  # available: the server routes messages here, not offline
        self.online.set()

    def _on_message(self, message: object) -> None:
        if message["type"] in ("chat", "normal"):  # type: ignore[index]
            with self.lock:
                self.bodies.append(str(message["body"]))  # type: ignore[index]

    def _on_disconnected(self, _: object) -> None:
        self.online.clear()
        self._reconnect()

    def _on_connection_failed(self, _: object) -> None:
        self.client.cancel_connection_attempt()  # retry at our pace, not slixmpp's backoff
        self._reconnect()

    def _reconnect(self) -> None:
        if not self.closing:  # the server went away: come back when it does
            self.loop.call_later(0.2, self.client.connect, "127.0.0.1", self.port)
