"""Where ``celery -A workers`` finds the app (Celery looks for ``<package>.celery``)."""

from .app import app

__all__ = ["app"]
