"""The Celery settings of ``celery -A workers`` live in ``workers/celeryconfig.py``, which is
installed with the package; this module re-exports them for tools that look for Celery's
default configuration module (``celeryconfig``) in a checkout. It is not installed: a top-level
``celeryconfig`` in site-packages would shadow a project's own."""

from workers.celeryconfig import *  # noqa: F403
