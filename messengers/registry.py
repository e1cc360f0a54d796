"""The messenger registry: aliases to configured messenger objects.

Messengers are registered in code (``register_messenger_objects()`` in a ``sitemessages.py``
module of any installed app, imported at startup) or from the ``SITEMESSAGE_MESSENGERS``
setting::

    SITEMESSAGE_MESSENGERS = {
        "smtp": {"options": {"from_email": os.environ["FROM_EMAIL"]}},   # a builtin alias
        "mine": {"class": "myapp.messengers.MyMessenger", "options": {...}},
        "telegram": {"options": {...}, "rate_limit": "30/s"},  # shared by all workers
    }
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

from django.utils.module_loading import import_string

from .base import MessengerBase, alias_of, seconds_per_send
from .exceptions import MessengerConfigurationError, UnknownMessengerError, did_you_mean

#: Classes of the builtin aliases, so settings can name them without a "class".
BUILTIN_MESSENGERS = {
    "smtp": "messengers.smtp.SMTPMessenger",
    "xmppsleek": "messengers.xmpp.XMPPSleekMessenger",
    "twitter": "messengers.twitter.TwitterMessenger",
    "telegram": "messengers.telegram.TelegramMessenger",
    "fb": "messengers.facebook.FacebookMessenger",
    "vk": "messengers.vkontakte.VKontakteMessenger",
}

logger = logging.getLogger(__name__)
_registry: dict[str, MessengerBase] = {}
#: A messenger alias names its queue (messenger.<alias>), which ``celery -Q`` splits on commas.
ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def register_messenger_objects(*messengers: MessengerBase) -> None:
    """Registers (configures) messengers under their aliases; a later one replaces an earlier
    one with the same alias."""
    for messenger in messengers:
        if not isinstance(messenger, MessengerBase):
            raise TypeError(
                f"register_messenger_objects() takes MessengerBase instances, got {messenger!r}"
            )
        if type(messenger).send is MessengerBase.send:
            logger.warning(
                "messenger %s does not implement send(self, message_cls, message_model, "
                "dispatch_models) as a method: its dispatches will fail",
                type(messenger).__name__,
            )
        check_alias(alias_of(messenger))
        check_rate_limit(alias_of(messenger), messenger.rate_limit)
        _registry[alias_of(messenger)] = messenger


def get_registered_messenger_objects() -> dict[str, MessengerBase]:
    """Returns the registered messengers indexed by alias."""
    return dict(_registry)


def get_registered_messenger_object(messenger: str | type | MessengerBase) -> MessengerBase:
    """Returns the registered messenger for an alias (or a messenger class or object)."""
    alias = alias_of(messenger)
    try:
        return _registry[alias]
    except KeyError:
        raise UnknownMessengerError(alias, list(_registry)) from None


def messenger_from_settings(alias: str, conf: dict[str, Any]) -> MessengerBase:
    """Builds one messenger from its SITEMESSAGE_MESSENGERS entry; every problem names the
    alias it belongs to."""
    unknown_keys = set(conf) - {"class", "options", "rate_limit"}
    if unknown_keys:
        raise MessengerConfigurationError(
            f"SITEMESSAGE_MESSENGERS[{alias!r}]: unknown key(s) {sorted(unknown_keys)}; "
            "expected 'class', 'options' and 'rate_limit'"
        )
    path = conf.get("class") or BUILTIN_MESSENGERS.get(alias)
    if not path:
        raise MessengerConfigurationError(
            f"SITEMESSAGE_MESSENGERS[{alias!r}]: no 'class' given and {alias!r} is not a builtin "
            f"messenger ({', '.join(BUILTIN_MESSENGERS)})"
        )
    cls = import_string(path) if isinstance(path, str) else path
    options = dict(conf.get("options") or {})
    check_options(alias, cls, options)
    messenger = cls(**options)
    if alias_of(messenger) != alias:
        messenger.alias = alias
    if "rate_limit" in conf:
        check_rate_limit(alias, conf["rate_limit"])
        messenger.rate_limit = conf["rate_limit"]
    return messenger


def check_alias(alias: str) -> None:
    if not ALIAS.fullmatch(alias):
        raise MessengerConfigurationError(
            f"messenger alias {alias!r} is not allowed: an alias has 1 to 100 characters, "
            "letters A-Z and a-z, digits, '_', '.' and '-', and starts with a letter or digit "
            "(it names the queue messenger.<alias>)"
        )


def check_rate_limit(alias: str, rate: str | None) -> None:
    if rate is not None:
        try:
            seconds_per_send(rate)
        except ValueError as exc:
            raise MessengerConfigurationError(f"messenger {alias!r}: {exc}") from None


def check_options(alias: str, cls: type, options: dict[str, Any]) -> None:
    """Raises MessengerConfigurationError for options the messenger's constructor does not take."""
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    for name in options:
        if name not in accepted:
            raise MessengerConfigurationError(
                f"messenger {alias!r} ({cls.__name__}): unknown option {name!r}"
                f"{did_you_mean(name, accepted)}; accepted options: {', '.join(accepted) or 'none'}"
            )


def register_from_settings(messengers: dict[str, dict[str, Any]]) -> None:
    register_messenger_objects(
        *(messenger_from_settings(alias, conf or {}) for alias, conf in messengers.items())
    )
