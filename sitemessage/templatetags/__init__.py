"""django-sitemessage's ``sitemessage.templatetags`` path. ``{% load sitemessage %}`` finds
the library in ``dispatcher/templatetags/`` (the app's package is ``dispatcher`` whichever name
INSTALLED_APPS lists); ``sitemessage.templatetags.sitemessage`` is that same library."""
