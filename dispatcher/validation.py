"""What scheduling checks before anything is written, for every way of writing a message:
``schedule_messages()`` and its ``.delay()`` (dispatcher/toolbox.py) and django-sitemessage's
``Message.create()`` / ``Dispatch.create()`` (dispatcher/models.py). Raises ScheduleError
subclasses that name the problem."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from django.contrib.auth import get_user_model

from messengers.base import MessengerBase, Recipient, alias_of
from messengers.exceptions import (
    InvalidAddressError,
    InvalidContextError,
    ScheduleError,
    UnsupportedMessengerError,
)
from messengers.registry import get_registered_messenger_object

from . import conf

if TYPE_CHECKING:
    from .messages import MessageBase

#: Highest priority a Message row can store.
MAX_PRIORITY = 32767
#: Deepest nesting of lists and dicts a message context may have.
MAX_CONTEXT_DEPTH = 50


def recipients(
    messenger: str | type[MessengerBase] | MessengerBase, addresses_or_users: Any
) -> list[Recipient]:
    """Builds the recipient list of one messenger from addresses and user objects (through
    the messenger's structure_recipients_data()), each checked. Lists from several calls can
    be added together."""
    messenger_obj = get_registered_messenger_object(messenger)
    alias = alias_of(messenger_obj)
    result = []
    for item in messenger_obj.structure_recipients_data(addresses_or_users):
        if not isinstance(item, Recipient):
            raise ScheduleError(
                f"messenger {alias!r}: structure_recipients_data() must return Recipient "
                f"objects, got {type(item).__name__}"
            )
        user, address = item.user, item.address
        if user is not None:
            check_user(user, "recipient")
        if user is not None and not (isinstance(address, str) and address):
            raise InvalidAddressError(
                f"messenger {alias!r}: user {user!r} (pk {user.pk}) has no address for it"
            )
        if not isinstance(address, str):
            raise InvalidAddressError(
                f"messenger {alias!r}: an address must be a string, got {address!r:.100}"
            )
        # The alias it is registered under, which may not be its class's.
        result.append(Recipient(alias, user, address))
    for recipient in result:
        messenger_obj.validate_address(recipient.address)
    return result


def check_supported(message_type: type[MessageBase], recipients: Iterable[Recipient]) -> None:
    """Raises UnsupportedMessengerError when a recipient's messenger is not among the type's
    ``supported_messengers`` (an empty list supports every messenger)."""
    supported = message_type.supported_messengers
    for recipient in recipients:
        if supported and recipient.messenger not in supported:
            raise UnsupportedMessengerError(
                f"message type {message_type.get_alias()!r} cannot be sent through messenger "
                f"{recipient.messenger!r}; it supports {', '.join(map(repr, supported))}"
            )


def user_pk(user: Any) -> Any:
    return None if user is None else user.pk


def check_priority(priority: Any, what: str = "priority") -> None:
    """Raises ScheduleError unless ``priority`` fits a Message row."""
    if not (
        isinstance(priority, int)
        and not isinstance(priority, bool)
        and 0 <= priority <= MAX_PRIORITY
    ):
        raise ScheduleError(f"{what} must be an integer from 0 to {MAX_PRIORITY}, got {priority!r}")


def check_user(user: Any, role: str) -> None:
    """Raises ScheduleError unless ``user`` is a saved user."""
    if not isinstance(user, get_user_model()):
        raise ScheduleError(f"{role} must be a {get_user_model().__name__}, got {user!r}")
    if user.pk is None:
        raise ScheduleError(f"{role} {user!r} is not saved")


def checked_recipients(items: Recipient | Iterable[Recipient] | None) -> list[Recipient]:
    """Returns the recipients (one, or an iterable of them) without duplicate (messenger,
    address) pairs, each checked by its messenger; raises UnknownMessengerError,
    InvalidAddressError or ScheduleError for a bad one."""
    if isinstance(items, Recipient):
        items = [items]
    result: dict[tuple[str, str], Recipient] = {}
    for recipient in items or []:
        if not isinstance(recipient, Recipient):
            raise ScheduleError(
                f"recipients must come from recipients(), got {type(recipient).__name__}"
            )
        messenger = get_registered_messenger_object(recipient.messenger)
        if not isinstance(recipient.address, str):
            raise InvalidAddressError(
                f"messenger {recipient.messenger!r}: address must be a string, "
                f"got {type(recipient.address).__name__}"
            )
        messenger.validate_address(recipient.address)
        if recipient.user is not None:
            check_user(recipient.user, "recipient")
        result.setdefault((recipient.messenger, recipient.address), recipient)
    return list(result.values())


def checked_context(context: Any, message_type: type[MessageBase]) -> dict[str, Any]:
    """Returns the context as the database will store it (a JSON object); raises
    InvalidContextError naming the problem: not a dict, nested too deeply, larger than
    SITEMESSAGE_MAX_MESSAGE_SIZE, not JSON, text no database stores, or a header value of more
    than one line."""
    alias = message_type.get_alias()
    if not isinstance(context, dict):
        raise InvalidContextError(
            f"context of {alias!r} must be a dict, got {type(context).__name__}"
        )
    depth = _depth(context)
    if depth > MAX_CONTEXT_DEPTH:
        raise InvalidContextError(
            f"context of {alias!r} is nested more than {MAX_CONTEXT_DEPTH} levels deep"
        )
    try:
        text = json.dumps(context, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidContextError(f"context of {alias!r} is not JSON: {exc}") from None
    size, limit = len(text.encode(errors="surrogatepass")), conf.MAX_MESSAGE_SIZE.get()
    if size > limit:
        raise InvalidContextError(
            f"context of {alias!r} is {size} bytes of JSON, more than "
            f"SITEMESSAGE_MAX_MESSAGE_SIZE ({limit})"
        )
    result = json.loads(text)
    problem = _unstorable_text(result)
    if problem:
        raise InvalidContextError(
            f"context of {alias!r} contains {problem}, which databases cannot store in JSON"
        )
    for key in message_type.header_fields:
        value = result.get(key, "")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise InvalidContextError(
                f"context of {alias!r}: {key!r} goes into a header and must be "
                f"one line of text, got {value!r:.100}"
            )
    return result


def _depth(value: Any) -> int:
    """How deeply containers nest in a value, counted without recursion (so a context nested
    100,000 levels deep is measured, not a RecursionError); stops counting past the limit."""
    deepest, level = 0, [value]
    while level and deepest <= MAX_CONTEXT_DEPTH:
        level = [
            child
            for item in level
            if isinstance(item, dict | list | tuple)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        deepest += 1
    return deepest if level else deepest - 1


def _unstorable_text(value: Any) -> str | None:
    """Names what the first string in a JSON value holds that databases cannot store, if any."""
    if isinstance(value, str):
        if "\x00" in value:
            return "a NUL character"
        try:
            value.encode()
        except UnicodeEncodeError:
            return "a lone surrogate"
        return None
    if isinstance(value, dict):
        items = [*value, *value.values()]
    else:
        items = value if isinstance(value, list) else []
    return next((problem for problem in map(_unstorable_text, items) if problem), None)
