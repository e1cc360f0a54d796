"""SITEMESSAGE_CA_FILE: one setting that adds a private CA to what every messenger trusts, with
verification and the host-name check left on. Real TLS servers on loopback (aiosmtpd, the
fake Telegram and X APIs over HTTPS, prosody) with certificates made for the test by a private
CA that nothing trusts unless the setting names it."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from dispatcher import conf
from dispatcher.models import Dispatch
from messengers.base import CA_FILE_SETTING, tls_context
from messengers.exceptions import MessengerConfigurationError, TemporaryDeliveryError
from messengers.registry import register_messenger_objects
from sitemessage.messengers.smtp import SMTPMessenger
from sitemessage.messengers.telegram import TelegramMessenger
from sitemessage.messengers.twitter import TwitterMessenger
from sitemessage.messengers.xmpp import XMPPSleekMessenger
from tests.contract import deliver_now, errors_of
from tests.fake_apis import FakeAPI, FakeTelegram, FakeX
from tests.faultsapp.helpers import manage
from tests.xmpp_server import DOMAIN, PASSWORD, SENDER
from tests.xmpp_server import prosody_tls as prosody_tls

UNTRUSTED = "CERTIFICATE_VERIFY_FAILED"


@dataclass(frozen=True)
class PKI:
    #: The private CA (what SITEMESSAGE_CA_FILE names) and its server certificate for
    #: 127.0.0.1 and localhost, with the key (``.key`` beside each ``.pem``).
    ca: Path
    server: Path
    #: Signed by the private CA, for another host name.
    wrong_name: Path
    #: A second CA standing in for the system's CAs (through SSL_CERT_FILE), and its server
    #: certificate for 127.0.0.1.
    system_ca: Path
    system_server: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> Path:
    _openssl(
        directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", f"{name}.key", "-out", f"{name}.pem",
    )  # fmt: skip
    return directory / f"{name}.pem"


def _make_server(directory: Path, ca: Path, name: str, alt_names: str) -> Path:
    (directory / f"{name}.ext").write_text(
        f"subjectAltName={alt_names}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(
        directory, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr",
    )  # fmt: skip
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca),
        "-CAkey", str(ca.with_suffix(".key")), "-CAcreateserial", "-days", "2",
        "-extfile", f"{name}.ext", "-out", f"{name}.pem",
    )  # fmt: skip
    return directory / f"{name}.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca, system_ca = _make_ca(directory, "private-ca"), _make_ca(directory, "system-ca")
    loopback = "IP:127.0.0.1,DNS:localhost"
    return PKI(
        ca=ca,
        server=_make_server(directory, ca, "server", loopback),
        wrong_name=_make_server(directory, ca, "wrong-name", "DNS:other.test"),
        system_ca=system_ca,
        system_server=_make_server(directory, system_ca, "system-server", loopback),
    )


def server_context(certificate: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, certificate.with_suffix(".key"))
    return context


def smtp_messenger(server: Any, mode: str) -> SMTPMessenger:
    return SMTPMessenger(
        "noreply@example.com",
        host="127.0.0.1",
        port=server.port,
        use_tls=mode == "starttls",
        use_ssl=mode == "ssl",
        timeout=5,
    )


@pytest.fixture(params=["starttls", "ssl"])
def smtp_tls(request, smtp_servers):
    """``start(certificate)``: an SMTP server that speaks only TLS (STARTTLS required before
    MAIL, or TLS from the first byte), and a messenger for it."""
    mode = request.param

    def start(certificate: Path) -> tuple[Any, SMTPMessenger]:
        tls = server_context(certificate)
        if mode == "starttls":
            server = smtp_servers(tls_context=tls, require_starttls=True)
        else:
            server = smtp_servers(ssl_context=tls)
        return server, smtp_messenger(server, mode)

    return start


# --- SMTP ---------------------------------------------------------------------------------


def test_smtp_delivers_over_tls_to_a_server_of_the_private_ca(smtp_tls, pki, settings):
    settings.SITEMESSAGE_CA_FILE = str(pki.ca)
    server, messenger = smtp_tls(pki.server)
    assert messenger.send_test_message("ann@example.com", "over TLS")
    [(rcpts, email)] = server.sink.messages
    assert rcpts == ["ann@example.com"] and email.get_payload().strip() == "over TLS"


def test_smtp_refuses_the_private_ca_without_the_setting(smtp_tls, pki, settings):
    settings.SITEMESSAGE_CA_FILE = None
    server, messenger = smtp_tls(pki.server)
    with pytest.raises(TemporaryDeliveryError, match=UNTRUSTED):
        messenger.send_test_message("ann@example.com", "over TLS")
    assert server.sink.messages == []


def test_smtp_still_checks_the_host_name(smtp_tls, pki, settings):
    settings.SITEMESSAGE_CA_FILE = str(pki.ca)
    server, messenger = smtp_tls(pki.wrong_name)  # a trusted chain, for other.test
    with pytest.raises(TemporaryDeliveryError, match="mismatch"):
        messenger.send_test_message("ann@example.com", "over TLS")
    assert server.sink.messages == []


def test_smtp_keeps_trusting_the_system_cas(smtp_tls, pki, settings, monkeypatch):
    # SSL_CERT_FILE makes system-ca the "system" store: its server must still verify when
    # SITEMESSAGE_CA_FILE adds the private CA (add, not replace).
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.system_ca))
    settings.SITEMESSAGE_CA_FILE = str(pki.ca)
    server, messenger = smtp_tls(pki.system_server)
    assert messenger.send_test_message("ann@example.com", "via the system CA")
    assert len(server.sink.messages) == 1


def test_the_context_has_the_system_cas_and_the_private_one(pki, settings):
    settings.SITEMESSAGE_CA_FILE = None
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    settings.SITEMESSAGE_CA_FILE = str(pki.ca)
    context = tls_context()
    assert context.cert_store_stats()["x509_ca"] == system + 1
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.django_db
def test_an_untrusted_server_is_a_temporary_error_of_the_dispatch(
    pki, settings, smtp_servers, registries, no_publish
):
    # A missing CA is fixed by configuration; the dispatch waits for the retry meanwhile.
    server = smtp_servers(tls_context=server_context(pki.server), require_starttls=True)
    messenger = smtp_messenger(server, "starttls")
    register_messenger_objects(messenger)
    try:
        settings.SITEMESSAGE_CA_FILE = None
        [row] = deliver_now("smtp", ["ann@example.com"])
        assert row.dispatch_status == Dispatch.Status.ERROR and row.next_attempt_at is not None
        assert UNTRUSTED in errors_of(row)[0]
        assert server.sink.messages == []

        settings.SITEMESSAGE_CA_FILE = str(pki.ca)
        [row] = deliver_now("smtp", ["bob@example.com"])
        assert row.dispatch_status == Dispatch.Status.SENT
        assert server.sink.recipients() == ["bob@example.com"]
    finally:
        messenger.after_send()


# --- HTTP: Telegram and X -----------------------------------------------------------------


@pytest.fixture(params=["telegram", "twitter"])
def https_api(request, pki) -> Iterator[tuple[FakeAPI, Any]]:
    """The fake Telegram or X API over HTTPS with the private CA's certificate, and a
    messenger for it."""
    api: FakeTelegram | FakeX = FakeTelegram() if request.param == "telegram" else FakeX()
    api.use_tls(server_context(pki.server))
    api.start()
    messenger = (TelegramMessenger if isinstance(api, FakeTelegram) else TwitterMessenger)(
        **api.options()
    )
    try:
        yield api, messenger
    finally:
        messenger.after_send()
        api.stop()


def send(messenger: Any) -> str:
    to = "421337" if isinstance(messenger, TelegramMessenger) else "ann"
    return str(messenger.send_test_message(to, "over HTTPS"))


def test_http_messengers_deliver_over_https_to_a_server_of_the_private_ca(https_api, pki, settings):
    api, messenger = https_api
    assert api.url.startswith("https://")
    settings.SITEMESSAGE_CA_FILE = str(pki.ca)
    assert send(messenger)
    assert len(api.delivered()) == 1 and api.errors == []


def test_http_messengers_refuse_the_private_ca_without_the_setting(https_api, settings):
    api, messenger = https_api
    settings.SITEMESSAGE_CA_FILE = None
    with pytest.raises(TemporaryDeliveryError, match=UNTRUSTED):
        send(messenger)
    assert api.requests == 0 and api.delivered() == []


def test_http_messengers_still_check_the_host_name(pki, settings):
    api = FakeTelegram()
    api.use_tls(server_context(pki.wrong_name))
    api.start()
    messenger = TelegramMessenger(**api.options())
    settings.SITEMESSAGE_CA_FILE = str(pki.ca)
    try:
        with pytest.raises(TemporaryDeliveryError, match="mismatch"):
            send(messenger)
        assert api.requests == 0
    finally:
        messenger.after_send()
        api.stop()


def test_http_sessions_keep_requests_bundle_and_add_the_private_ca(pki, settings):
    settings.SITEMESSAGE_CA_FILE = str(pki.ca)
    messenger = TelegramMessenger("1:token", base_url="https://127.0.0.1:9")
    session = messenger._ensure_session()
    adapter = session.get_adapter("https://127.0.0.1:9/")
    context = adapter.poolmanager.connection_pool_kw["ssl_context"]  # type: ignore[attr-defined]
    certifi = ssl.create_default_context(cafile=DEFAULT_CA_BUNDLE_PATH)

    def names(ctx: ssl.SSLContext) -> set[str]:
        return {f"{ca['subject']}{ca['serialNumber']}" for ca in ctx.get_ca_certs()}

    assert names(certifi) < names(context)
    assert len(names(context) - names(certifi)) == 1  # the private CA
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # Through a proxy (TelegramMessenger's proxy option) the same context verifies the API.
    proxied = adapter.proxy_manager_for("http://127.0.0.1:9")  # type: ignore[attr-defined]
    assert proxied.connection_pool_kw["ssl_context"] is context
    messenger.after_send()


# --- XMPP ---------------------------------------------------------------------------------


def test_xmpp_delivers_over_starttls_to_a_server_of_the_private_ca(prosody_tls, settings):
    # prosody_tls requires STARTTLS with a self-signed certificate: its own CA.
    settings.SITEMESSAGE_CA_FILE = str(prosody_tls.certificate)
    messenger = XMPPSleekMessenger(SENDER, PASSWORD, host="127.0.0.1", port=prosody_tls.port)
    try:
        assert messenger.send_test_message(f"rcpt0@{DOMAIN}", "over TLS")
    finally:
        messenger.after_send()


# --- the setting --------------------------------------------------------------------------


def test_the_setting_is_declared_once(settings):
    assert conf.CA_FILE.key == CA_FILE_SETTING and conf.CA_FILE.get() is None


BAD_FILES = {
    "missing": (lambda pki, tmp: tmp / "missing.pem", "names no file"),
    "directory": (lambda pki, tmp: tmp, "names a directory, not a PEM file"),
    "garbage": (
        lambda pki, tmp: _write(tmp / "garbage.pem", "not a certificate\n"),
        "is not a PEM file of certificates",
    ),
    "a key": (lambda pki, tmp: pki.ca.with_suffix(".key"), "is not a PEM file of certificates"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, problem", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_is_refused_at_startup_naming_the_setting_and_the_path(
    make, problem, pki, tmp_path, settings
):
    path = str(make(pki, tmp_path))
    settings.SITEMESSAGE_CA_FILE = path
    with pytest.raises(ImproperlyConfigured) as info:
        conf.validate()
    assert str(info.value).startswith(f"SITEMESSAGE_CA_FILE {problem}")
    assert str(info.value).endswith(f"got {path!r}")


def test_manage_py_check_stops_on_a_missing_ca_file(tmp_path):
    missing = tmp_path / "missing.pem"
    done = manage("check", env={"SITEMESSAGE_CA_FILE": str(missing)})
    assert done.returncode != 0
    assert f"ImproperlyConfigured: SITEMESSAGE_CA_FILE names no file, got '{missing}'" in (
        done.stderr
    )


def test_a_file_that_went_away_after_startup_is_a_configuration_error(smtp_tls, pki, settings):
    server, messenger = smtp_tls(pki.server)
    settings.SITEMESSAGE_CA_FILE = str(pki.ca.with_name("gone.pem"))
    with pytest.raises(MessengerConfigurationError, match="SITEMESSAGE_CA_FILE names no file"):
        messenger.send_test_message("ann@example.com", "over TLS")
    assert server.sink.messages == []
