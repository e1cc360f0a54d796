"""Local HTTP servers that follow the X API v2 (``POST /2/tweets``) and the Telegram Bot API
(``sendMessage``): their routes, authentication, status codes, response and error bodies and
rate-limit headers. Each runs on 127.0.0.1 in a thread, keeps connections alive, records what it
accepted, counts TCP connections, and can be told to fail given addresses.

The ``twitter_api`` and ``telegram_api`` fixtures are loaded by tests/conftest.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import random
import re
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from email.message import Message as Headers
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import pytest

Reply = tuple[int, dict[str, str], Any]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, handler: type[BaseHTTPRequestHandler], api: FakeAPI) -> None:
        self.api = api
        self.open_sockets: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.api.lock:
            self.api.connections += 1
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # not a client that went away
            super().handle_error(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.api.lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a client can reuse its connection
    disable_nagle_algorithm = True  # else every response waits ~40 ms for a delayed ACK
    server: _Server

    def do_POST(self) -> None:
        self._reply()

    def do_GET(self) -> None:
        self._reply()

    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        api = self.server.api
        path = self.path
        if api.delay:
            time.sleep(api.delay)
        with api.lock:
            api.requests += 1
            if path.startswith(("http://", "https://")):
                api.proxied += 1
                path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        try:
            status, headers, payload = api.respond(self.command, path, self.headers, body)
        except Exception:
            api.errors.append(traceback.format_exc())
            status, headers, payload = 500, {}, {"error": "fake server bug, see api.errors"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeAPI:
    """A JSON API on 127.0.0.1. Subclasses implement ``respond()``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: TCP connections accepted, and HTTP requests answered.
        self.connections = 0
        self.requests = 0
        #: Tracebacks of exceptions in respond(): a test should see none.
        self.errors: list[str] = []
        #: Address -> HTTP status (429 or 5xx) returned to every delivery to it.
        self.temporary: dict[str, int] = {}
        #: Seconds to wait before answering (to exercise client timeouts).
        self.delay = 0.0
        #: Requests that came in proxy form (an absolute URL as target): it serves them too.
        self.proxied = 0
        self._server = _Server(_Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        #: "https" once use_tls() was called.
        self.scheme = "http"

    def use_tls(self, context: ssl.SSLContext) -> None:
        """Serves HTTPS with ``context`` (a server context with its certificate); call it
        before start(). The handshake runs in the connection's handler thread, so a client
        that refuses the certificate reaches neither the API nor its counters but
        ``connections``."""
        self._server.socket = context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.scheme = "https"

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        with self.lock:
            sockets = list(self._server.open_sockets)
        for sock in sockets:  # ends the handler threads waiting on kept-alive connections
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(5)

    def fail_temporarily(self, address: str, status: int = 429) -> None:
        with self.lock:
            self.temporary[address] = status

    def recover(self, address: str) -> None:
        with self.lock:
            self.temporary.pop(address, None)

    def delivered(self) -> list[str]:
        raise NotImplementedError

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.delivered()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.delivered()) >= count

    def respond(self, method: str, path: str, headers: Headers, body: bytes) -> Reply:
        raise NotImplementedError


# --- X API v2 ----------------------------------------------------------------------------


def _pct(value: str) -> str:
    """RFC 5849 section 3.6 percent-encoding."""
    return quote(value, safe="~-._")


def oauth1_signature(
    method: str, url: str, params: list[tuple[str, str]], consumer_secret: str, token_secret: str
) -> str:
    """HMAC-SHA1 signature of a request (RFC 5849 section 3.4), computed independently of the
    client's OAuth library."""
    pairs = sorted((_pct(k), _pct(v)) for k, v in params)
    normalized = "&".join(f"{k}={v}" for k, v in pairs)
    base = "&".join([method.upper(), _pct(url), _pct(normalized)])
    key = f"{_pct(consumer_secret)}&{_pct(token_secret)}"
    return base64.b64encode(hmac.new(key.encode(), base.encode(), hashlib.sha1).digest()).decode()


def parse_oauth_header(value: str) -> dict[str, str] | None:
    if not value.startswith("OAuth "):
        return None
    params = {}
    for part in value[len("OAuth ") :].split(","):
        key, sep, quoted = part.strip().partition("=")
        if not sep or len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
            return None
        params[unquote(key)] = unquote(quoted[1:-1])
    return params


_OAUTH_REQUIRED = {
    "oauth_consumer_key",
    "oauth_token",
    "oauth_signature_method",
    "oauth_timestamp",
    "oauth_nonce",
    "oauth_version",
    "oauth_signature",
}
_PROBLEM = "about:blank"


def _problem(status: int, title: str, detail: str) -> dict[str, Any]:
    return {"title": title, "type": _PROBLEM, "status": status, "detail": detail}


class FakeX(FakeAPI):
    """``POST /2/tweets`` with OAuth 1.0a user context, as api.twitter.com serves it."""

    api_key = "fake-consumer-key-0123456789"
    api_secret = "fake-consumer-secret-abcdefghijklmnopqrstuvwxyz0123"
    access_token = "1234567890-fakeAccessTokenABCDEFGHIJKLMNOP"
    access_token_secret = "fake-access-token-secret-ABCDEFGHIJKLMNOPQRSTU"

    def __init__(self) -> None:
        super().__init__()
        #: Accepted posts: {"id", "text", "mention"} (mention: the leading @name, or "").
        self.tweets: list[dict[str, str]] = []
        #: Mentioned names whose posts are refused with 403 Forbidden.
        self.forbidden: set[str] = set()
        #: Requests refused with 401, and why.
        self.auth_failures: list[str] = []
        #: Seconds from a 429 to its x-rate-limit-reset, and the reset of the last 429.
        self.reset_in = 60
        self.last_reset = 0
        #: Posts per 15-minute window reported in the x-rate-limit-* headers.
        self.window_limit = 10_000
        self._window_reset = int(time.time()) + 900
        self._nonces: set[str] = set()
        self._ids = itertools.count(random.randrange(10**18, 9 * 10**18, 10**6))

    def options(self) -> dict[str, Any]:
        """Options of a TwitterMessenger that this server accepts."""
        return {
            "api_key": self.api_key,
            "api_secret": self.api_secret,
            "access_token": self.access_token,
            "access_token_secret": self.access_token_secret,
            "base_url": self.url,
        }

    def delivered(self) -> list[str]:
        with self.lock:
            return [tweet["mention"] for tweet in self.tweets]

    def fail_permanently(self, address: str) -> None:
        with self.lock:
            self.forbidden.add(address.lstrip("@"))

    def respond(self, method: str, path: str, headers: Headers, body: bytes) -> Reply:
        url = urlsplit(path)
        if (method, url.path) != ("POST", "/2/tweets"):
            return 404, {}, {"errors": [{"message": "Sorry, that page does not exist", "code": 34}]}
        problem = self._check_oauth(method, url.path, url.query, headers)
        if problem:
            with self.lock:
                self.auth_failures.append(problem)
            return 401, {}, _problem(401, "Unauthorized", "Unauthorized")
        try:
            payload = json.loads(body) if "json" in headers.get("Content-Type", "") else None
        except ValueError:
            payload = None
        text = payload.get("text") if isinstance(payload, dict) else None
        if not isinstance(text, str) or not text:
            return 400, {}, self._invalid("text", "The `text` field is required.")
        match = re.match(r"@(\w+)", text)
        mention = match[1] if match else ""
        with self.lock:
            if mention in self.temporary:
                return self._temporary(self.temporary[mention])
            if mention in self.forbidden:
                detail = "You are not permitted to perform this action."
                return 403, {}, _problem(403, "Forbidden", detail)
            if any(tweet["text"] == text for tweet in self.tweets):
                detail = "You are not allowed to create a Tweet with duplicate content."
                return 403, {}, _problem(403, "Forbidden", detail)
            tweet_id = str(next(self._ids))
            self.tweets.append({"id": tweet_id, "text": text, "mention": mention})
            remaining = max(0, self.window_limit - len(self.tweets))
        data = {"id": tweet_id, "text": text, "edit_history_tweet_ids": [tweet_id]}
        return 201, self._limit_headers(remaining, self._window_reset), {"data": data}

    def _check_oauth(self, method: str, path: str, query: str, headers: Headers) -> str:
        """Why the Authorization header is not a valid OAuth 1.0a signature by our client,
        or '' when it is."""
        oauth = parse_oauth_header(headers.get("Authorization", ""))
        if oauth is None:
            return "no well-formed OAuth Authorization header"
        missing = _OAUTH_REQUIRED - set(oauth)
        if missing:
            return f"missing {sorted(missing)}"
        if oauth["oauth_signature_method"] != "HMAC-SHA1" or oauth["oauth_version"] != "1.0":
            return "unsupported signature method or version"
        if oauth["oauth_consumer_key"] != self.api_key or oauth["oauth_token"] != self.access_token:
            return "unknown consumer key or token"
        if not oauth["oauth_timestamp"].isdigit() or (
            abs(int(oauth["oauth_timestamp"]) - time.time()) > 300
        ):
            return "timestamp out of range"
        params = [(k, v) for k, v in oauth.items() if k not in ("oauth_signature", "realm")]
        params += parse_qsl(query, keep_blank_values=True)
        base_url = f"{self.scheme}://{headers.get('Host', '').lower()}{path}"
        expected = oauth1_signature(
            method, base_url, params, self.api_secret, self.access_token_secret
        )
        if not hmac.compare_digest(expected, oauth["oauth_signature"]):
            return "signature mismatch"
        with self.lock:
            if oauth["oauth_nonce"] in self._nonces:
                return "nonce reused"
            self._nonces.add(oauth["oauth_nonce"])
        return ""

    def _temporary(self, status: int) -> Reply:
        if status == 429:
            reset = self.last_reset = int(time.time()) + self.reset_in
            detail = "Too Many Requests"
            return 429, self._limit_headers(0, reset), _problem(429, detail, detail)
        return status, {}, _problem(status, "Service Unavailable", "Service Unavailable")

    def _limit_headers(self, remaining: int, reset: int) -> dict[str, str]:
        return {
            "x-rate-limit-limit": str(self.window_limit),
            "x-rate-limit-remaining": str(remaining),
            "x-rate-limit-reset": str(reset),
        }

    @staticmethod
    def _invalid(parameter: str, message: str) -> dict[str, Any]:
        return {
            "errors": [{"parameters": {parameter: []}, "message": message}],
            "title": "Invalid Request",
            "detail": "One or more parameters to your request was invalid.",
            "type": "https://api.twitter.com/2/problems/invalid-request",
        }


# --- Telegram Bot API --------------------------------------------------------------------


def _tg_error(code: int, description: str, **extra: Any) -> Reply:
    return code, {}, {"ok": False, "error_code": code, "description": description, **extra}


class FakeTelegram(FakeAPI):
    """``/bot<token>/sendMessage``, ``getUpdates`` (and ``getMe``), as api.telegram.org serves
    them. ``receive()`` plays a user writing to the bot."""

    token = "7012345678:AAFakeTokenForTestsOnly_abcdefghijkl"
    bot = {
        "id": 7012345678,
        "is_bot": True,
        "first_name": "Sitemessage test bot",
        "username": "sitemessage_test_bot",
    }

    def __init__(self) -> None:
        super().__init__()
        #: Accepted messages: {"chat_id", "text", "message_id"}.
        self.messages: list[dict[str, Any]] = []
        #: Chats that do not exist (400 chat not found) and users who blocked the bot (403).
        self.missing: set[str] = set()
        self.blocked: set[str] = set()
        #: The retry_after of a 429.
        self.retry_after = 30
        self._next_id: dict[str, int] = {}
        #: Updates not confirmed yet (getUpdates), oldest first.
        self.updates: list[dict[str, Any]] = []
        #: A webhook is set: getUpdates answers 409 Conflict.
        self.webhook = False
        self._next_update = 512_000_001

    def options(self) -> dict[str, Any]:
        """Options of a TelegramMessenger that this server accepts."""
        return {"auth_token": self.token, "base_url": self.url, "timeout": 5}

    def delivered(self) -> list[str]:
        with self.lock:
            return [message["chat_id"] for message in self.messages]

    def fail_permanently(self, address: str, blocked: bool = False) -> None:
        with self.lock:
            (self.blocked if blocked else self.missing).add(address)

    def respond(self, method: str, path: str, headers: Headers, body: bytes) -> Reply:
        url = urlsplit(path)
        match = re.fullmatch(r"/bot([^/]+)/(\w+)", url.path)
        if not match:
            return _tg_error(404, "Not Found")
        if unquote(match[1]) != self.token:
            return _tg_error(401, "Unauthorized")
        params: dict[str, Any] = dict(parse_qsl(url.query))
        content_type = headers.get("Content-Type", "")
        try:
            if "json" in content_type and body:
                params.update(json.loads(body))
            elif "x-www-form-urlencoded" in content_type:
                params.update(parse_qsl(body.decode()))
        except ValueError:
            return _tg_error(400, "Bad Request: can't parse JSON object")
        api_method = match[2].lower()  # Bot API method names are case-insensitive
        if api_method == "getme":
            return 200, {}, {"ok": True, "result": self.bot}
        if api_method == "getupdates":
            return self._get_updates(params)
        if api_method != "sendmessage":
            return _tg_error(404, "Not Found")
        return self._send_message(params)

    def _send_message(self, params: dict[str, Any]) -> Reply:
        chat = str(params.get("chat_id", "")).strip()
        text = params.get("text")
        if not chat:
            return _tg_error(400, "Bad Request: chat_id is empty")
        if not isinstance(text, str) or not text.strip():
            return _tg_error(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            return _tg_error(400, "Bad Request: message is too long")
        if not re.fullmatch(r"-?\d+|@\w+", chat):
            return _tg_error(400, "Bad Request: chat not found")
        with self.lock:
            if chat in self.temporary:
                status = self.temporary[chat]
                if status == 429:
                    return _tg_error(
                        429,
                        f"Too Many Requests: retry after {self.retry_after}",
                        parameters={"retry_after": self.retry_after},
                    )
                return _tg_error(status, "Bad Gateway")
            if chat in self.missing:
                return _tg_error(400, "Bad Request: chat not found")
            if chat in self.blocked:
                return _tg_error(403, "Forbidden: bot was blocked by the user")
            message_id = self._next_id.get(chat, 1)
            self._next_id[chat] = message_id + 1
            self.messages.append({"chat_id": chat, "text": text, "message_id": message_id})
        result: dict[str, Any] = {
            "message_id": message_id,
            "chat": self._chat(chat),
            "date": int(time.time()),
            "text": text,
        }
        if result["chat"]["type"] == "channel":
            result["sender_chat"] = result["chat"]
        else:
            result["from"] = self.bot
        return 200, {}, {"ok": True, "result": result}

    def receive(
        self, chat_id: int, text: str, user_id: int | None = None, kind: str = "message"
    ) -> int:
        """User ``user_id`` (default: the private chat's) writes ``text`` in chat ``chat_id``:
        queues the update (``kind``: "message", or "edited_message", "channel_post", ...) that
        getUpdates returns; returns its update_id."""
        sender = {"id": user_id or chat_id, "is_bot": False, "first_name": "Test"}
        message: dict[str, Any] = {
            "chat": self._chat(str(chat_id)),
            "from": sender,
            "date": int(time.time()),
            "text": text,
        }
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [{"offset": 0, "length": len(command), "type": "bot_command"}]
        with self.lock:
            message_id = self._next_id.get(str(chat_id), 1)
            self._next_id[str(chat_id)] = message_id + 1
            update_id, self._next_update = self._next_update, self._next_update + 1
            self.updates.append(
                {"update_id": update_id, kind: {"message_id": message_id, **message}}
            )
        return update_id

    def _get_updates(self, params: dict[str, Any]) -> Reply:
        """An offset confirms (forgets) the updates below it; a negative one keeps only that
        many of the last; ``timeout`` long-polls while there is none."""
        if self.webhook:
            return _tg_error(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        try:
            offset = int(params.get("offset") or 0)
            limit = min(max(int(params.get("limit") or 100), 1), 100)
            deadline = time.monotonic() + float(params.get("timeout") or 0)
        except (TypeError, ValueError):
            return _tg_error(400, "Bad Request: wrong parameter value")
        while True:
            with self.lock:
                if offset < 0:
                    self.updates = self.updates[offset:]
                elif offset:
                    self.updates = [u for u in self.updates if u["update_id"] >= offset]
                batch = self.updates[:limit]
            if batch or time.monotonic() >= deadline:
                return 200, {}, {"ok": True, "result": batch}
            time.sleep(0.05)

    @staticmethod
    def _chat(chat: str) -> dict[str, Any]:
        if chat.startswith("@"):
            chat_id = -1_000_000_000_000 - (
                int(hashlib.sha1(chat.encode()).hexdigest(), 16) % 10**9
            )
            return {"id": chat_id, "title": chat[1:], "username": chat[1:], "type": "channel"}
        if chat.startswith("-"):
            return {"id": int(chat), "title": "Test group", "type": "supergroup"}
        return {"id": int(chat), "first_name": "Test", "type": "private"}


@pytest.fixture
def twitter_api() -> Iterator[FakeX]:
    api = FakeX()
    api.start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def telegram_api() -> Iterator[FakeTelegram]:
    api = FakeTelegram()
    api.start()
    try:
        yield api
    finally:
        api.stop()


# --- Facebook Graph API ------------------------------------------------------------------


def _fb_error(
    status: int,
    code: int,
    message: str,
    subcode: int | None = None,
    transient: bool | None = None,
    kind: str = "OAuthException",
    headers: dict[str, str] | None = None,
) -> Reply:
    error: dict[str, Any] = {"message": message, "type": kind, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    if transient is not None:
        error["is_transient"] = transient
    error["fbtrace_id"] = base64.b64encode(random.randbytes(8)).decode().rstrip("=")
    return status, headers or {}, {"error": error}


def _cursor(index: int) -> str:
    return base64.b64encode(str(index).encode()).decode().rstrip("=")


class FakeFacebook(FakeAPI):
    """The Graph API as graph.facebook.com serves it: ``POST /{version}/{page-id|me}/feed``
    with a Page access token, and for ``get_page_access_token()`` ``GET
    /{version}/oauth/access_token`` (``fb_exchange_token``) and ``GET /{version}/me/accounts``
    (cursor-paged). Errors are ``{"error": {"message", "type", "code", "error_subcode",
    "fbtrace_id"}}``; a throttled Page gets code 32 and an ``X-Business-Use-Case-Usage`` header
    with ``estimated_time_to_regain_access`` in minutes."""

    app_id = "1234567890123456"
    app_secret = "fake0app0secret0abcdef0123456789"
    user_token = "EAAFakeShortLivedUserToken0123456789abcdefghij"
    #: Page id -> (name, Page access token); the user manages them all, and one more Page
    #: whose token Facebook does not return (the user has no task on it).
    pages = {
        "104000000000001": ("Sitemessage News", "EAAFakePageTokenNews0123456789abcdefghijkl"),
        "104000000000002": ("Sitemessage Jobs", "EAAFakePageTokenJobs0123456789abcdefghijkl"),
        "104000000000003": ("Sitemessage Blog", "EAAFakePageTokenBlog0123456789abcdefghijkl"),
    }
    no_task_page = ("104000000000009", "Someone Else's Page")

    def __init__(self) -> None:
        super().__init__()
        #: Accepted posts: {"page", "message", "link", "id"}.
        self.posts: list[dict[str, str]] = []
        #: Pages whose token was invalidated (190/460), and the request paths seen.
        self.revoked: set[str] = set()
        self.paths: list[str] = []
        #: Minutes a throttled Page waits, reported in X-Business-Use-Case-Usage.
        self.regain_minutes = 5
        #: Most /me/accounts entries per page of results.
        self.max_accounts_per_page = 25
        self.long_lived_token: str | None = None
        self._ids = itertools.count(random.randrange(10**15, 9 * 10**15))

    def options(self) -> dict[str, Any]:
        """Options of a FacebookMessenger with a token for each Page of this server."""
        return {
            "page_access_token": {page: token for page, (_, token) in self.pages.items()},
            "base_url": self.url,
            "timeout": 5,
        }

    def delivered(self) -> list[str]:
        with self.lock:
            return [post["page"] for post in self.posts]

    def fail_permanently(self, page_id: str) -> None:
        with self.lock:
            self.revoked.add(page_id)

    def respond(self, method: str, path: str, headers: Headers, body: bytes) -> Reply:
        url = urlsplit(path)
        with self.lock:
            self.paths.append(url.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if "x-www-form-urlencoded" in headers.get("Content-Type", ""):
            params.update(parse_qsl(body.decode(), keep_blank_values=True))
        scheme, _, credential = headers.get("Authorization", "").partition(" ")
        if scheme in ("Bearer", "OAuth") and credential:
            params.setdefault("access_token", credential)
        match = re.fullmatch(r"(?:/v\d+\.\d+)?/([^/]+)(?:/(\w+))?/?", url.path)
        node, edge = (match[1], match[2]) if match else ("", None)
        if (method, node, edge) == ("GET", "oauth", "access_token"):
            return self._exchange(params)
        if (method, node, edge) == ("GET", "me", "accounts"):
            return self._accounts(params)
        if (method, edge) == ("POST", "feed"):
            return self._feed(node, params)
        return _fb_error(
            400,
            100,
            f"Unsupported {method.lower()} request. Object with ID '{node}' does not exist, "
            "cannot be loaded due to missing permissions, or does not support this operation.",
            subcode=33,
            kind="GraphMethodException",
        )

    def _page_of(self, token: str) -> str | None:
        return next((page for page, (_, t) in self.pages.items() if t == token), None)

    def _feed(self, node: str, params: dict[str, str]) -> Reply:
        token = params.get("access_token", "")
        if not token:
            return _fb_error(
                400, 2500, "An active access token must be used to query information about "
                "the current user."
            )  # fmt: skip
        page = self._page_of(token)
        if page is None:
            return _fb_error(400, 190, f"Malformed access token {token}")
        if page in self.revoked:
            return _fb_error(
                400, 190, "Error validating access token: The session has been invalidated "
                "because the user changed their password or Facebook has changed the session "
                "for security reasons.", subcode=460,
            )  # fmt: skip
        target = page if node == "me" else node
        if target not in self.pages:
            return _fb_error(
                400, 100, f"Unsupported post request. Object with ID '{node}' does not exist, "
                "cannot be loaded due to missing permissions, or does not support this "
                "operation.", subcode=33, kind="GraphMethodException",
            )  # fmt: skip
        if target != page:
            return _fb_error(
                403, 200, "(#200) If posting to a page, requires both pages_read_engagement "
                "and pages_manage_posts as an admin with sufficient administrative permission",
            )  # fmt: skip
        message, link = params.get("message", ""), params.get("link", "")
        if not message.strip() and not link:
            return _fb_error(400, 100, "(#100) Missing message or attachment")
        with self.lock:
            if target in self.temporary:
                return self._temporary(target, self.temporary[target])
            mine = [post for post in self.posts if post["page"] == target]
            if mine and (mine[-1]["message"], mine[-1]["link"]) == (message, link):
                return _fb_error(400, 506, "(#506) Duplicate status message")
            post_id = f"{target}_{next(self._ids)}"
            self.posts.append({"page": target, "message": message, "link": link, "id": post_id})
        return 200, {}, {"id": post_id}

    def _temporary(self, page: str, status: int) -> Reply:
        if status == 429:  # Facebook throttles with code 32 and HTTP 400, not 429
            usage = {
                page: [
                    {
                        "type": "pages",
                        "call_count": 100,
                        "total_cputime": 12,
                        "total_time": 15,
                        "estimated_time_to_regain_access": self.regain_minutes,
                    }
                ]
            }
            return _fb_error(
                400,
                32,
                "(#32) Page request limit reached",
                transient=True,
                headers={"X-Business-Use-Case-Usage": json.dumps(usage)},
            )
        return _fb_error(status, 2, "Service temporarily unavailable", transient=True)

    def _exchange(self, params: dict[str, str]) -> Reply:
        if params.get("grant_type") != "fb_exchange_token":
            return _fb_error(400, 100, "(#100) Invalid grant_type")
        if params.get("client_id") != self.app_id:
            return _fb_error(400, 101, "Error validating application. Invalid application ID.")
        if params.get("client_secret") != self.app_secret:
            return _fb_error(400, 1, "Error validating client secret.")
        if params.get("fb_exchange_token") != self.user_token:
            return _fb_error(400, 190, "Invalid OAuth access token - Cannot parse access token")
        with self.lock:
            self.long_lived_token = f"EAAFakeLongLived{random.randrange(10**20, 10**21)}"
        body = {
            "access_token": self.long_lived_token,
            "token_type": "bearer",
            "expires_in": 5183944,
        }
        return 200, {}, body

    def _accounts(self, params: dict[str, str]) -> Reply:
        token = params.get("access_token")
        if not token or token not in (self.long_lived_token, self.user_token):
            return _fb_error(400, 190, "Invalid OAuth access token - Cannot parse access token")
        entries: list[dict[str, Any]] = [
            {
                "access_token": page_token,
                "category": "Software",
                "category_list": [{"id": "2211", "name": "Software"}],
                "name": name,
                "id": page,
                "tasks": ["ANALYZE", "ADVERTISE", "MODERATE", "CREATE_CONTENT", "MANAGE"],
            }
            for page, (name, page_token) in self.pages.items()
        ]
        entries.insert(1, {"name": self.no_task_page[1], "id": self.no_task_page[0]})
        fields = [f for f in params.get("fields", "").split(",") if f]
        if fields:
            entries = [{k: v for k, v in e.items() if k in fields or k == "id"} for e in entries]
        try:
            limit = min(int(params.get("limit", 25)), self.max_accounts_per_page)
            start = int(base64.b64decode(params["after"] + "==")) + 1 if "after" in params else 0
        except ValueError:
            return _fb_error(400, 100, "(#100) Invalid cursor or limit")
        chunk = entries[start : start + limit]
        paging: dict[str, Any] = {"cursors": {"before": _cursor(start)}}
        if chunk:
            paging["cursors"]["after"] = _cursor(start + len(chunk) - 1)
        if start + limit < len(entries):
            query = urlencode({**params, "after": paging["cursors"]["after"]})
            paging["next"] = f"{self.url}/v24.0/me/accounts?{query}"
        return 200, {}, {"data": chunk, "paging": paging}


# --- VK API ------------------------------------------------------------------------------


class FakeVK(FakeAPI):
    """The VK API as api.vk.com serves ``wall.post`` (``POST /method/wall.post``, parameters in
    the query or the form body): every answer is HTTP 200, errors are ``{"error":
    {"error_code", "error_msg", "request_params"}}``; and ``GET /authorize`` as oauth.vk.com
    serves the implicit flow to a user who is logged in and allows the application."""

    app_id = "51234567"
    user_id = 714000001
    token = "vk1.a.FakeUserAccessTokenForTests_0123456789abcdefghijklmnopqrstuvwxyz"
    #: Communities the user administers: id -> name.
    groups = {212000001: "Sitemessage News", 212000002: "Sitemessage Jobs"}
    #: VK error codes and texts of the temporary failures fail_temporarily() can set.
    messages = {
        6: "Too many requests per second",
        9: "Flood control",
        10: "Internal server error",
        29: "Rate limit reached",
    }

    def __init__(self) -> None:
        super().__init__()
        #: Accepted posts: {"owner_id", "post_id", "message", "attachments", "from_group", "v",
        #: "guid"}.
        self.posts: list[dict[str, Any]] = []
        #: Walls that refuse posts (214), and access tokens with their scopes.
        self.closed: set[str] = set()
        self.tokens: dict[str, set[str]] = {self.token: {"wall", "offline"}}
        self._next_id: dict[int, int] = {}

    def options(self) -> dict[str, Any]:
        """Options of a VKontakteMessenger that this server accepts."""
        return {"access_token": self.token, "base_url": self.url, "timeout": 5}

    def delivered(self) -> list[str]:
        with self.lock:
            return [str(post["owner_id"]) for post in self.posts]

    def fail_temporarily(self, address: str, status: int = 6) -> None:
        """``status``: a VK error code (answered with HTTP 200), 429 (code 6), or an HTTP 5xx."""
        super().fail_temporarily(address, 6 if status == 429 else status)

    def fail_permanently(self, address: str) -> None:
        with self.lock:
            self.closed.add(address)

    def respond(self, method: str, path: str, headers: Headers, body: bytes) -> Reply:
        url = urlsplit(path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if "x-www-form-urlencoded" in headers.get("Content-Type", ""):
            params.update(parse_qsl(body.decode(), keep_blank_values=True))
        if (method, url.path) == ("GET", "/authorize"):
            return self._authorize(params)
        match = re.fullmatch(r"/method/([\w.]+)", url.path)
        if not match:
            return 404, {}, {}
        api_method = match[1]

        def error(code: int, message: str) -> Reply:
            echoed = [{"key": "method", "value": api_method}, {"key": "oauth", "value": "1"}]
            echoed += [{"key": k, "value": v} for k, v in params.items() if k != "access_token"]
            return 200, {}, {"error": {"error_code": code, "error_msg": message,
                                       "request_params": echoed}}  # fmt: skip

        token = params.get("access_token", "")
        scheme, _, credential = headers.get("Authorization", "").partition(" ")
        token = token or (credential if scheme == "Bearer" else "")
        if not token:
            return error(5, "User authorization failed: no access_token passed.")
        if token not in self.tokens:
            return error(5, "User authorization failed: invalid access_token (4).")
        if not params.get("v"):
            return error(8, "Invalid request: v (version) is required")
        if api_method != "wall.post":
            return error(3, "Unknown method passed")
        if "wall" not in self.tokens[token]:
            return error(15, "Access denied: no access to call this method")
        try:
            owner = int(params.get("owner_id") or self.user_id)
        except ValueError:
            return error(100, "One of the parameters specified was missing or invalid: "
                              "owner_id not integer")  # fmt: skip
        message, attachments = params.get("message", ""), params.get("attachments", "")
        if not message.strip() and not attachments:
            return error(100, "One of the parameters specified was missing or invalid: "
                              "message is empty or invalid")  # fmt: skip
        address = str(owner)
        with self.lock:
            if address in self.temporary:
                code = self.temporary[address]
                if code >= 500:
                    return code, {}, {}
                return error(code, self.messages.get(code, "Unknown error occurred"))
            allowed = owner == self.user_id or -owner in self.groups
            if address in self.closed or not allowed:
                return error(214, "Access to adding post denied: access to the wall is closed")
            guid = params.get("guid")
            for post in self.posts:
                if guid and (post["owner_id"], post["guid"]) == (owner, guid):
                    return 200, {}, {"response": {"post_id": post["post_id"]}}
            post_id = self._next_id.get(owner, 1)
            self._next_id[owner] = post_id + 1
            self.posts.append(
                {
                    "owner_id": owner,
                    "post_id": post_id,
                    "message": message,
                    "attachments": attachments,
                    "from_group": params.get("from_group", "0"),
                    "v": params["v"],
                    "guid": guid,
                }
            )
        return 200, {}, {"response": {"post_id": post_id}}

    def _authorize(self, params: dict[str, str]) -> Reply:
        def refuse(error: str, description: str) -> Reply:
            return 400, {}, {"error": error, "error_description": description}

        if params.get("client_id") != self.app_id:
            return (
                401,
                {},
                {"error": "invalid_client", "error_description": "client_id is incorrect"},
            )
        if params.get("response_type") != "token":
            return refuse("unsupported_response_type", "response_type is incorrect")
        if params.get("redirect_uri") != "https://oauth.vk.com/blank.html":
            return refuse(
                "invalid_request", "redirect_uri is incorrect, check application domain in the "
                "settings page",
            )  # fmt: skip
        if not params.get("v"):
            return refuse("invalid_request", "v is required")
        scope = {s for s in params.get("scope", "").split(",") if s}
        token = f"vk1.a.FakeGranted{random.randrange(10**20, 10**21)}"
        with self.lock:
            self.tokens[token] = scope
        fragment = urlencode(
            {
                "access_token": token,
                "expires_in": 0 if "offline" in scope else 86400,
                "user_id": self.user_id,
            }
        )
        return 302, {"Location": f"{params['redirect_uri']}#{fragment}"}, {}


@pytest.fixture
def facebook_api() -> Iterator[FakeFacebook]:
    api = FakeFacebook()
    api.start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def vk_api() -> Iterator[FakeVK]:
    api = FakeVK()
    api.start()
    try:
        yield api
    finally:
        api.stop()
