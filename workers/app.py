"""The Celery app of ``celery -A workers``: settings from ``workers.celeryconfig``, the lifecycle
wired.

A project with a Celery app of its own does not import this module; it calls
``workers.embed.serve(app)`` instead (README, "Installing into an existing project").
"""

import os
from pathlib import Path

from celery import Celery
from django.core.exceptions import ImproperlyConfigured

from . import lifecycle

#: The Django settings of this repository's own service, the default in a checkout only.
SERVICE_SETTINGS = Path(__file__).resolve().parent.parent / "config" / "settings.py"

if "DJANGO_SETTINGS_MODULE" not in os.environ:
    if not SERVICE_SETTINGS.is_file():
        # Installed: guessing a settings module could load another project's config package.
        raise ImproperlyConfigured(
            "celery -A workers: set DJANGO_SETTINGS_MODULE to your Django project's settings "
            "module, e.g. DJANGO_SETTINGS_MODULE=mysite.settings celery -A workers worker"
        )
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"

app = Celery("sitemessage")
app.config_from_object("workers.celeryconfig")
lifecycle.connect()
