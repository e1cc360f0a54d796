"""Errors raised by sitemessage.

Hierarchy (django-sitemessage 1.4's names and nesting, ours inside them)::

    SiteMessageError (= SitemessageError)
     +-- SiteMessageConfigurationError  upstream's misconfiguration error (also ImproperlyConfigured)
     +-- MessengerException             upstream's root of messenger errors
     |    +-- UnknownMessengerError     (below, under ScheduleError too)
     |    +-- DeliveryError             a messenger could not deliver (carries alias, dispatch, response)
     |         +-- TemporaryDeliveryError    worth retrying: timeouts, refused connections, SMTP 4xx,
     |         |    |                        HTTP 429/5xx
     |         |    +-- MessengerWarmupException  before_send() could not connect or log in
     |         +-- PermanentDeliveryError    retrying cannot help: SMTP 5xx for a recipient, HTTP 4xx
     |         +-- TelegramMessengerException   what the Telegram, Facebook and VKontakte
     |         +-- FacebookMessengerException   messengers raise (upstream's names); each has a
     |         +-- VKontakteMessengerException  Temporary and a Permanent subclass, e.g.
     |                                          TelegramTemporaryError(TelegramMessengerException,
     |                                          TemporaryDeliveryError)
     +-- ScheduleError                  bad input to schedule_messages()/recipients(); nothing written
          +-- UnknownMessengerError     an alias that is not registered (also a MessengerException
          |                             and a LookupError)
          +-- UnknownMessageTypeError   a message type that is not registered (also a LookupError)
          +-- InvalidAddressError       an empty or malformed address, a user without one
          +-- InvalidContextError       a message context that is not JSON

    MessengerConfigurationError         a messenger option that is unknown or invalid; deliberately
                                        outside SiteMessageError (it is an ImproperlyConfigured) so
                                        that a delivery loop catching SiteMessageError cannot hide
                                        it. Upstream never raised SiteMessageConfigurationError for
                                        messenger options, so it is not one of those either.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured


class SiteMessageError(Exception):
    """Root of every error sitemessage raises on purpose (django-sitemessage's name)."""


#: Our earlier name of the root; the same class.
SitemessageError = SiteMessageError


class SiteMessageConfigurationError(SiteMessageError, ImproperlyConfigured):
    """Sitemessage is configured in a way it cannot work with (django-sitemessage's class)."""


class MessengerException(SiteMessageError):
    """Root of the errors of messengers (django-sitemessage's name)."""


class ScheduleError(SitemessageError, ValueError):
    """schedule_messages() or recipients() was given input it cannot store."""


class UnknownMessengerError(ScheduleError, MessengerException, LookupError):
    """No messenger is registered under the alias."""

    def __init__(self, alias: object, registered: list[str], where: str = "") -> None:
        self.alias = alias
        self.registered = registered
        known = ", ".join(repr(a) for a in sorted(registered)) or "none"
        super().__init__(
            f"messenger {alias!r} is not registered{' in ' + where if where else ''}; "
            f"registered messengers: {known}"
            f"{did_you_mean(alias, registered)}"
        )


class UnknownMessageTypeError(ScheduleError, LookupError):
    """No message type is registered under the alias."""

    def __init__(self, alias: object, registered: list[str]) -> None:
        self.alias = alias
        self.registered = registered
        known = ", ".join(repr(a) for a in sorted(registered)) or "none"
        super().__init__(
            f"message type {alias!r} is not registered (register it with "
            f"register_message_types() in a sitemessages.py module); registered types: {known}"
            f"{did_you_mean(alias, registered)}"
        )


class InvalidAddressError(ScheduleError):
    """An address that the messenger cannot deliver to."""


class InvalidContextError(ScheduleError):
    """A message context that cannot be stored as JSON."""


class UnsupportedMessengerError(ScheduleError):
    """A message type scheduled through a messenger not in its ``supported_messengers``."""


class DeliveryError(MessengerException):
    """A messenger failed to deliver; says which messenger, which dispatch and what the
    provider answered."""

    #: Whether the pipeline should try again later.
    temporary = True

    def __init__(
        self,
        message: str,
        *,
        alias: str | None = None,
        dispatch_id: int | None = None,
        response: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.alias = alias
        self.dispatch_id = dispatch_id
        self.response = response
        #: Seconds the provider asked us to wait before the next attempt (HTTP Retry-After).
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = super().__str__()
        where = ", ".join(
            f"{name}={value}"
            for name, value in (("messenger", self.alias), ("dispatch", self.dispatch_id))
            if value is not None
        )
        if self.response is not None:
            where = (
                f"{where}, response={self.response!r}" if where else f"response={self.response!r}"
            )
        return f"{text} ({where})" if where else text


class TemporaryDeliveryError(DeliveryError):
    """Delivery failed for a reason that may go away: the dispatch is retried."""


class MessengerWarmupException(TemporaryDeliveryError):
    """A messenger could not warm up (connect, log in) in before_send(); its dispatches are
    retried later, as django-sitemessage did."""


class PermanentDeliveryError(DeliveryError):
    """Delivery failed for good: the dispatch is marked failed at once."""

    temporary = False


class TelegramMessengerException(DeliveryError):
    """The Telegram Bot API refused a request or could not be reached (django-sitemessage's
    name); raised as TelegramTemporaryError or TelegramPermanentError."""


class TelegramTemporaryError(TelegramMessengerException, TemporaryDeliveryError):
    """A Telegram error worth retrying: unreachable, rate limited (429), server errors."""


class TelegramPermanentError(TelegramMessengerException, PermanentDeliveryError):
    """A Telegram error retrying cannot help: an unknown chat, a bot the user blocked."""


class FacebookMessengerException(DeliveryError):
    """The Graph API refused a request or could not be reached (django-sitemessage's name);
    raised as FacebookTemporaryError or FacebookPermanentError."""


class FacebookTemporaryError(FacebookMessengerException, TemporaryDeliveryError):
    """A Graph API error worth retrying: unreachable, throttled, transient or server errors."""


class FacebookPermanentError(FacebookMessengerException, PermanentDeliveryError):
    """A Graph API error retrying cannot help: a bad token, a missing permission."""


class VKontakteMessengerException(DeliveryError):
    """The VK API refused a request or could not be reached (django-sitemessage's name);
    raised as VKontakteTemporaryError or VKontaktePermanentError."""


class VKontakteTemporaryError(VKontakteMessengerException, TemporaryDeliveryError):
    """A VK API error worth retrying: unreachable, rate limited, internal errors."""


class VKontaktePermanentError(VKontakteMessengerException, PermanentDeliveryError):
    """A VK API error retrying cannot help: a bad token, a closed wall."""


class MessengerConfigurationError(ImproperlyConfigured):
    """A messenger was configured with an unknown or invalid option."""


def did_you_mean(name: object, candidates: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
