"""The Celery app of ``celery -A workers``: settings from ``celeryconfig``, the lifecycle wired."""

import os

from celery import Celery

from . import lifecycle

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("sitemessage")
app.config_from_object("celeryconfig")
lifecycle.connect()
