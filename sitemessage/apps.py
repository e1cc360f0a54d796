"""``INSTALLED_APPS = ['sitemessage']``, as with django-sitemessage: Django finds the app config
here, and it is the app in ``dispatcher/`` (name ``dispatcher``, label ``sitemessage``). Its
models, migrations, templates, management commands and tasks are the dispatcher app's, whichever
of the two names is listed; list only one of them."""

from dispatcher.apps import DispatcherConfig

__all__ = ["DispatcherConfig"]
