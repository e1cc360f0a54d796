"""Settings of the test suite: the service's settings, plus test apps and test-friendly timings.

DATABASE_URL picks the database (default: a SQLite file, shared with the worker processes the
end-to-end tests start); CELERY_BROKER_URL the broker. Tests hand timings (SITEMESSAGE_LEASE_SECONDS
and the like) to worker processes through the environment, which config.settings reads.
"""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-key")
# A Redis database of its own, so tests never consume a running service's tasks.
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

from config.settings import *  # noqa: F403
from config.settings import VAR_DIR, database_from_env

INSTALLED_APPS = [*INSTALLED_APPS, "tests.seedapp", "tests.recorderapp", "tests.faultsapp"]  # noqa: F405

VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES = {"default": database_from_env(VAR_DIR / "test.sqlite3")}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not memory: worker processes must see the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# The test client speaks plain http; the deployment defaults are tested in test_deploy.py.
SECURE_SSL_REDIRECT = False
