"""XMPPSleekMessenger: XMPP chat messages over one slixmpp session per worker process.

slixmpp is asyncio, our hooks are synchronous: each messenger runs an event loop in a private
daemon thread and submits coroutines to it, every wait bounded by ``TIMEOUT``. A message is
marked sent only once the server acknowledged it with XEP-0198 stream management; a message the
server bounced is failed (or retried, for an error of type ``wait``), and one still unacknowledged
when the session dropped or the wait ran out is retried, so nothing unacknowledged is ever
reported as sent. A dropped session is replaced by a fresh login on the next batch.

A server without stream management is refused, unless ``require_stream_management=False``: then
each batch ends with a ping, and a message sent before the server answered it (and not bounced
by then) is marked sent with the provider id ``UNCONFIRMED + stanza id``: the answer shows that
the server read the message, not that it handled it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

try:
    from slixmpp import JID, ClientXMPP
    from slixmpp.jid import InvalidJID
    from slixmpp.stanza import Message as Stanza
except ModuleNotFoundError as exc:  # an optional dependency: name the extra that installs it
    raise ModuleNotFoundError(
        f"XMPPSleekMessenger needs {exc.name}: pip install 'sitemessage-celery[xmpp]'",
        name=exc.name,
    ) from exc

from .base import MessengerBase, tls_context
from .exceptions import (
    DeliveryError,
    InvalidAddressError,
    MessengerConfigurationError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)

if TYPE_CHECKING:
    from dispatcher.messages import MessageBase
    from dispatcher.models import Dispatch, Message

#: Seconds a login, the acknowledgement of one batch, or a logout may take.
TIMEOUT = 10.0
#: Prefix of the provider id of a dispatch sent without stream management (not acknowledged).
UNCONFIRMED = "unconfirmed:"

# slixmpp logs every stanza at DEBUG: message bodies and, with SASL PLAIN, the password.
logging.getLogger("slixmpp.xmlstream.xmlstream").setLevel(logging.INFO)
logger = logging.getLogger(__name__)
T = TypeVar("T")
#: Characters an XML 1.0 document cannot contain: the server would end the whole stream.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


class XMPPSleekMessenger(MessengerBase):
    """Sends XMPP chat messages as ``from_jid``. ``use_tls``: STARTTLS (required, certificate
    verified); ``use_ssl``: direct TLS; neither: no encryption, and SCRAM so that the password
    still does not cross the wire."""

    alias = "xmppsleek"
    title = "XMPP"
    address_attr = "jabber"

    def __init__(
        self,
        from_jid: str,
        password: str,
        host: str = "localhost",
        port: int = 5222,
        use_tls: bool = True,
        use_ssl: bool = False,
        require_stream_management: bool = True,
    ) -> None:
        if not isinstance(require_stream_management, bool):
            raise MessengerConfigurationError(
                f"messenger {self.alias!r}: require_stream_management must be True or False, "
                f"got {require_stream_management!r}"
            )
        #: Refuse a server without XEP-0198 (off: deliver to it without acknowledgement).
        self.require_stream_management = require_stream_management
        try:
            JID(from_jid)
        except InvalidJID as exc:
            raise MessengerConfigurationError(
                f"messenger {self.alias!r}: from_jid {from_jid!r} is not a valid JID ({exc})"
            ) from None
        self.from_jid, self._password = from_jid, password
        self.host, self.port, self.use_tls, self.use_ssl = host, int(port), use_tls, use_ssl
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._session: _Session | None = None
        self._ssl_context: ssl.SSLContext | None = None

    @classmethod
    def validate_address(cls, address: str) -> None:
        super().validate_address(address)
        try:
            jid = JID(address)
        except InvalidJID as exc:
            raise InvalidAddressError(
                f"messenger {cls.get_alias()!r}: {address!r} is not a valid JID ({exc})"
            ) from None
        if not jid.user:
            raise InvalidAddressError(
                f"messenger {cls.get_alias()!r}: {address!r} is not a user JID (user@domain)"
            )

    @property
    def xmpp(self) -> ClientXMPP | None:
        """The logged-in slixmpp client, or None while there is none (django-sitemessage's
        attribute, a sleekxmpp client there). It runs on this messenger's event loop thread:
        hand it coroutines with ``asyncio.run_coroutine_threadsafe(..., client.loop)``."""
        session = self._session
        if session is None or not session.alive or not self._owns_loop():
            return None
        return session.client

    def before_send(self) -> None:
        with self._lock:
            self._connect()

    def after_send(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            try:
                if session is not None and self._owns_loop():
                    self._run(session.close(), TIMEOUT + 1)
            except Exception as exc:
                logger.warning("XMPP logout of %s failed: %s", self.from_jid, exc)
            finally:
                self._stop_loop()

    def send(
        self,
        message_cls: type[MessageBase],
        message_model: Message,
        dispatch_models: list[Dispatch],
    ) -> None:
        ready: dict[str, Dispatch] = {}
        for dispatch in dispatch_models:
            if _NOT_XML.search(dispatch.message_cache):
                self.mark_failed(
                    dispatch,
                    PermanentDeliveryError(
                        "the message contains characters that XML cannot carry",
                        alias=self.alias,
                        dispatch_id=dispatch.pk,
                    ),
                )
            else:
                # Stable per dispatch: a receiver can drop the duplicate of a redelivered batch.
                ready[f"sitemessage.{message_model.pk}.{dispatch.pk}"] = dispatch
        if not ready:
            return
        items = [(d.pk, stanza_id, d.address, d.message_cache) for stanza_id, d in ready.items()]
        with self._lock:
            session = self._connect()
            errors = self._run(session.deliver(items), TIMEOUT + 2)
        prefix = "" if session.acknowledges else UNCONFIRMED
        for stanza_id, dispatch in ready.items():
            if stanza_id in errors:
                self.mark_exception(dispatch, errors[stanza_id])
            else:
                self.mark_sent(dispatch, provider_id=prefix + stanza_id)

    def _test_message(self, to: str, text: str) -> str:
        self.validate_address(to)
        with self._lock:
            session = self._connect()
            stanza_id = session.client.new_id()
            errors = self._run(session.deliver([(None, stanza_id, to, text)]), TIMEOUT + 2)
        if stanza_id in errors:
            raise errors[stanza_id]
        return stanza_id if session.acknowledges else UNCONFIRMED + stanza_id

    def _connect(self) -> _Session:
        """Returns the logged-in session, logging in when there is none or it dropped."""
        if not self._owns_loop():
            self._start_loop()
        if self._session is None or not self._session.alive:
            dead, self._session = self._session, None
            if dead is not None:
                self._run(dead.close(), TIMEOUT + 1)
            if self._ssl_context is None:  # here, so a bad CA file raises in the caller
                # Verifies certificate and host name against the system's CAs and those of
                # SITEMESSAGE_CA_FILE; loading it takes ~50 ms, so once.
                self._ssl_context = tls_context()
            self._session = self._run(self._login(), TIMEOUT + 1)
        return self._session

    async def _login(self) -> _Session:
        client = ClientXMPP(self.from_jid, self._password, ssl_context=self._ssl_context)
        # No resumption: a resumed stream would resend what we already reported as not sent.
        # One ack request per batch (deliver() sends it): asking every 5 stanzas, slixmpp's
        # default, costs two thirds of the throughput.
        client.register_plugin("xep_0198", {"allow_resume": False, "window": 1000})
        client.register_plugin("xep_0199")  # the end-of-batch ping without stream management
        client.enable_direct_tls = self.use_ssl
        client.enable_starttls = self.use_tls and not self.use_ssl
        client.enable_plaintext = not (self.use_tls or self.use_ssl)
        client.plugin["feature_mechanisms"].unencrypted_scram = client.enable_plaintext
        where = f"XMPP server {self.host}:{self.port}"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(error: Exception | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        def fail(describe: Callable[[Any], str]) -> Callable[[Any], None]:
            return lambda data: settle(TemporaryDeliveryError(describe(data), alias=self.alias))

        handlers: dict[str, Callable[[Any], None]] = {
            "stream_negotiated": lambda _: settle(None),
            "connection_failed": fail(lambda e: f"cannot connect to {where}: {e}"),
            "failed_auth": fail(
                lambda s: f"{where} refused the login of {self.from_jid!r} ({s['condition']})"
            ),
            "no_auth": fail(
                lambda _: (
                    f"{where} offers no login mechanism {self.from_jid!r} may use on this "
                    "connection (use_tls and use_ssl require an encrypted one)"
                )
            ),
            "ssl_invalid_chain": fail(lambda e: f"TLS certificate of {where} not trusted: {e}"),
            "disconnected": fail(lambda r: f"connection to {where} ended during login: {r}"),
        }
        for event, handler in handlers.items():
            client.add_event_handler(event, handler)
        client.connect(self.host, self.port)
        try:
            async with asyncio.timeout(TIMEOUT):
                await done
            acknowledges = "stream_management" in client.features
            if not acknowledges and self.require_stream_management:
                raise TemporaryDeliveryError(
                    f"{where} did not enable stream management (XEP-0198): without it, delivery "
                    "cannot be confirmed (require_stream_management=False delivers anyway)",
                    alias=self.alias,
                )
        except BaseException as exc:
            _discard(client)
            if isinstance(exc, TimeoutError):
                raise TemporaryDeliveryError(
                    f"login of {self.from_jid!r} to {where} took longer than {TIMEOUT}s",
                    alias=self.alias,
                ) from None
            raise
        if not acknowledges:
            logger.warning(
                "%s offers no stream management (XEP-0198): messenger %s delivers without "
                "acknowledgement (require_stream_management=False); provider ids start with %r",
                where,
                self.alias,
                UNCONFIRMED,
            )
        return _Session(client, self.alias, acknowledges)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TemporaryDeliveryError(
                f"XMPP loop did not answer within {timeout}s", alias=self.alias
            ) from None

    def _owns_loop(self) -> bool:
        # A loop thread does not survive fork(): a child process starts its own.
        return self._loop is not None and self._pid == os.getpid()

    def _start_loop(self) -> None:
        self._session = None  # a parent's session is not ours to use
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"xmpp-{self.from_jid}", daemon=True
        )
        self._thread.start()
        self._pid = os.getpid()

    def _stop_loop(self) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None or self._pid != os.getpid():
            return
        try:
            asyncio.run_coroutine_threadsafe(_cancel_tasks(), loop).result(TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(TIMEOUT)
            if not thread.is_alive():
                loop.close()


class _Session:
    """One logged-in client and what the server acknowledged or bounced; loop thread only.
    ``acknowledges``: with stream management; without it, ``acked`` holds what was sent before
    the server answered the end-of-batch ping."""

    def __init__(self, client: ClientXMPP, alias: str | None, acknowledges: bool) -> None:
        self.client, self.alias, self.acknowledges = client, alias, acknowledges
        self.alive = True
        self.acked: set[str] = set()
        self.bounced: dict[str, Stanza] = {}
        self.changed = asyncio.Event()
        client.add_event_handler("stanza_acked", self._on_acked)
        client.add_event_handler("message_error", self._on_bounce)
        client.add_event_handler("disconnected", self._on_disconnected)

    async def deliver(
        self, items: Sequence[tuple[int | None, str, str, str]]
    ) -> dict[str, DeliveryError]:
        """Sends (dispatch id, stanza id, to, body) items and waits for the server's
        acknowledgement (without stream management: its answer to a ping); returns the error
        of every item that was not delivered."""
        if self.alive:
            for _, stanza_id, to, body in items:
                message = self.client.make_message(mto=to, mbody=body, mtype="chat")
                message["id"] = stanza_id
                message.send()
        wanted = {stanza_id for _, stanza_id, _, _ in items}
        try:
            async with asyncio.timeout(TIMEOUT):
                await self.client.waiting_queue.join()
                if self.alive and self.acknowledges:
                    self.client.plugin["xep_0198"].request_ack()
                elif self.alive and await self._ping():
                    self.acked |= wanted
                while self.alive and not wanted <= self.acked:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            logger.warning("XMPP server did not answer in %ss: logging in again", TIMEOUT)
            self.client.abort()
            self.alive = False
        errors: dict[str, DeliveryError] = {}
        unanswered = "acknowledge the message" if self.acknowledges else "answer the ping"
        for dispatch_id, stanza_id, _, _ in items:
            bounce = self.bounced.pop(stanza_id, None)
            if bounce is not None:
                errors[stanza_id] = _bounce_error(bounce, self.alias, dispatch_id)
            elif stanza_id not in self.acked:
                errors[stanza_id] = TemporaryDeliveryError(
                    f"the XMPP server did not {unanswered} before the session ended",
                    alias=self.alias,
                    dispatch_id=dispatch_id,
                )
        self.acked -= wanted
        self.bounced.clear()  # bounces of earlier batches came too late to matter
        return errors

    async def _ping(self) -> bool:
        """Pings the server; returns whether it answered before the session ended. An answer
        comes after the bounces of the messages sent before the ping, on the same stream."""
        ping = asyncio.ensure_future(self.client.plugin["xep_0199"].ping(timeout=TIMEOUT))
        ping.add_done_callback(lambda _: self.changed.set())
        try:
            while self.alive and not ping.done():
                self.changed.clear()
                await self.changed.wait()
        finally:
            ping.cancel()  # a no-op once it is done
        return self.alive and ping.done() and not ping.cancelled() and ping.exception() is None

    async def close(self) -> None:
        """Sends what is queued, ends the stream, and stops the client's tasks."""
        try:
            if self.alive:
                await self.client.disconnect(wait=TIMEOUT / 2)
        finally:
            _discard(self.client)

    def _on_acked(self, stanza: Any) -> None:
        if stanza["id"]:
            self.acked.add(stanza["id"])
            self.changed.set()

    def _on_bounce(self, stanza: Stanza) -> None:
        self.bounced[stanza["id"]] = stanza

    def _on_disconnected(self, _: Any) -> None:
        self.alive = False
        queue = self.client.waiting_queue
        while not queue.empty():  # stanzas of a dead stream: never sent, never acknowledged
            queue.get_nowait()
            queue.task_done()
        self.changed.set()


def _discard(client: ClientXMPP) -> None:
    """Closes a client for good; its send-queue task would otherwise wait forever."""
    client.cancel_connection_attempt()
    client.abort()
    task = getattr(client, "_run_out_filters", None)
    if task is not None:
        task.cancel()


async def _cancel_tasks() -> None:
    """Ends the clients' background tasks, so that the loop closes with nothing pending."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _bounce_error(stanza: Stanza, alias: str | None, dispatch_id: int | None) -> DeliveryError:
    error = stanza["error"]
    text = f"the XMPP server bounced the message: {error['type']} {error['condition']}"
    if error["text"]:
        text += f" ({error['text']})"
    cls = TemporaryDeliveryError if error["type"] == "wait" else PermanentDeliveryError
    return cls(text, alias=alias, dispatch_id=dispatch_id, response=error["condition"])
