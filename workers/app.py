import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("sitemessage")
app.config_from_object("celeryconfig")

from . import lifecycle  # noqa: E402,F401  (connects the worker signals)
