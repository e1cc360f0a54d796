"""MessengerBase: what every channel implements, and the small lifecycle the workers drive.

A messenger never touches the database. ``send()`` records one outcome per dispatch with
``mark_sent()``, ``mark_error()`` or ``mark_failed()``; the delivery pipeline
(``dispatcher.pipeline``) turns outcomes into rows, decides retry versus final, and owns the
batch. Messengers know nothing of Celery either, so they can be tested on their own.
"""

from __future__ import annotations

import contextvars
import re
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from django.conf import settings
from django.db import models

from .exceptions import DeliveryError, InvalidAddressError, MessengerConfigurationError

if TYPE_CHECKING:
    import requests

    from dispatcher.messages import MessageBase
    from dispatcher.models import Dispatch, Message

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
#: Longest address a dispatch row can hold.
MAX_ADDRESS_LENGTH = 255
#: The setting naming a PEM file of CA certificates that every builtin messenger trusts in
#: addition to its usual ones (declared, and checked at startup, in dispatcher/conf.py).
CA_FILE_SETTING = "SITEMESSAGE_CA_FILE"


@dataclass(frozen=True)
class Recipient:
    """One address of one messenger, and the user it belongs to (if any)."""

    messenger: str
    user: Any
    address: str

    def to_wire(self) -> dict[str, Any]:
        user = None if self.user is None else self.user.pk
        return {"messenger": self.messenger, "user": user, "address": self.address}


@dataclass(frozen=True)
class Outcome:
    """What a messenger decided for one dispatch."""

    #: "deferred": given back without spending an attempt (no rate-limit slot was free, or
    #: the messenger called mark_pending()); due again after ``retry_after`` seconds.
    status: Literal["sent", "error", "failed", "deferred"]
    error: BaseException | str | None = None
    provider_id: str = ""
    #: Seconds the provider asked us to wait (rate limits); None lets the backoff decide.
    retry_after: float | None = None


#: Receives every dispatch as soon as it is marked, so the pipeline can persist outcomes in
#: small chunks while a long batch is still being sent.
outcome_listener: contextvars.ContextVar[Callable[[Any], None] | None] = contextvars.ContextVar(
    "sitemessage_outcome_listener", default=None
)


class MessengerBase:
    """Base class of every messenger, builtin or user-defined.

    Subclasses set ``alias`` and implement ``send()``; those that hold a connection implement
    ``before_send()``/``after_send()`` too. A worker process calls ``before_send()`` once when
    it starts and ``after_send()`` once when it stops; every batch in between calls ``send()``
    on the same, warm, instance.
    """

    #: Short unique name: ``recipients('smtp', ...)``, queue ``messenger.smtp``.
    #: Defaults to the class name.
    alias: str | None = None

    #: Human-readable name for the admin.
    title: str | None = None

    #: Attribute of a user object that holds the user's address for this messenger.
    address_attr: str | None = None

    #: Whether users may subscribe to messages through this messenger (the preferences UI).
    allow_user_subscription: bool = True

    #: Delivery rate shared by every worker of this messenger: ``'30/s'``, ``'100/m'``,
    #: ``'1000/h'``; None: no limit. SITEMESSAGE_MESSENGERS can override it per deployment.
    rate_limit: str | None = None

    #: True for a messenger that calls settle_outcomes() before each delivery it makes and
    #: queries no database in send(): the pipeline may then store a SENT mark while the next
    #: message is being prepared. False (the default): each mark is stored before mark_sent()
    #: returns.
    settles_outcomes: bool = False

    @classmethod
    def get_alias(cls) -> str:
        return cls.alias or cls.__name__

    def __str__(self) -> str:
        return alias_of(self)

    @classmethod
    def get_address(cls, recipient: Any) -> Any:
        """Returns the address of a recipient: a string is taken as it is, a user object gives
        its ``address_attr`` attribute."""
        if isinstance(recipient, str) or not cls.address_attr:
            return recipient
        return getattr(recipient, cls.address_attr, None)

    @classmethod
    def structure_recipients_data(cls, recipients: Any) -> list[Recipient]:
        """Returns one Recipient of this messenger per address or user object in
        ``recipients`` (one, or an iterable of them), its address from get_address(), checking
        nothing: ``recipients()`` calls it and then checks what it returns (and gives each the
        alias the messenger is registered under). Override it to turn what your code passes
        in into recipients (django-sitemessage's hook)."""
        items = recipients if is_iterable(recipients) else [recipients]
        return [
            Recipient(
                cls.get_alias(),
                item if isinstance(item, models.Model) else None,
                cls.get_address(item),
            )
            for item in items
        ]

    @classmethod
    def validate_address(cls, address: str) -> None:
        """Raises InvalidAddressError for an address this messenger cannot deliver to.
        Called by schedule_messages() before anything is written."""
        if not address or not address.strip():
            raise InvalidAddressError(f"messenger {cls.get_alias()!r}: empty address")
        if len(address) > MAX_ADDRESS_LENGTH:
            raise InvalidAddressError(
                f"messenger {cls.get_alias()!r}: address longer than {MAX_ADDRESS_LENGTH} "
                f"characters ({len(address)})"
            )
        if _CONTROL_CHARS.search(address):
            raise InvalidAddressError(
                f"messenger {cls.get_alias()!r}: address {address!r} contains control characters"
            )
        try:
            address.encode()
        except UnicodeEncodeError:
            raise InvalidAddressError(
                f"messenger {cls.get_alias()!r}: address {address!r} is not valid Unicode "
                "(it contains a lone surrogate)"
            ) from None

    def before_send(self) -> None:
        """Warm up (connect, log in). Called once per worker process before its first batch, and
        by send_test_message(). Must be harmless when called twice; may raise, in which case the
        first batch calls it again."""

    def after_send(self) -> None:
        """Cool down (disconnect). Called once when the worker process stops. Must be harmless
        without a preceding before_send()."""

    def send(
        self,
        message_cls: type[MessageBase],
        message_model: Message,
        dispatch_models: list[Dispatch],
    ) -> None:
        """Delivers one message to a batch of its dispatches and marks each of them.

        ``dispatch_models[i].address`` is where to send, ``.message_cache`` the body rendered
        for that recipient. An exception raised here marks every dispatch not marked yet as
        errored (or failed, for a PermanentDeliveryError)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement "
            "send(self, message_cls, message_model, dispatch_models)"
        )

    def send_each(
        self, dispatch_models: list[Dispatch], deliver: Callable[[Dispatch], str]
    ) -> None:
        """Delivers dispatches one at a time: ``deliver(dispatch)`` returns the provider's id
        for it or raises a DeliveryError, which marks that dispatch only."""
        for dispatch in dispatch_models:
            try:
                provider_id = deliver(dispatch)
            except DeliveryError as error:
                self.mark_exception(dispatch, error)
            else:
                self.mark_sent(dispatch, provider_id=provider_id)

    @contextmanager
    def before_after_send_handling(self) -> Iterator[None]:
        """Runs the block with this messenger warm: before_send() first, unless the messenger
        is warm already (a worker process warmed it), and after_send() at the end only if this
        call warmed it, so a worker's open connection stays open. What before_send() or the
        block raises propagates (django-sitemessage's context manager swallowed it)."""
        with _lifecycle_lock:
            was_warm = bool(self.__dict__.get("_sm_warm"))
            warm_up(self)
        try:
            yield
        finally:
            if not was_warm:
                cool_down(self)

    def send_test_message(self, to: str, text: str) -> Any:
        """Sends ``text`` to ``to`` right now, in this process. Raises on failure."""
        with self.before_after_send_handling():
            return self._test_message(to, text)

    def _test_message(self, to: str, text: str) -> Any:
        raise NotImplementedError(f"{type(self).__name__} cannot send test messages")

    def mark_pending(self, dispatch: Dispatch) -> None:
        """Gives a dispatch back undelivered without spending one of its attempts: it is due
        again at once, and the next sweep publishes it (django-sitemessage kept it pending)."""
        record_outcome(dispatch, Outcome("deferred", retry_after=0))

    def mark_sent(self, dispatch: Dispatch, *, provider_id: str = "") -> None:
        """Records a delivered dispatch; ``provider_id`` is the provider's id for it."""
        record_outcome(dispatch, Outcome("sent", provider_id=str(provider_id or "")))

    def mark_error(
        self, dispatch: Dispatch, error: BaseException | str, message_cls: Any = None
    ) -> None:
        """Records a temporary failure: the dispatch is retried later."""
        record_outcome(dispatch, Outcome("error", error, retry_after=_retry_after(error)))

    def mark_failed(
        self, dispatch: Dispatch, error: BaseException | str, message_cls: Any = None
    ) -> None:
        """Records a permanent failure: the dispatch is not retried."""
        record_outcome(dispatch, Outcome("failed", error))

    def mark_exception(self, dispatch: Dispatch, error: BaseException) -> None:
        """Records an exception as temporary or permanent, by its class."""
        if isinstance(error, DeliveryError) and not error.temporary:
            self.mark_failed(dispatch, error)
        elif isinstance(error, NotImplementedError):
            self.mark_failed(dispatch, error)
        else:
            self.mark_error(dispatch, error)


_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*")
_PER = {"s": 1, "m": 60, "h": 3600}


def seconds_per_send(rate: str) -> float:
    """``'30/s'`` -> 1/30: the spacing of sends at a rate given per second, minute or hour."""
    match = _RATE.fullmatch(str(rate))
    if not match or float(match[1]) <= 0:
        raise ValueError(f"rate limit {rate!r} is not of the form '<positive number>/<s|m|h>'")
    return _PER[match[2]] / float(match[1])


def is_iterable(value: Any) -> bool:
    """Tells whether ``value`` holds several items: iterable and not a string
    (django-sitemessage's helper)."""
    return hasattr(value, "__iter__") and not isinstance(value, str)


def _retry_after(error: object) -> float | None:
    return getattr(error, "retry_after", None)


def record_outcome(dispatch: Any, outcome: Outcome) -> None:
    """Sets a dispatch's outcome and hands it to the pipeline's listener, if one listens."""
    dispatch.outcome = outcome
    listener = outcome_listener.get()
    if listener is not None:
        listener(dispatch)


def settle_outcomes() -> None:
    """Waits until the outcomes marked so far are stored. A messenger with
    ``settles_outcomes`` calls it just before it hands the next message over for good (for
    SMTP: before the content, once the server has opened DATA), so at most the message being
    delivered lacks its SENT record should the process die (README's delivery guarantees)."""
    settle = getattr(outcome_listener.get(), "settle", None)
    if settle is not None:
        settle()


def alias_of(messenger: Any) -> str:
    """The alias of a messenger instance, class or alias string."""
    if isinstance(messenger, str):
        return messenger
    alias = getattr(messenger, "alias", None)
    if alias:
        return str(alias)
    cls = messenger if isinstance(messenger, type) else type(messenger)
    return cls.__name__


_lifecycle_lock = threading.RLock()


def warm_up(messenger: MessengerBase) -> None:
    """Runs before_send() unless this messenger is already warm."""
    with _lifecycle_lock:
        if not messenger.__dict__.get("_sm_warm"):
            messenger.before_send()
            messenger.__dict__["_sm_warm"] = True


def cool_down(messenger: MessengerBase) -> None:
    """Runs after_send() if this messenger is warm; it is cold afterwards whatever happens."""
    with _lifecycle_lock:
        if messenger.__dict__.get("_sm_warm"):
            try:
                messenger.after_send()
            finally:
                messenger.__dict__["_sm_warm"] = False


def unmarked(dispatches: Iterable[Any]) -> list[Any]:
    return [d for d in dispatches if getattr(d, "outcome", None) is None]


def ca_file_problem(path: str, context: ssl.SSLContext | None = None) -> str | None:
    """Loads the CA certificates of the PEM file ``path`` into ``context`` (default: a
    throw-away one, to check the file); returns why that failed, or None."""
    context = context or ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    before = context.cert_store_stats()["x509"]
    try:
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        return "names no file"
    except IsADirectoryError:
        return "names a directory, not a PEM file"
    except ssl.SSLError as exc:
        return f"is not a PEM file of certificates ({exc.reason or exc})"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if context.cert_store_stats()["x509"] == before:
        return "holds no certificate"
    return None


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client SSLContext that verifies the server's certificate chain and host name against
    the system's CAs (``cafile``: that bundle instead) plus those of SITEMESSAGE_CA_FILE when
    it is set, read now. Raises MessengerConfigurationError when that file does not load."""
    context = ssl.create_default_context(cafile=cafile)
    path = getattr(settings, CA_FILE_SETTING, None)
    if path is not None:
        problem = ca_file_problem(path, context)
        if problem:
            raise MessengerConfigurationError(f"{CA_FILE_SETTING} {problem}, got {path!r}")
    return context


def use_tls_context(session: requests.Session) -> None:
    """When SITEMESSAGE_CA_FILE is set, makes ``session`` verify HTTPS servers against
    requests' own CA bundle (certifi) plus that file; otherwise leaves it as requests made it.
    Called when an HTTP messenger opens its session; raises as tls_context() does."""
    if getattr(settings, CA_FILE_SETTING, None) is None:
        return
    # Imported here: only the HTTP messengers need requests.
    from requests.adapters import HTTPAdapter
    from requests.utils import DEFAULT_CA_BUNDLE_PATH

    context = tls_context(cafile=DEFAULT_CA_BUNDLE_PATH)

    class Adapter(HTTPAdapter):
        # requests' verify=<path> would replace its bundle; a pool's SSLContext adds to it.
        # Connections through a proxy get their pools from proxy_manager_for().
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **{**kwargs, "ssl_context": context})

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            return super().proxy_manager_for(proxy, **{**kwargs, "ssl_context": context})

    session.mount("https://", Adapter())
