"""FacebookMessenger: posts on Facebook Pages through the Graph API (``POST /{page-id}/feed``
with a Page access token) over one keep-alive ``requests.Session`` per worker process.

Page tokens travel in request bodies, never in URLs. ``get_page_access_token()`` calls the two
Graph API endpoints that take their secrets in the query string, as Facebook documents them;
those values are scrubbed from exception texts and from urllib3's log records, and every known
token is scrubbed from the error texts the API returns ("Malformed access token <token>").
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

try:
    import requests
except ModuleNotFoundError as exc:  # an optional dependency: name the extra that installs it
    raise ModuleNotFoundError(
        f"FacebookMessenger needs {exc.name}: pip install 'sitemessage-celery[facebook]'",
        name=exc.name,
    ) from exc

from .exceptions import (
    DeliveryError,
    FacebookPermanentError,
    FacebookTemporaryError,
    InvalidAddressError,
    MessengerConfigurationError,
)
from .http import HTTPMessenger, Proxy, proxies

DEFAULT_BASE_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v24.0"
#: Graph API throttling: application (4), user (17), Page (32), custom rate limit (613).
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613})
#: Codes Facebook documents as "wait and retry": unknown (1), service (2), application limit
#: (341), temporarily blocked (368), and the rate limits.
TEMPORARY_CODES = RATE_LIMIT_CODES | {1, 2, 341, 368}

#: An http(s) proxy URL for both schemes, a requests ``proxies`` dict, or a callable returning
#: either (called when the session opens, once per worker process).

_PAGE_ID = re.compile(r"\d{1,30}")
_LINK = re.compile(r"https?://\S+")
_SECRET_IN_QUERY = re.compile(r"\b(access_token|client_secret|fb_exchange_token)=[^&\s'\"]+")
#: Tokens and secrets this process has used, scrubbed whatever their shape.
_secrets: set[str] = set()


def remember(*secrets: str) -> None:
    """Adds secrets to those scrubbed; short ones are not (they would mangle ordinary words),
    real tokens and app secrets are far longer."""
    _secrets.update(s for s in secrets if isinstance(s, str) and len(s) >= 12)


def scrub(text: str) -> str:
    """``text`` without any token or app secret."""
    for secret in tuple(_secrets):
        text = text.replace(secret, "<secret>")
    return _SECRET_IN_QUERY.sub(r"\1=<secret>", text)


class _ScrubSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if scrub(message) != message:
            record.msg, record.args = scrub(message), ()
        return True


for _name in ("urllib3.connectionpool", "urllib3.util.retry", "urllib3.connection"):
    logging.getLogger(_name).addFilter(_ScrubSecrets())


class FacebookMessenger(HTTPMessenger):
    """Publishes posts on Facebook Pages as the Page.

    ``page_access_token`` is a Page access token (``get_page_access_token()`` makes ones that
    do not expire): the address ``''`` posts to that token's Page, as django-sitemessage did,
    and so does that Page's id. It may instead map Page ids to their tokens, to post to several
    Pages: the address is then the Page id (``''`` only when one Page is configured). A text
    that is a single http(s) URL is posted as a link, any other as a message.
    """

    alias = "fb"
    title = "Facebook"

    def __init__(
        self,
        page_access_token: str | Mapping[str, str],
        proxy: Proxy = None,
        timeout: float = 10,
        base_url: str = DEFAULT_BASE_URL,
        api_version: str = DEFAULT_API_VERSION,
    ) -> None:
        self._tokens = _checked_tokens(page_access_token)
        remember(*self._tokens.values())
        if not callable(proxy):
            proxies(proxy, "FacebookMessenger")  # a bad value fails here, not in a worker
        self.proxy = proxy
        self.timeout = float(timeout)
        self.base_url = base_url.rstrip("/")
        self.api_version = api_version.strip("/")

    def __repr__(self) -> str:
        return f"<FacebookMessenger {self.base_url}/{self.api_version}>"  # never a token

    @classmethod
    def validate_address(cls, address: str) -> None:
        if address == "":
            return  # the Page of the page access token
        super().validate_address(address)
        if not _PAGE_ID.fullmatch(address):
            raise InvalidAddressError(
                f"messenger {cls.get_alias()!r}: {address!r} is not a Facebook Page id "
                "(digits), nor '' for the Page of the page access token"
            )

    def get_page_access_token(
        self, app_id: str, app_secret: str, user_token: str
    ) -> dict[str, str]:
        """Exchanges a (short-lived) user access token for a long-lived one and returns the
        access tokens of every Page that user manages, indexed by Page name (a name that repeats
        keeps its last Page). Tokens of Pages got from a long-lived user token do not expire.

        Raises FacebookTemporaryError when the API cannot be reached or asks to retry, and
        FacebookPermanentError when it refuses (a wrong app secret, an expired user token)."""
        remember(app_secret, user_token)
        exchange = self._get(
            "oauth/access_token",
            {
                "grant_type": "fb_exchange_token",
                "client_id": app_id,
                "client_secret": app_secret,
                "fb_exchange_token": user_token,
            },
        )
        long_lived = exchange.get("access_token")
        if not isinstance(long_lived, str) or not long_lived:
            raise FacebookPermanentError(
                "Graph API exchanged the user token but returned no access_token", alias=self.alias
            )
        remember(long_lived)
        tokens: dict[str, str] = {}
        params = {"access_token": long_lived, "fields": "name,access_token", "limit": "100"}
        seen: set[str] = set()
        while True:
            body = self._get("me/accounts", params)
            for page in body.get("data") or []:
                if isinstance(page, dict) and page.get("access_token"):
                    remember(str(page["access_token"]))
                    tokens[str(page.get("name", page.get("id", "")))] = str(page["access_token"])
            paging = _dict(body.get("paging"))
            cursors = _dict(paging.get("cursors"))
            after = cursors.get("after")
            if not paging.get("next") or not isinstance(after, str) or after in seen:
                return tokens
            seen.add(after)
            params = {**params, "after": after}

    def _target(self, address: str, dispatch_id: int | None) -> tuple[str, str]:
        """The Graph API node to post to and the token to post with."""
        if "" in self._tokens:
            return address or "me", self._tokens[""]
        if not address and len(self._tokens) == 1:
            [(page_id, token)] = self._tokens.items()
            return page_id, token
        if address in self._tokens:
            return address, self._tokens[address]
        raise FacebookPermanentError(
            f"no page access token for Page {address!r}; configured Pages: "
            f"{', '.join(sorted(self._tokens))}",
            alias=self.alias,
            dispatch_id=dispatch_id,
        )

    def deliver(self, address: str, text: str, dispatch_id: int | None) -> str:
        """Publishes one post; returns its id. Raises a FacebookTemporaryError or
        FacebookPermanentError whose text holds no token."""
        node, token = self._target(address, dispatch_id)
        # Facebook drops surrounding whitespace (templates end with a newline) anyway.
        text = text.strip()
        field = "link" if _LINK.fullmatch(text) else "message"
        response = self._request(
            "POST",
            f"{node}/feed",
            dispatch_id,
            data={field: text, "access_token": token},
        )
        body = _json(response)
        post_id = body.get("id")
        if response.ok and isinstance(post_id, str | int) and str(post_id):
            return str(post_id)
        raise self._error(response, body, dispatch_id, "the post")

    def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        response = self._request("GET", path, None, params=params)
        body = _json(response)
        if response.ok and "error" not in body:
            return body
        raise self._error(response, body, None, "the request")

    def _request(
        self, method: str, path: str, dispatch_id: int | None, **kwargs: Any
    ) -> requests.Response:
        session = self._ensure_session()
        url = f"{self.base_url}/{self.api_version}/{path}"
        try:
            return session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            failure = f"{type(exc).__name__}: {scrub(str(exc))}"
        # Raised outside the except block, so that neither __cause__ nor __context__ holds the
        # original exception, whose request carries the token.
        raise FacebookTemporaryError(
            f"cannot reach the Graph API at {self.base_url}: {failure}",
            alias=self.alias,
            dispatch_id=dispatch_id,
        )

    def _error(
        self, response: requests.Response, body: dict[str, Any], dispatch_id: int | None, what: str
    ) -> DeliveryError:
        status = response.status_code
        error = _dict(body.get("error"))
        code = error.get("code") if isinstance(error.get("code"), int) else None
        subcode = error.get("error_subcode")
        details = [f"HTTP {status}"]
        if code is not None:
            details.insert(0, f"code {code}" + (f"/{subcode}" if subcode else ""))
        if error.get("fbtrace_id"):
            details.append(f"fbtrace_id {error['fbtrace_id']}")
        text = scrub(str(error.get("message") or response.reason or ""))
        reason = f"{text} ({', '.join(details)})".lstrip()
        where: dict[str, Any] = {
            "alias": self.alias,
            "dispatch_id": dispatch_id,
            "response": code if code is not None else status,
        }
        if code in RATE_LIMIT_CODES or status == 429:
            return FacebookTemporaryError(
                f"Graph API rate limit reached: {reason}",
                retry_after=regain_after(response),
                **where,
            )
        if code in TEMPORARY_CODES or error.get("is_transient") is True or status >= 500:
            return FacebookTemporaryError(f"Graph API temporary error: {reason}", **where)
        if response.ok and code is None:
            # A success status without an id may mean the post exists: retrying could repeat it.
            return FacebookPermanentError(
                f"Graph API accepted {what} but returned no id (HTTP {status}); not retried",
                **where,
            )
        return FacebookPermanentError(f"Graph API refused {what}: {reason}", **where)


def regain_after(response: requests.Response) -> float | None:
    """Seconds until a throttled Page or app may call again: the longest
    ``estimated_time_to_regain_access`` (minutes) of the ``X-Business-Use-Case-Usage`` header,
    else ``Retry-After`` (seconds); None when neither says."""
    try:
        usage = _dict(json.loads(response.headers.get("X-Business-Use-Case-Usage") or "{}"))
    except ValueError:
        usage = {}
    minutes = [
        _dict(entry).get("estimated_time_to_regain_access")
        for entries in usage.values()
        for entry in (entries if isinstance(entries, list) else [])
    ]
    longest = max((m for m in minutes if isinstance(m, int | float) and m > 0), default=0)
    if longest:
        return float(longest) * 60
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _checked_tokens(tokens: str | Mapping[str, str]) -> dict[str, str]:
    """``{'': token}`` for one token, the mapping for ``{page id: token}``; raises
    MessengerConfigurationError for anything else (naming no token)."""
    pairs: Any = {"": tokens} if isinstance(tokens, str) else tokens
    if (
        not isinstance(pairs, Mapping)
        or not pairs
        or not all(
            isinstance(page, str)
            and (_PAGE_ID.fullmatch(page) or (page == "" and isinstance(tokens, str)))
            and isinstance(token, str)
            and token.strip()
            for page, token in pairs.items()
        )
    ):
        raise MessengerConfigurationError(
            "FacebookMessenger: page_access_token must be a non-empty Page access token, or a "
            f"dict of Page ids (digits) to non-empty tokens; got a {type(tokens).__name__} "
            f"with Pages {sorted(map(str, pairs)) if isinstance(pairs, Mapping) else []}"
        )
    return dict(pairs)


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return _dict(body)
