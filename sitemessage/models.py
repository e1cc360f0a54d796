"""Import-compatible facade: django-sitemessage's ``sitemessage.models``. Re-exports only."""

from dispatcher.models import (
    USER_MODEL,
    Dispatch,
    DispatchError,
    Message,
    MessageTuple,
    Subscription,
)

__all__ = ["USER_MODEL", "Dispatch", "DispatchError", "Message", "MessageTuple", "Subscription"]
