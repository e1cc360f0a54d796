"""Django settings of the sitemessage service (DJANGO_SETTINGS_MODULE=config.settings).

Every deployment value comes from the environment; see README "Configuration".
"""

import os
from pathlib import Path
from typing import Any

import dj_database_url

from dispatcher.conf import from_environment

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SITEMESSAGE_VAR_DIR", BASE_DIR / "var"))

DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or (
    "insecure-dev-key-set-DJANGO_SECRET_KEY" if DEBUG else ""
)
if not SECRET_KEY:
    # Not ImproperlyConfigured: manage.py swallows that one from a settings module and runs
    # the command without settings ("check" then reports no issues).
    raise RuntimeError("set DJANGO_SECRET_KEY (or DJANGO_DEBUG=1 for development)")
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

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
        config["CONN_MAX_AGE"] = 0
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
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = os.environ.get("EMAIL_USE_TLS", "") == "1"
EMAIL_USE_SSL = os.environ.get("EMAIL_USE_SSL", "") == "1"
EMAIL_TIMEOUT = float(os.environ.get("EMAIL_TIMEOUT", "10"))
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
