"""The Django project. Importing it loads the Celery app, so the producer side publishes to the
configured broker."""

from workers.app import app as celery_app

__all__ = ["celery_app"]
