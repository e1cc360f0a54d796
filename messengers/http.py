"""HTTPMessenger: what the messengers that call an HTTP API with requests share (Telegram,
Facebook, VKontakte): one keep-alive session per worker process, opened by ``before_send()``
(or the first send) and closed by ``after_send()``, verifying TLS with SITEMESSAGE_CA_FILE's
CAs too, through an optional proxy; each dispatch is one ``deliver()`` call. ``get()`` and
``post()`` call an API through that session, for messengers of your own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .base import MessengerBase, use_tls_context
from .exceptions import (
    MessengerConfigurationError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)

if TYPE_CHECKING:
    import requests

    from dispatcher.messages import MessageBase
    from dispatcher.models import Dispatch, Message

#: A proxy option: a URL for every scheme, URLs by scheme, or a callable returning either
#: (called once per session, so once per worker process).
Proxy = str | Mapping[str, str] | Callable[[], Any] | None


class HTTPMessenger(MessengerBase):
    """Base class of the HTTP API messengers. Subclasses set ``proxy`` and implement
    ``deliver(address, text, dispatch_id)``; the empty address is theirs to allow."""

    proxy: Proxy = None
    #: Seconds a request may take (connecting, then each read); subclasses take it as an option.
    timeout: float = 10
    _session: requests.Session | None = None

    def before_send(self) -> None:
        self._ensure_session()

    def after_send(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def send(
        self,
        message_cls: type[MessageBase],
        message_model: Message,
        dispatch_models: list[Dispatch],
    ) -> None:
        self.send_each(dispatch_models, lambda d: self.deliver(d.address, d.message_cache, d.pk))

    def _test_message(self, to: str, text: str) -> str:
        self.validate_address(to or "")
        return self.deliver(to or "", text, None)

    def deliver(self, address: str, text: str, dispatch_id: int | None) -> str:
        """Sends one message; returns the provider's id for it. Raises a Temporary- or
        PermanentDeliveryError (their texts never hold a credential)."""
        raise NotImplementedError

    def get(self, url: str, json: bool = True) -> Any:
        """GETs ``url`` through this messenger's session (its proxy, TLS and ``timeout``);
        returns the answer's JSON, or its text when ``json`` is False, whatever its status:
        an API's error bodies are the caller's to read (django-sitemessage's helper).

        Raises TemporaryDeliveryError when the server cannot be reached or answers 429/5xx
        without JSON, PermanentDeliveryError for another answer without JSON."""
        return self._fetch("GET", url, None, json)

    def post(self, url: str, data: dict[str, Any]) -> Any:
        """POSTs ``data`` (form-encoded) to ``url``; returns the answer's JSON. Raises as
        get() does."""
        return self._fetch("POST", url, data, True)

    def _fetch(self, method: str, url: str, data: dict[str, Any] | None, json: bool) -> Any:
        import requests

        session = self._ensure_session()
        # Errors name the host only: an API's URL may hold a token (Telegram's does).
        host = urlsplit(url).hostname
        try:
            response = session.request(method, url, data=data, timeout=self.timeout)
        except requests.RequestException as exc:
            failure = type(exc).__name__
        else:
            if not json:
                return response.text
            try:
                return response.json()
            except ValueError:
                status = response.status_code
                error = (
                    TemporaryDeliveryError
                    if status == 429 or status >= 500
                    else PermanentDeliveryError
                )
                raise error(
                    f"{host} answered HTTP {status} without JSON", alias=self.alias, response=status
                ) from None
        # Raised outside the except block: the original exception's text holds the URL.
        raise TemporaryDeliveryError(f"cannot reach {host}: {failure}", alias=self.alias)

    def _ensure_session(self) -> requests.Session:
        if self._session is None:
            import requests  # the channel modules name the extra when it is missing

            session = requests.Session()
            use_tls_context(session)
            session.proxies.update(proxies(self.proxy, type(self).__name__))
            self._session = session
        return self._session


def proxies(proxy: Proxy, owner: str) -> dict[str, str]:
    """The requests ``proxies`` of a ``proxy`` option; raises MessengerConfigurationError
    (naming ``owner``) for a value that is none of its forms."""
    value = proxy() if callable(proxy) else proxy
    if not value:
        return {}
    if isinstance(value, str):
        return {"http": value, "https": value}
    if isinstance(value, Mapping):
        return {str(scheme): str(url) for scheme, url in value.items()}
    raise MessengerConfigurationError(
        f"{owner}: proxy must be a URL, a dict of URLs by scheme or a callable returning either, "
        f"got {type(value).__name__}"
    )
