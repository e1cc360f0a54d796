"""Import-compatible facade: django-sitemessage's ``sitemessage.models``. Re-exports only."""

from dispatcher.models import Dispatch, DispatchError, Message, Subscription

__all__ = ["Dispatch", "DispatchError", "Message", "Subscription"]
