"""Messengers: one module per channel, the shared base class and the registry. No Celery here."""
