"""Import-compatible facade with django-sitemessage's module paths. Re-exports only."""

from dispatcher.version import VERSION

__all__ = ["VERSION"]
