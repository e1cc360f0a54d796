"""TelegramMessenger: Bot API ``sendMessage`` over one keep-alive ``requests.Session`` per
worker process, and ``getUpdates`` to find the chats that started the bot.

The bot token is part of every Bot API URL (``/bot<token>/sendMessage``), so it would leak
into anything that prints a URL: requests' exception texts and urllib3's debug and retry log
lines. Exceptions raised here are scrubbed and carry no link to the original; a logging filter
scrubs urllib3's records.
"""

from __future__ import annotations

import logging
import re
from typing import Any

try:
    import requests
except ModuleNotFoundError as exc:  # an optional dependency: name the extra that installs it
    raise ModuleNotFoundError(
        f"TelegramMessenger needs {exc.name}: pip install 'sitemessage-celery[telegram]'",
        name=exc.name,
    ) from exc

from .exceptions import (
    InvalidAddressError,
    TelegramMessengerException,
    TelegramPermanentError,
    TelegramTemporaryError,
)
from .http import HTTPMessenger

DEFAULT_BASE_URL = "https://api.telegram.org"

#: A chat id (negative for groups and channels) or a public ``@channelname``.
_ADDRESS = re.compile(r"-?\d{1,20}|@[A-Za-z][A-Za-z0-9_]{3,31}")
#: A bot token as Telegram issues them, in a Bot API URL path.
_TOKEN_IN_PATH = re.compile(r"/bot\d+:[^/\s'\"]+")
#: The text of a /start command: bare, addressed to the bot in a group (``/start@name_bot``),
#: or with a deep-link payload (``/start <payload>``).
_START = re.compile(r"/start(@\w+)?(\s.*)?", re.DOTALL)
#: Tokens of the messengers of this process, scrubbed whatever their shape.
_tokens: set[str] = set()


def scrub(text: str) -> str:
    """``text`` without any bot token."""
    for token in tuple(_tokens):
        text = text.replace(token, "<token>")
    return _TOKEN_IN_PATH.sub("/bot<token>", text)


class _ScrubTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "/bot" in message or any(token in message for token in tuple(_tokens)):
            record.msg, record.args = scrub(message), ()
        return True


for _name in ("urllib3.connectionpool", "urllib3.util.retry", "urllib3.connection"):
    logging.getLogger(_name).addFilter(_ScrubTokens())


class TelegramMessenger(HTTPMessenger):
    """Sends Telegram messages as a bot. Addresses are chat ids (``123456``, ``-1001234567``)
    or public channel names (``@mychannel``). ``proxy`` (``http://...``; ``socks5://...``
    needs PySocks) carries every request; TLS certificates are verified."""

    alias = "telegram"
    title = "Telegram"
    address_attr = "telegram"

    def __init__(
        self,
        auth_token: str,
        proxy: str | None = None,
        timeout: float = 10,
        base_url: str = DEFAULT_BASE_URL,
    ) -> None:
        self._token = auth_token
        if auth_token:
            _tokens.add(auth_token)
        self.proxy = proxy
        self.timeout = float(timeout)
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:
        return f"<TelegramMessenger {self.base_url}>"  # never the token

    @classmethod
    def validate_address(cls, address: str) -> None:
        super().validate_address(address)
        if not _ADDRESS.fullmatch(address):
            raise InvalidAddressError(
                f"messenger {cls.get_alias()!r}: {address!r} is neither a chat id nor "
                "an @channelname"
            )

    def deliver(self, chat: str, text: str, dispatch_id: int | None) -> str:
        """Sends one message; returns its message_id. Raises a TelegramTemporaryError or
        TelegramPermanentError whose text holds no token."""
        chat_id: int | str = int(chat) if chat.lstrip("-").isdigit() else chat
        # Telegram drops surrounding whitespace (templates end with a newline) anyway.
        payload = {"chat_id": chat_id, "text": text.strip()}
        response = self._call("sendMessage", payload, dispatch_id)
        return self._result(response, dispatch_id)

    def get_updates(self, offset: int | None = None) -> list[dict[str, Any]]:
        """Returns the updates (messages to the bot, and other events) the Bot API holds for
        this bot, oldest first, without waiting for new ones (``getUpdates``). Telegram keeps an
        update for 24 hours, or until a call with an ``offset`` above its ``update_id``
        confirms it and those before it.

        Raises TelegramTemporaryError when the API cannot be reached, and
        TelegramPermanentError when it refuses (a bad token; a webhook is set: 409 Conflict)."""
        with self.before_after_send_handling():
            response = self._call("getUpdates", {} if offset is None else {"offset": offset}, None)
        body = _body(response)
        updates = body.get("result")
        if body.get("ok") is True and isinstance(updates, list):
            return updates
        raise self._error(response, body, None, "getUpdates")

    def get_chat_ids(self) -> list[int]:
        """Returns the ids of the chats whose users sent the bot ``/start`` (see
        get_updates()), each once, in the order they first did: the addresses to send them
        messages at. Raises as get_updates() does."""
        chat_ids: dict[int, None] = {}
        for update in self.get_updates():
            message = update.get("message") or {}
            if _START.fullmatch(str(message.get("text", ""))):
                chat_ids.setdefault(message["chat"]["id"], None)
        return list(chat_ids)

    def _call(
        self, method: str, payload: dict[str, Any], dispatch_id: int | None
    ) -> requests.Response:
        """POSTs a Bot API method; raises TelegramTemporaryError (without the token) when the
        API cannot be reached."""
        session = self._ensure_session()
        try:
            return session.post(
                f"{self.base_url}/bot{self._token}/{method}", json=payload, timeout=self.timeout
            )
        except requests.RequestException as exc:
            failure = f"{type(exc).__name__}: {scrub(str(exc))}"
        # Raised outside the except block, so that neither __cause__ nor __context__ holds the
        # original exception, whose text and request carry the URL with the token.
        raise TelegramTemporaryError(
            f"cannot reach the Telegram Bot API at {self.base_url}: {failure}",
            alias=self.alias,
            dispatch_id=dispatch_id,
        )

    def _result(self, response: requests.Response, dispatch_id: int | None) -> str:
        body = _body(response)
        result = body.get("result")
        if body.get("ok") is True and isinstance(result, dict) and "message_id" in result:
            return str(result["message_id"])
        raise self._error(response, body, dispatch_id, "the message")

    def _error(
        self,
        response: requests.Response,
        body: dict[str, Any],
        dispatch_id: int | None,
        what: str,
    ) -> TelegramMessengerException:
        status = response.status_code
        error_code = body.get("error_code")
        code = error_code if isinstance(error_code, int) else status
        description = scrub(str(body.get("description") or response.reason or ""))
        reason = f"{code} {description}".rstrip()
        where: dict[str, Any] = {"alias": self.alias, "dispatch_id": dispatch_id, "response": code}
        if 429 in (code, status):
            parameters = body.get("parameters")
            wait = parameters.get("retry_after") if isinstance(parameters, dict) else None
            if wait is None:
                wait = _header_seconds(response, "Retry-After")
            return TelegramTemporaryError(
                f"Telegram Bot API rate limit reached: {reason}",
                retry_after=float(wait) if wait is not None else None,
                **where,
            )
        if max(code, status) >= 500:
            return TelegramTemporaryError(f"Telegram Bot API server error: {reason}", **where)
        if response.ok:
            # A success status without a message may mean it was sent: retrying could repeat it.
            reason = f"HTTP {status} without the expected result"
        return TelegramPermanentError(f"Telegram Bot API refused {what}: {reason}", **where)


def _body(response: requests.Response) -> dict[str, Any]:
    """The JSON object a Bot API response holds ({} for anything else)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _header_seconds(response: requests.Response, name: str) -> float | None:
    try:
        return float(response.headers[name])
    except (KeyError, ValueError):
        return None
