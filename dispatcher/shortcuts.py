"""One-call scheduling for the builtin messengers, as django-sitemessage's shortcuts.

Each returns what ``schedule_messages()`` returns: the (message, dispatches) pairs created.
"""

from __future__ import annotations

from typing import Any

from . import conf
from .messages import EmailHtmlMessage, EmailTextMessage, get_registered_message_type
from .toolbox import recipients, schedule_messages


def schedule_email(
    message: str | dict[str, Any],
    to: Any,
    subject: str | None = None,
    sender: Any = None,
    priority: int | None = None,
) -> Any:
    """E-mails ``message`` (a text, or a dict of context for the HTML template) to addresses
    or users ``to``, through SITEMESSAGE_SHORTCUT_EMAIL_MESSENGER_TYPE (default 'smtp')."""
    type_alias = conf.SHORTCUT_EMAIL_MESSAGE_TYPE.get()
    if type_alias:
        message_cls: Any = get_registered_message_type(type_alias)
    else:
        message_cls = EmailHtmlMessage if isinstance(message, dict) else EmailTextMessage
    return schedule_messages(
        message_cls(subject or "", message),
        recipients(conf.SHORTCUT_EMAIL_MESSENGER_TYPE.get(), to),
        sender=sender,
        priority=priority,
    )


def schedule_jabber_message(
    message: Any, to: Any, sender: Any = None, priority: int | None = None
) -> Any:
    """Sends ``message`` to XMPP addresses or users ``to``."""
    return schedule_messages(message, recipients("xmppsleek", to), sender=sender, priority=priority)


def schedule_tweet(
    message: Any, to: Any = "", sender: Any = None, priority: int | None = None
) -> Any:
    """Posts ``message`` on X; a non-empty ``to`` makes it a mention of that account."""
    return schedule_messages(message, recipients("twitter", to), sender=sender, priority=priority)


def schedule_telegram_message(
    message: Any, to: Any, sender: Any = None, priority: int | None = None
) -> Any:
    """Sends ``message`` to Telegram chat ids or @channels (or users) ``to``."""
    return schedule_messages(message, recipients("telegram", to), sender=sender, priority=priority)


def schedule_facebook_message(
    message: Any, sender: Any = None, priority: int | None = None, *, to: Any = ""
) -> Any:
    """Publishes ``message`` (a text, or a single URL posted as a link) on the Facebook Page of
    the 'fb' messenger's token; ``to`` names the Page id when it has tokens for several."""
    return schedule_messages(message, recipients("fb", to), sender=sender, priority=priority)


def schedule_vkontakte_message(
    message: Any, to: Any, sender: Any = None, priority: int | None = None
) -> Any:
    """Posts ``message`` (a text, or a single URL posted as a link) on the VK walls ``to``: user
    ids, community ids as negative numbers, or users with a ``vkontakte`` attribute."""
    return schedule_messages(message, recipients("vk", to), sender=sender, priority=priority)
