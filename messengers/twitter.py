"""TwitterMessenger: posts on X (Twitter) with API v2 (``POST /2/tweets``, OAuth 1.0a user
context) through tweepy, over one keep-alive HTTP session per worker process."""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

try:
    import requests
    import tweepy
except ModuleNotFoundError as exc:  # an optional dependency: name the extra that installs it
    raise ModuleNotFoundError(
        f"TwitterMessenger needs {exc.name}: pip install 'sitemessage-celery[twitter]'",
        name=exc.name,
    ) from exc

from .base import MessengerBase, use_tls_context
from .exceptions import (
    DeliveryError,
    InvalidAddressError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)

if TYPE_CHECKING:
    from dispatcher.messages import MessageBase
    from dispatcher.models import Dispatch, Message

#: The API host tweepy.Client sends to; it is hardcoded there (tweepy 4.x).
TWEEPY_HOST = "https://api.twitter.com"
#: Longest post X accepts, in characters.
MAX_LENGTH = 280
#: Seconds an HTTP request may take (tweepy sets no timeout of its own).
DEFAULT_TIMEOUT = 10.0

_USERNAME = re.compile(r"@?[A-Za-z0-9_]{1,15}")

# tweepy and the OAuth libraries log every request body, the signed headers and the response
# at DEBUG level; message bodies and credentials stay out of logs.
for _name in ("tweepy.client", "requests_oauthlib.oauth1_auth", "oauthlib.oauth1.rfc5849"):
    logging.getLogger(_name).addFilter(lambda record: record.levelno > logging.DEBUG)


class _RoutedSession(requests.Session):
    """The session tweepy.Client sends through. tweepy hardcodes its API host, so requests to
    it are sent to ``base_url`` instead; the rewrite happens before requests prepares (and
    OAuth 1.0a signs) the request, so the signature covers the URL actually used. Every request
    gets a timeout."""

    def __init__(self, base_url: str, timeout: float) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> requests.Response:
        if isinstance(url, str) and url.startswith(TWEEPY_HOST + "/"):
            url = self.base_url + url[len(TWEEPY_HOST) :]
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, *args, **kwargs)


class TwitterMessenger(MessengerBase):
    """Posts on X. An empty address posts to the account's timeline; a user name (with or
    without ``@``) makes the post a mention: ``@name text``."""

    alias = "twitter"
    title = "X (Twitter)"
    address_attr = "twitter"

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        access_token: str,
        access_token_secret: str,
        base_url: str = TWEEPY_HOST,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._credentials = (api_key, api_secret, access_token, access_token_secret)
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self._client: tweepy.Client | None = None

    @classmethod
    def validate_address(cls, address: str) -> None:
        if address == "":
            return  # a post to the timeline, not a mention
        super().validate_address(address)
        if not _USERNAME.fullmatch(address):
            raise InvalidAddressError(
                f"messenger {cls.get_alias()!r}: {address!r} is not an X user name "
                "(1-15 letters, digits or underscores, optionally after '@')"
            )

    def before_send(self) -> None:
        self._ensure_client()

    def after_send(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.session.close()

    def send(
        self,
        message_cls: type[MessageBase],
        message_model: Message,
        dispatch_models: list[Dispatch],
    ) -> None:
        self.send_each(dispatch_models, lambda d: self._post(d.address, d.message_cache, d.pk))

    def _test_message(self, to: str, text: str) -> str:
        self.validate_address(to or "")
        return self._post(to or "", text, None)

    def _ensure_client(self) -> tweepy.Client:
        if self._client is None:
            api_key, api_secret, access_token, access_token_secret = self._credentials
            client = tweepy.Client(
                consumer_key=api_key,
                consumer_secret=api_secret,
                access_token=access_token,
                access_token_secret=access_token_secret,
                wait_on_rate_limit=False,  # a task never sleeps: the pipeline retries later
            )
            client.session = _RoutedSession(self.base_url, self.timeout)
            use_tls_context(client.session)
            self._client = client
        return self._client

    def _post(self, to: str, text: str, dispatch_id: int | None) -> str:
        """Posts one status; returns its id. Raises a Temporary- or PermanentDeliveryError."""
        status = build_status(to, text)
        length = len(unicodedata.normalize("NFC", status))
        if length > MAX_LENGTH:
            raise PermanentDeliveryError(
                f"the post is {length} characters long and X accepts at most {MAX_LENGTH}; "
                "it is not truncated",
                alias=self.alias,
                dispatch_id=dispatch_id,
            )
        client = self._ensure_client()
        try:
            response = client.create_tweet(text=status, user_auth=True)
        except tweepy.HTTPException as exc:
            raise self._http_error(exc, dispatch_id) from None
        except requests.JSONDecodeError:
            raise PermanentDeliveryError(
                "X API accepted the post but its answer is not JSON; not retried, since the "
                "post may exist",
                alias=self.alias,
                dispatch_id=dispatch_id,
            ) from None
        except requests.RequestException as exc:
            raise TemporaryDeliveryError(
                f"cannot reach the X API at {self.base_url}: {type(exc).__name__}: {exc}",
                alias=self.alias,
                dispatch_id=dispatch_id,
            ) from None
        data = response.data if isinstance(response, tweepy.Response) else None
        tweet_id = data.get("id") if isinstance(data, dict) else None
        if not tweet_id:
            raise PermanentDeliveryError(
                "X API accepted the post but returned no id; not retried, since the post may exist",
                alias=self.alias,
                dispatch_id=dispatch_id,
            )
        return str(tweet_id)

    def _http_error(self, exc: tweepy.HTTPException, dispatch_id: int | None) -> DeliveryError:
        response = exc.response
        status = int(response.status_code)
        reason = f"HTTP {status} {_api_detail(response)}".rstrip()
        if isinstance(exc, tweepy.TooManyRequests):
            wait = retry_after(response)
            when = f"; retry in {wait:.0f}s" if wait is not None else ""
            return TemporaryDeliveryError(
                f"X API rate limit reached: {reason}{when}",
                alias=self.alias,
                dispatch_id=dispatch_id,
                response=status,
                retry_after=wait,
            )
        if isinstance(exc, tweepy.TwitterServerError):
            return TemporaryDeliveryError(
                f"X API server error: {reason}",
                alias=self.alias,
                dispatch_id=dispatch_id,
                response=status,
            )
        return PermanentDeliveryError(
            f"X API refused the post: {reason}",
            alias=self.alias,
            dispatch_id=dispatch_id,
            response=status,
        )


def build_status(to: str, text: str) -> str:
    """The text to post: a mention (``@name text``) when there is an address. Surrounding
    whitespace (templates end with a newline) is dropped, as X would drop it."""
    name, text = (to or "").strip().lstrip("@"), text.strip()
    return f"@{name} {text}" if name else text


def _api_detail(response: Any) -> str:
    """``title: detail`` (and any ``errors[].message``) of an X API error body."""
    try:
        body = response.json()
    except ValueError:
        return str(getattr(response, "reason", "") or "")
    if not isinstance(body, dict):
        return ""
    parts = [body.get("title"), body.get("detail")]
    parts += [e.get("message") for e in body.get("errors") or [] if isinstance(e, dict)]
    unique = dict.fromkeys(str(p) for p in parts if p)
    return ": ".join(unique)


def retry_after(response: Any) -> float | None:
    """Seconds until the rate limit resets: ``x-rate-limit-reset`` (epoch seconds), else
    ``Retry-After`` (seconds or an HTTP date); None when neither says."""
    headers = response.headers
    reset = headers.get("x-rate-limit-reset")
    if reset:
        try:
            return max(0.0, float(reset) - time.time())
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return None
