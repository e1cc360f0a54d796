"""The registry of message types: alias -> class. Below the models (which look types up by the
alias they store), so it knows message types only by the little it needs of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from messengers.exceptions import UnknownMessageTypeError

if TYPE_CHECKING:
    from .messages import MessageBase

#: Attempts a dispatch gets when its message type says nothing (or is gone).
DEFAULT_RETRY_LIMIT = 10

_message_types: dict[str, type[MessageBase]] = {}


def add_message_type(message_type: type[MessageBase]) -> None:
    """Registers one (checked) message type under its alias; see messages.register_message_types."""
    _message_types[message_type.get_alias()] = message_type


def get_registered_message_types() -> dict[str, type[MessageBase]]:
    return dict(_message_types)


def get_registered_message_type(alias: str) -> type[MessageBase]:
    try:
        return _message_types[alias]
    except KeyError:
        raise UnknownMessageTypeError(alias, list(_message_types)) from None


def retry_limit(message_type: str) -> int:
    """Attempts a dispatch of this message type gets (the default for an unknown type)."""
    try:
        return get_registered_message_type(message_type).send_retry_limit
    except LookupError:
        return DEFAULT_RETRY_LIMIT
