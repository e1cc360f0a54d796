"""The code examples of the messenger documentation (tests/seed/messengers.rst), run as written.

- The test-message example talks to a real SMTP server with STARTTLS, a verified certificate
  and AUTH; only the name smtp.host.com is pointed at loopback.
- The user-defined messenger example is tests/seedapp/sitemessages.py, byte for byte, found by
  autodiscovery. As printed, its before_send/after_send/send are module-level functions, not
  methods, so MyMessenger does not implement send(): its dispatches must fail with that reason,
  never be reported as sent. Indented as intended, the same code delivers.
- The scheduling example runs with `user2 = ...` bound to a real user, as its comment says.
"""

import hashlib
import re
import ssl
import subprocess
import textwrap
from pathlib import Path

import pytest
from aiosmtpd.smtp import AuthResult
from django.contrib.auth import get_user_model

from dispatcher import pipeline
from dispatcher.models import Dispatch, DispatchError
from messengers.registry import get_registered_messenger_object
from tests.support import resolve_to_loopback, wait_until

HERE = Path(__file__).resolve().parent
SEED = HERE / "seed" / "messengers.rst"
SHARED_SEED = HERE.parent.parent / "shared" / "seed" / "messengers.rst"
#: SHA-256 of shared/seed/messengers.rst as handed to us: the copy in tests/seed must stay it.
SEED_SHA256 = "bd8998dbb88c03bce736ecda38ee044b3eb6a9e2eb31d51cc31373aacaaa3bfa"


def code_blocks() -> list[str]:
    text = SEED.read_text()
    return [
        textwrap.dedent(block)
        for block in re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text)
    ]


def test_seed_copy_is_the_documentation_as_handed_to_us():
    assert hashlib.sha256(SEED.read_bytes()).hexdigest() == SEED_SHA256


@pytest.mark.skipif(not SHARED_SEED.exists(), reason="no shared/ checkout beside this repository")
def test_the_shared_documentation_did_not_change_since_it_was_copied():
    assert hashlib.sha256(SHARED_SEED.read_bytes()).hexdigest() == SEED_SHA256


def test_seed_messenger_module_is_the_documented_code_verbatim():
    assert (HERE / "seedapp" / "sitemessages.py").read_text().strip() == code_blocks()[1].strip()


@pytest.fixture
def tls_smtp_server(tmp_path, monkeypatch, smtp_servers):
    """An SMTP server for smtp.host.com: STARTTLS with a certificate from a private CA that the
    client trusts through SSL_CERT_FILE, and AUTH for user1/user1password."""
    run = lambda *args: subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=Test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=smtp.host.com",
        "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:smtp.host.com\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem")  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")

    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        ok = (auth_data.login, auth_data.password) == (b"user1", b"user1password")
        return AuthResult(success=ok)

    server = smtp_servers(
        tls_context=server_tls,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
    )
    resolve_to_loopback(monkeypatch, "smtp.host.com")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    return server.sink, server.port, logins


def test_send_test_message_example_runs_as_written(tls_smtp_server, settings):
    sink, port, logins = tls_smtp_server
    settings.EMAIL_PORT = port  # the example names no port: Django's EMAIL_PORT applies

    exec(compile(code_blocks()[0], "messengers.rst:test-message", "exec"), {})

    assert logins == [(b"user1", b"user1password")]
    [(rcpts, email)] = sink.messages
    assert rcpts == ["user1@host.com"]
    assert email["From"] == "user1@host.com"
    assert email.get_payload().strip() == "This is a test message"


def test_send_test_message_refuses_an_untrusted_certificate(tls_smtp_server, settings, monkeypatch):
    from messengers.exceptions import TemporaryDeliveryError
    from sitemessage.messengers.smtp import SMTPMessenger

    sink, port, logins = tls_smtp_server
    settings.EMAIL_PORT = port
    monkeypatch.delenv("SSL_CERT_FILE")
    messenger = SMTPMessenger(
        "user1@host.com", "user1", "user1password", host="smtp.host.com", use_tls=True
    )
    with pytest.raises(TemporaryDeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
        messenger.send_test_message("user1@host.com", "This is a test message")
    assert logins == [] and sink.messages == []  # no password went to an unverified server


def run_schedule_example(user2) -> None:
    code = code_blocks()[2]
    assert "user2 = ...  #" in code
    exec(
        compile(code.replace("user2 = ...", "pass"), "messengers.rst:schedule", "exec"),
        {"user2": user2},
    )


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_user_defined_messenger_example_never_reports_sent_without_send(start_worker):
    messenger = get_registered_messenger_object("mymessenger")
    assert type(messenger).__module__ == "tests.seedapp.sitemessages"
    user2 = get_user_model().objects.create(username="user2")
    start_worker(["messenger.mymessenger"], concurrency=1)

    run_schedule_example(user2)

    rows = Dispatch.objects.filter(messenger="mymessenger")
    assert sorted(rows.values_list("address", flat=True)) == ["user1--address", "user2--address"]
    assert wait_until(
        lambda: not rows.exclude(dispatch_status=Dispatch.Status.FAILED).exists(), timeout=30
    )
    errors = DispatchError.objects.filter(dispatch__messenger="mymessenger")
    assert errors.count() == 2
    assert {e.exc_type for e in errors} == {"NotImplementedError"}
    assert "MyMessenger does not implement send(" in errors[0].error_log


@pytest.mark.django_db(transaction=True)
def test_user_defined_messenger_example_indented_as_intended_delivers(registries):
    code = code_blocks()[1].replace("from .utils import", "from sitemessage.utils import")
    head, sep, tail = code.partition("def before_send")
    body, sep2, register = (sep + tail).partition("register_messenger_objects(MyMessenger())")
    fixed = head + textwrap.indent(body, "    ") + sep2 + register
    exec(compile(fixed, "messengers.rst:messenger-indented", "exec"), {"__name__": "seed_fixed"})
    user2 = get_user_model().objects.create(username="user2")

    run_schedule_example(user2)

    ids = list(Dispatch.objects.values_list("pk", flat=True))
    result = pipeline.deliver("mymessenger", ids, owner="test")
    assert (result.claimed, result.sent) == (2, 2)
    assert set(Dispatch.objects.values_list("dispatch_status", flat=True)) == {Dispatch.Status.SENT}
