"""django-sitemessage's ``sitemessage.settings``: its six settings, read from Django's settings
(through dispatcher/conf.py, which checks them) each time one is used, so ``override_settings``
works; django-sitemessage read them once, at import. ``from sitemessage.settings import X``
reads X when it runs."""

from typing import Any

from dispatcher import conf

_NAMES = (
    "APP_MODULE_NAME",
    "EMAIL_BACKEND_MESSAGES_PRIORITY",
    "INIT_BUILTIN_MESSAGE_TYPES",
    "SHORTCUT_EMAIL_MESSAGE_TYPE",
    "SHORTCUT_EMAIL_MESSENGER_TYPE",
    "SITE_URL",
)
__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return conf.SETTINGS[name].get()


def __dir__() -> list[str]:
    return sorted(_NAMES)
