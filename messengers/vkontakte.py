"""VKontakteMessenger: wall posts through the VK API (``wall.post``) over one keep-alive
``requests.Session`` per worker process.

The VK API answers errors with HTTP 200 and a body ``{"error": {"error_code", "error_msg",
"request_params"}}``; the error code decides between retrying and failing. The access token
travels in request bodies only: URLs, which exception texts and urllib3's log lines show,
never hold it, and VK's errors do not repeat it.
"""

from __future__ import annotations

import hashlib
import re
import webbrowser
from typing import Any
from urllib.parse import urlencode

try:
    import requests
except ModuleNotFoundError as exc:  # an optional dependency: name the extra that installs it
    raise ModuleNotFoundError(
        f"VKontakteMessenger needs {exc.name}: pip install 'sitemessage-celery[vkontakte]'",
        name=exc.name,
    ) from exc

from .exceptions import (
    DeliveryError,
    InvalidAddressError,
    MessengerConfigurationError,
    VKontaktePermanentError,
    VKontakteTemporaryError,
)
from .http import HTTPMessenger, Proxy, proxies

DEFAULT_BASE_URL = "https://api.vk.com"
DEFAULT_OAUTH_URL = "https://oauth.vk.com"
DEFAULT_API_VERSION = "5.199"
#: Where the implicit flow of a Standalone application sends the browser with the token.
REDIRECT_URI = "https://oauth.vk.com/blank.html"
#: Too many requests per second (6), flood control (9), rate limit reached (29).
RATE_LIMIT_CODES = frozenset({6, 9, 29})
#: Worth retrying: unknown error (1), internal server error (10), and the rate limits.
TEMPORARY_CODES = RATE_LIMIT_CODES | {1, 10}
#: Seconds to wait after "too many requests per second": the limit is per second.
PER_SECOND_WAIT = 1.0

#: An http(s) proxy URL for both schemes, a requests ``proxies`` dict, or a callable returning
#: either (called when the session opens, once per worker process).

#: A user id, or a community id as a negative number.
_OWNER_ID = re.compile(r"-?[1-9]\d{0,19}")
_LINK = re.compile(r"https?://\S+")


class VKontakteMessenger(HTTPMessenger):
    """Posts on VK walls. The address is the wall's ``owner_id``: a user id (``12345``), a
    community id as a negative number (``-12345``: posted as the community), or ``''`` for the
    token owner's own wall. A text that is a single http(s) URL is posted as a link
    attachment, any other as the post's message. Get a token with ``get_access_token()``."""

    alias = "vk"
    title = "VKontakte"
    address_attr = "vkontakte"

    def __init__(
        self,
        access_token: str,
        proxy: Proxy = None,
        timeout: float = 10,
        base_url: str = DEFAULT_BASE_URL,
        api_version: str = DEFAULT_API_VERSION,
    ) -> None:
        if not isinstance(access_token, str) or not access_token.strip():
            raise MessengerConfigurationError("VKontakteMessenger: access_token is empty")
        self._token = access_token
        if not callable(proxy):
            proxies(proxy, "VKontakteMessenger")  # a bad value fails here, not in a worker
        self.proxy = proxy
        self.timeout = float(timeout)
        self.base_url = base_url.rstrip("/")
        self.api_version = api_version

    def __repr__(self) -> str:
        return f"<VKontakteMessenger {self.base_url}>"  # never the token

    @classmethod
    def get_access_token(
        cls, *, app_id: str, open_browser: bool = True, oauth_url: str = DEFAULT_OAUTH_URL
    ) -> str:
        """Returns the URL at which VK grants an access token to the Standalone application
        ``app_id`` (scope ``wall,offline``: wall posts, no expiry), and opens it in a browser
        unless ``open_browser`` is False. After confirming, the browser lands on a page whose
        URL holds the token: the characters after ``access_token=`` up to the next ``&``."""
        query = urlencode(
            {
                "client_id": app_id,
                "scope": "wall,offline",
                "display": "page",
                "response_type": "token",
                "v": DEFAULT_API_VERSION,
                "redirect_uri": REDIRECT_URI,
            }
        )
        url = f"{oauth_url.rstrip('/')}/authorize?{query}"
        if open_browser:
            webbrowser.open(url)
        return url

    @classmethod
    def validate_address(cls, address: str) -> None:
        if address == "":
            return  # the token owner's own wall
        super().validate_address(address)
        if not _OWNER_ID.fullmatch(address):
            raise InvalidAddressError(
                f"messenger {cls.get_alias()!r}: {address!r} is not a VK wall owner_id (a user "
                "id, a community id as a negative number, or '' for the token owner's wall)"
            )

    def deliver(self, owner_id: str, text: str, dispatch_id: int | None) -> str:
        """Publishes one wall post; returns ``<owner_id>_<post_id>`` (or the post id on the
        token owner's wall). Raises a VKontakteTemporaryError or VKontaktePermanentError."""
        text = text.strip()
        data = {
            "attachments" if _LINK.fullmatch(text) else "message": text,
            "from_group": "1",  # on a community wall: posted as the community
            "access_token": self._token,
            "v": self.api_version,
        }
        if owner_id:
            data["owner_id"] = owner_id
        if dispatch_id is not None:
            # VK keeps one post per guid: a retry after a lost answer does not post twice.
            data["guid"] = _guid(dispatch_id, text)
        session = self._ensure_session()
        try:
            response = session.post(
                f"{self.base_url}/method/wall.post", data=data, timeout=self.timeout
            )
        except requests.RequestException as exc:
            failure = f"{type(exc).__name__}: {exc}"
        else:
            return self._result(response, owner_id, dispatch_id)
        # Raised outside the except block: the original exception's request holds the token.
        raise VKontakteTemporaryError(
            f"cannot reach the VK API at {self.base_url}: {failure}",
            alias=self.alias,
            dispatch_id=dispatch_id,
        )

    def _result(self, response: requests.Response, owner_id: str, dispatch_id: int | None) -> str:
        try:
            body = _dict(response.json())
        except ValueError:
            body = {}
        post_id = _dict(body.get("response")).get("post_id")
        if response.ok and "error" not in body and isinstance(post_id, int | str):
            return f"{owner_id}_{post_id}" if owner_id else str(post_id)
        raise self._error(response, body, dispatch_id)

    def _error(
        self, response: requests.Response, body: dict[str, Any], dispatch_id: int | None
    ) -> DeliveryError:
        status = response.status_code
        error = _dict(body.get("error"))
        code = error.get("error_code") if isinstance(error.get("error_code"), int) else None
        # request_params is left out: it repeats the post's text.
        text = str(error.get("error_msg") or response.reason or "")
        reason = f"[{code}] {text}" if code is not None else f"HTTP {status} {text}".rstrip()
        where: dict[str, Any] = {
            "alias": self.alias,
            "dispatch_id": dispatch_id,
            "response": code if code is not None else status,
        }
        if code in RATE_LIMIT_CODES or status == 429:
            wait = PER_SECOND_WAIT if code == 6 else _header_seconds(response, "Retry-After")
            return VKontakteTemporaryError(
                f"VK API rate limit reached: {reason}", retry_after=wait, **where
            )
        if code in TEMPORARY_CODES or status >= 500:
            return VKontakteTemporaryError(f"VK API temporary error: {reason}", **where)
        if code is None and response.ok:
            # A success status without a post id may mean the post exists: retrying could
            # repeat it.
            return VKontaktePermanentError(
                f"VK API answered HTTP {status} without a post_id; not retried", **where
            )
        return VKontaktePermanentError(f"VK API refused the post: {reason}", **where)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _guid(dispatch_id: int, text: str) -> str:
    """The same for every attempt at one dispatch; the text keeps two deployments whose
    dispatch ids collide from posting to one wall under one guid."""
    return hashlib.sha256(f"sitemessage:{dispatch_id}:{text}".encode()).hexdigest()[:32]


def _header_seconds(response: requests.Response, name: str) -> float | None:
    try:
        return max(0.0, float(response.headers[name]))
    except (KeyError, ValueError):
        return None
