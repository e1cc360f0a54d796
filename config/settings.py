"""Django settings of the sitemessage service (DJANGO_SETTINGS_MODULE=config.settings).

Every deployment value comes from the environment; see README "Configuration". A missing or bad
value stops the process with one line naming the variable (EnvironmentValueError).
"""

import os
import re
import warnings
from pathlib import Path
from typing import Any

import dj_database_url

from dispatcher.conf import from_environment


class EnvironmentValueError(SystemExit):
    """A missing or bad environment variable, named in the message.

    A SystemExit, so that manage.py, celery and WSGI servers stop with this one line instead of
    a traceback through Django's settings import; not ImproperlyConfigured, which manage.py
    swallows when a settings module raises it (and then runs the command without settings).
    """


def env_bool(name: str, default: bool) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); unset or empty gives ``default``.

    Raises EnvironmentValueError for anything else: a typo must not turn a protection off.
    """
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise EnvironmentValueError(
        f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {os.environ[name]!r}"
    )


def env_int(name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    """A whole number in ``minimum..maximum``; unset or empty gives ``default``.

    Raises EnvironmentValueError naming the variable otherwise.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise EnvironmentValueError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
        raise EnvironmentValueError(f"{name} must be {bounds}, got {value}")
    return value


def env_float(name: str, default: float) -> float:
    """A positive number of seconds; unset or empty gives ``default``.

    Raises EnvironmentValueError naming the variable otherwise.
    """
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise EnvironmentValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def env_list(name: str, default: str) -> list[str]:
    """A comma-separated list (blanks around items and empty items ignored)."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SITEMESSAGE_VAR_DIR", BASE_DIR / "var"))

DEBUG = env_bool("DJANGO_DEBUG", False)
# The key of DJANGO_DEBUG=1 without DJANGO_SECRET_KEY: public, since it is in this repository.
DEVELOPMENT_KEY = "insecure-dev-key-set-DJANGO_SECRET_KEY"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise EnvironmentValueError("set DJANGO_SECRET_KEY (or DJANGO_DEBUG=1 for development)")
    SECRET_KEY = DEVELOPMENT_KEY
    warnings.warn(
        "DJANGO_DEBUG=1 and no DJANGO_SECRET_KEY: using the development key, which is public "
        "(anyone can forge this instance's sessions and signatures); set DJANGO_SECRET_KEY",
        stacklevel=1,
    )
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")
# Origins (scheme://host[:port]) allowed to POST forms when the proxy in front changes the Host.
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

# HTTPS. With DEBUG off the site is HTTPS only: plain http redirects to https, cookies never
# travel in clear, and browsers remember for a year (HSTS, the value the preload list and most
# scanners ask for) to never try http. With DEBUG on (`make run`: plain http on loopback) all
# of it is off. Every default can be changed from the environment; see README "Security".
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", not DEBUG)
# HSTS is sent only on HTTPS responses. Subdomains included: they are this host's own
# (admin.example.com covers *.admin.example.com, not the rest of example.com).
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0 if DEBUG else 365 * 24 * 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
# Asking browsers to hard-code the whole domain is the domain owner's decision, and hard to
# undo; without it, `check --deploy` says only that the site cannot join the preload list
# (security.W021), which is not a weakness of this site, so that one stays silent.
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
SILENCED_SYSTEM_CHECKS = ["security.W021"]


def proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """DJANGO_SECURE_PROXY_SSL_HEADER (e.g. ``X-Forwarded-Proto``) as Django wants it: a
    request carrying that header with the value ``https`` counts as secure. Unset by default:
    only a proxy that always overwrites the header may be trusted with it.

    Raises EnvironmentValueError when the value is not a header name.
    """
    header = os.environ.get(name, "").strip()
    if not header:
        return None
    if not re.fullmatch(r"[A-Za-z0-9-]+", header):
        raise EnvironmentValueError(
            f"{name} must be a header name such as X-Forwarded-Proto, got {header!r}"
        )
    return "HTTP_" + header.upper().replace("-", "_"), "https"


SECURE_PROXY_SSL_HEADER = proxy_ssl_header("DJANGO_SECURE_PROXY_SSL_HEADER")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "dispatcher",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def database_from_env(default_sqlite: Path) -> dict[str, Any]:
    """DATABASE_URL, or SQLite in WAL mode with a busy timeout so that several worker processes
    can write without 'database is locked'."""
    config: dict[str, Any] = dict(
        dj_database_url.config(default=f"sqlite:///{default_sqlite}", conn_max_age=60)
    )
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # Connections are kept (CONN_MAX_AGE 60, as for the other databases): reopening the
        # file and running the init PRAGMAs cost ~2 ms per delivery task.
        config["OPTIONS"] = {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    return config


DATABASES = {"default": database_from_env(VAR_DIR / "db.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"

# E-mail: the builtin smtp messenger reads these when its own options are None.
EMAIL_HOST = os.environ.get("EMAIL_HOST", "127.0.0.1")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1, maximum=65535)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
EMAIL_TIMEOUT = env_float("EMAIL_TIMEOUT", 10)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "sitemessage@localhost")

# Messengers of this deployment, one dict per alias (apps can register more in sitemessages.py).
SITEMESSAGE_MESSENGERS: dict[str, Any] = {"smtp": {}}
# Every SITEMESSAGE_* setting (README, "Configuration") can be set from the environment:
# numbers as numbers, SITEMESSAGE_MESSENGERS as JSON, e.g.
# SITEMESSAGE_MESSENGERS='{"smtp": {}, "telegram": {"options": {"auth_token": "..."}}}'.
globals().update(from_environment(os.environ))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
