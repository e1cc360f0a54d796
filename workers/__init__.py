"""The Celery app (``celery -A workers ...``) and the worker process lifecycle."""

from .app import app

__all__ = ["app"]
