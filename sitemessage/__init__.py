"""Import-compatible facade with django-sitemessage's module paths. Re-exports only."""
