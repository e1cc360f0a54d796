"""Secure by default. config.settings: `manage.py check --deploy` is clean with the defaults, a
real server redirects http and sends HSTS and secure cookies behind a TLS proxy, every HTTPS
setting comes from the environment, a bad value stops manage.py naming the variable, and
DJANGO_DEBUG=1 without a key warns. `make run`: Flower (scripts/flower.sh) asks for the password
it generated, and scripts/run.sh creates its database, passwords and mail directory private."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, free_port, wait_until, worker_env

KEY = secrets.token_urlsafe(50)
#: What `check --deploy` says about HSTS, the SSL redirect and the cookies.
HTTPS_WARNINGS = {
    "security.W004": "DJANGO_SECURE_HSTS_SECONDS",
    "security.W005": "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "security.W008": "DJANGO_SECURE_SSL_REDIRECT",
    "security.W012": "DJANGO_SESSION_COOKIE_SECURE",
    "security.W016": "DJANGO_CSRF_COOKIE_SECURE",
}


def service_env(**env: str) -> dict[str, str]:
    """The environment of the service (config.settings, not the tests'), without any DJANGO_*
    variable of the calling shell, plus ``env``."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("DJANGO_") and k != "DATABASE_URL"
    }
    return {**base, "DJANGO_SETTINGS_MODULE": "config.settings", **env}


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def warnings_of(result: subprocess.CompletedProcess[str]) -> set[str]:
    return set(re.findall(r"\((security\.W\d+)\)", result.stdout + result.stderr))


def read_settings(*names: str, **env: str) -> dict[str, object]:
    code = f"import json; from django.conf import settings; print(json.dumps({{n: getattr(settings, n) for n in {names!r}}}))"
    result = manage("shell", "-v", "0", "-c", code, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# manage.py check --deploy


def test_check_deploy_with_a_key_and_the_defaults_reports_nothing():
    result = manage("check", "--deploy", "--fail-level", "WARNING", DJANGO_SECRET_KEY=KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert warnings_of(result) == set()
    assert "System check identified no issues (1 silenced)" in result.stdout  # W021, preload


@pytest.mark.parametrize("warning, variable", sorted(HTTPS_WARNINGS.items()))
def test_each_https_setting_can_be_turned_off_from_the_environment(warning, variable):
    value = "0" if variable.endswith("SECONDS") else "false"
    result = manage("check", "--deploy", DJANGO_SECRET_KEY=KEY, **{variable: value})
    assert result.returncode == 0, result.stderr
    # Turning HSTS off also ends the advice about its subdomains.
    assert warnings_of(result) == {warning}


def test_environment_values_reach_the_settings():
    values = read_settings(
        "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD",
        "SECURE_PROXY_SSL_HEADER", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "EMAIL_USE_TLS",
        DJANGO_SECRET_KEY=KEY,
        DJANGO_SECURE_HSTS_SECONDS="3600",
        DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS="No",
        DJANGO_SECURE_HSTS_PRELOAD="on",
        DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        DJANGO_ALLOWED_HOSTS=" admin.example.com, ,10.0.0.5 ",
        DJANGO_CSRF_TRUSTED_ORIGINS="https://admin.example.com",
        EMAIL_USE_TLS="true",  # was silently off: only "1" counted
    )  # fmt: skip
    assert values == {
        "SECURE_HSTS_SECONDS": 3600,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": True,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "ALLOWED_HOSTS": ["admin.example.com", "10.0.0.5"],
        "CSRF_TRUSTED_ORIGINS": ["https://admin.example.com"],
        "EMAIL_USE_TLS": True,
    }


def test_debug_keeps_plain_http_working_for_make_run():
    names = ("SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE")
    values = read_settings(*names, "SECURE_HSTS_SECONDS", DJANGO_DEBUG="1", DJANGO_SECRET_KEY=KEY)
    assert values == {**dict.fromkeys(names, False), "SECURE_HSTS_SECONDS": 0}


@pytest.mark.parametrize(
    "variable, value, problem",
    [
        ("DJANGO_SECURE_HSTS_SECONDS", "a year", "must be a whole number, got 'a year'"),
        ("DJANGO_SECURE_HSTS_SECONDS", "-1", "must be at least 0, got -1"),
        ("DJANGO_SECURE_SSL_REDIRECT", "maybe", "must be 1 or 0"),
        ("DJANGO_SESSION_COOKIE_SECURE", "2", "must be 1 or 0"),
        ("DJANGO_DEBUG", "True please", "must be 1 or 0"),
        ("DJANGO_SECURE_PROXY_SSL_HEADER", "X-Forwarded-Proto: https", "must be a header name"),
        ("EMAIL_PORT", "smtp", "must be a whole number"),
        ("EMAIL_TIMEOUT", "0", "must be a positive number of seconds"),
    ],
)
def test_a_bad_value_stops_manage_py_with_one_line_naming_the_variable(variable, value, problem):
    result = manage("check", "--deploy", DJANGO_SECRET_KEY=KEY, **{variable: value})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"{variable} {problem}")


def test_no_key_without_debug_stops_manage_py_saying_what_to_set():
    result = manage("check")
    assert result.returncode == 1
    assert result.stderr.strip() == "set DJANGO_SECRET_KEY (or DJANGO_DEBUG=1 for development)"


def test_debug_without_a_key_warns_once_that_the_key_is_public():
    result = manage("check", DJANGO_DEBUG="1")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("DJANGO_DEBUG=1 and no DJANGO_SECRET_KEY") == 1
    assert "public" in result.stderr
    with_key = manage("check", DJANGO_DEBUG="1", DJANGO_SECRET_KEY=KEY)
    assert with_key.returncode == 0 and "DJANGO_SECRET_KEY" not in with_key.stderr


# A real server: what the defaults do behind a TLS proxy


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[int]:
    """`manage.py runserver` with DEBUG off, the defaults, and the proxy header configured."""
    port = free_port()
    env = service_env(
        DJANGO_SECRET_KEY=KEY,
        DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )
    log = (tmp_path / "web.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert wait_until(lambda: answers(port), 30), (tmp_path / "web.log").read_text()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def answers(port: int) -> bool:
    try:
        get(port, "/")
    except OSError:
        return False
    return True


def get(port: int, path: str, **headers: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_behind_a_tls_proxy_http_is_redirected_and_https_gets_hsts_and_secure_cookies(web_server):
    plain = get(web_server, "/admin/login/")
    assert plain.status == 301
    assert plain.headers["Location"] == f"https://127.0.0.1:{web_server}/admin/login/"

    secure = get(web_server, "/admin/login/", **{"X-Forwarded-Proto": "https"})
    assert secure.status == 200
    assert secure.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    cookie = secure.headers["Set-Cookie"]
    assert cookie.startswith("csrftoken=") and "; Secure" in cookie

    other_host = get(web_server, "/admin/login/", Host="evil.example")
    assert other_host.status == 400


# Flower as `make run` starts it


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def test_flower_refuses_requests_without_the_generated_password(tmp_path):
    var = tmp_path / "var"
    port = free_port()
    log = tmp_path / "flower.log"
    env = worker_env({"SITEMESSAGE_VAR_DIR": str(var)})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["scripts/flower.sh", str(port)], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        assert wait_until(lambda: answers(port), 30), log.read_text()
        credentials_file = var / "flower-credentials"
        credentials = credentials_file.read_text()
        assert re.fullmatch(r"admin:[A-Za-z0-9]{20}\n", credentials)
        credentials = credentials.strip()
        assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
        password = credentials.split(":")[1]
        assert log.read_text().count(password) == 1  # printed when generated

        for path in ("/", "/workers", "/api/workers", "/api/tasks"):
            assert get(port, path).status == 401, path
        assert get(port, "/").headers["WWW-Authenticate"] == 'Basic realm="flower"'
        assert get(port, "/", Authorization=basic("admin:" + "x" * 20)).status == 401
        assert get(port, "/", Authorization=basic(credentials)).status == 200
        assert get(port, "/api/workers", Authorization=basic(credentials)).status == 200

        # The password is in Flower's environment (private), not its command line (ps).
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert "flower" in cmdline and password not in cmdline
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().decode()
        assert f"FLOWER_BASIC_AUTH={credentials}\0" in environ
        assert stat.S_IMODE(Path(f"/proc/{proc.pid}/environ").stat().st_mode) == 0o400
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)

    # Generated once, then reused without being printed again.
    again = subprocess.run(
        ["scripts/flower.sh", "credentials"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and again.stdout == again.stderr == ""
    assert credentials_file.read_text().strip() == credentials


# scripts/run.sh: private files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_sh_creates_the_database_passwords_and_mail_private(tmp_path):
    var = tmp_path / "var"
    env = service_env(SITEMESSAGE_VAR_DIR=str(var))
    del env["DJANGO_SETTINGS_MODULE"]  # manage.py's default, as for `make run`

    def prepare() -> str:
        result = subprocess.run(
            ["scripts/run.sh", "prepare"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "DJANGO_SECRET_KEY" not in result.stderr  # its own key, not the public one
        return result.stdout

    first = prepare()
    secrets_files = ["db.sqlite3", "admin-password", "flower-credentials", "secret-key"]
    private_dirs = [".", "mail", "mail/new", "mail/cur", "mail/tmp", "log"]
    assert {name: mode(var / name) for name in secrets_files} == dict.fromkeys(secrets_files, 0o600)
    assert {name: mode(var / name) for name in private_dirs} == dict.fromkeys(private_dirs, 0o700)
    admin_password = (var / "admin-password").read_text().strip()
    assert re.fullmatch(r"[A-Za-z0-9]{16}", admin_password)
    assert first.count(admin_password) == 1
    assert first.count((var / "flower-credentials").read_text().split(":")[1].strip()) == 1

    # Files an older run left readable are made private; nothing is generated or shown again.
    kept = {name: (var / name).read_text(errors="replace") for name in secrets_files[1:]}
    (var / "db.sqlite3").chmod(0o644)
    (var / "admin-password").chmod(0o644)
    (var / "mail").chmod(0o755)
    var.chmod(0o755)
    second = prepare()
    assert "password" not in second
    assert {name: (var / name).read_text() for name in secrets_files[1:]} == kept
    assert [mode(var), mode(var / "mail"), mode(var / "db.sqlite3")] == [0o700, 0o700, 0o600]
    assert mode(var / "admin-password") == 0o600
