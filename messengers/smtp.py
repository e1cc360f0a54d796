"""SMTPMessenger: e-mail over one SMTP connection kept open for the life of a worker process."""

from __future__ import annotations

import ipaddress
import re
import secrets
import smtplib
import ssl
import time
from collections.abc import Callable
from email.utils import formatdate, make_msgid, parseaddr
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import EmailMessage
from django.core.mail.utils import DNS_NAME
from django.core.validators import validate_email

from .base import MessengerBase, settle_outcomes, tls_context
from .exceptions import InvalidAddressError, PermanentDeliveryError, TemporaryDeliveryError

if TYPE_CHECKING:
    from dispatcher.messages import MessageBase
    from dispatcher.models import Dispatch, Message

#: Seconds a socket operation may take when neither the messenger nor EMAIL_TIMEOUT says.
DEFAULT_TIMEOUT = 10.0
#: A connection the server answered within this many seconds is used without a NOOP first:
#: servers close idle connections after minutes (RFC 5321 suggests 5), not seconds, and a NOOP
#: before every batch of a busy worker costs a round trip per one-recipient message.
FRESH_SECONDS = 5.0


class SMTPMessenger(MessengerBase):
    """Sends e-mail over SMTP. Every argument left as None falls back to Django's matching
    ``EMAIL_*`` setting (``DEFAULT_FROM_EMAIL`` for ``from_email``), read when connecting.
    ``debug=True`` has smtplib print the SMTP conversation to stderr (addresses included; the
    login exchange is left out, as it would show the password).

    A message type with a ``build_email(message_model, dispatch, defaults)`` classmethod (the
    EMAIL_BACKEND's ``email_django``) builds the whole e-mail itself; the messenger only sends
    it to the dispatch's address. A dispatch with a non-empty ``unsubscribe_url`` gets the
    RFC 8058 List-Unsubscribe headers."""

    alias = "smtp"
    title = "E-mail"
    address_attr = "email"

    @property
    def settles_outcomes(self) -> bool:  # type: ignore[override]
        # A subclass's code may query the database or send without settle_outcomes().
        return type(self) is SMTPMessenger

    def __init__(
        self,
        from_email: str | None = None,
        login: str | None = None,
        password: str | None = None,
        host: str | None = None,
        port: int | None = None,
        use_tls: bool | None = None,
        use_ssl: bool | None = None,
        debug: bool = False,
        timeout: float | None = None,
        allow_plaintext_login: bool = False,
    ) -> None:
        #: Print the SMTP conversation (smtplib's debug level 1) to stderr.
        self.debug = debug
        #: Send the login to a server without TLS that is not on loopback (off: refused).
        self.allow_plaintext_login = allow_plaintext_login
        self._options = {
            "from_email": from_email,
            "login": login,
            "password": password,
            "host": host,
            "port": port,
            "use_tls": use_tls,
            "use_ssl": use_ssl,
            "timeout": timeout,
        }
        self._conn: smtplib.SMTP | None = None
        #: When the server last answered on the open connection (time.monotonic()), and
        #: whether the next e-mail goes on it unchecked because of that (see _deliver).
        self._answered_at = float("-inf")
        self._on_trust = False
        self._templates = _Templates()

    def _opt(self, name: str) -> Any:
        value = self._options[name]
        if value is not None:
            return value
        return {
            "from_email": settings.DEFAULT_FROM_EMAIL,
            "login": settings.EMAIL_HOST_USER,
            "password": settings.EMAIL_HOST_PASSWORD,
            "host": settings.EMAIL_HOST,
            "port": settings.EMAIL_PORT,
            "use_tls": settings.EMAIL_USE_TLS,
            "use_ssl": settings.EMAIL_USE_SSL,
            "timeout": settings.EMAIL_TIMEOUT or DEFAULT_TIMEOUT,
        }[name]

    @classmethod
    def validate_address(cls, address: str) -> None:
        super().validate_address(address)
        try:
            validate_email(address)
        except ValidationError:
            raise InvalidAddressError(
                f"messenger 'smtp': {address!r} is not a valid e-mail address"
            ) from None

    @property
    def smtp(self) -> smtplib.SMTP | None:
        """The open SMTP connection (smtplib's), or None while there is none
        (django-sitemessage's attribute)."""
        return self._conn

    def before_send(self) -> None:
        self._ensure_connection()

    def after_send(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                conn.close()

    def send(
        self,
        message_cls: type[MessageBase],
        message_model: Message,
        dispatch_models: list[Dispatch],
    ) -> None:
        self._ensure_connection()
        shared = _SharedBody(self, message_cls, message_model)
        # A type's own build_email() may query the database: it runs with no write in flight.
        settle_first = getattr(message_cls, "build_email", None) is not None
        stream = _Stream(self)
        try:
            for dispatch in dispatch_models:
                if settle_first:
                    settle_outcomes()
                if self._conn is None:  # the connection died: reconnect for the next dispatch
                    self._ensure_connection()
                try:
                    prepared = shared.prepare(dispatch)
                    if prepared is None:
                        email = self._build(message_cls, message_model, dispatch)
                        encoded = self._encode(email, dispatch.address, dispatch.pk)
                        prepared = (_header(email, "Message-ID"), *encoded)
                    message_id, sender, envelope_to, data = prepared
                    if self._pipelines():
                        stream.add(dispatch, message_id, sender, envelope_to, data)
                        continue
                    self._transmit(sender, envelope_to, data, dispatch.pk)
                except (TemporaryDeliveryError, PermanentDeliveryError) as error:
                    self.mark_exception(dispatch, error)
                else:
                    self.mark_sent(dispatch, provider_id=message_id)
            stream.close()
        except BaseException:
            stream.abandon()
            raise

    def _pipelines(self) -> bool:
        """Whether the open connection offers PIPELINING (asking EHLO first if not done)."""
        assert self._conn is not None
        try:
            self._conn.ehlo_or_helo_if_needed()
        except (smtplib.SMTPException, OSError):
            return False  # _transmit() meets the same error and handles it
        return bool(self._conn.has_extn("pipelining"))

    def _test_message(self, to: str, text: str) -> str:
        email = EmailMessage("Test message from sitemessage", text, self._opt("from_email"), [to])
        email.extra_headers["Message-ID"] = make_msgid(domain=self._domain())
        self._ensure_connection()
        self._deliver(email, to, None)
        return email.extra_headers["Message-ID"]

    def _build(
        self, message_cls: type[MessageBase], message_model: Message, dispatch: Dispatch
    ) -> EmailMessage:
        message_id = self._message_id(message_model, dispatch)
        build_email = getattr(message_cls, "build_email", None)
        if build_email is not None:
            defaults = {"from_email": str(self._opt("from_email")), "message_id": message_id}
            email: EmailMessage = build_email(message_model, dispatch, defaults)
            _add_list_unsubscribe(email, getattr(dispatch, "unsubscribe_url", None))
            return email
        return self._compose(
            message_cls,
            message_model,
            dispatch.message_cache,
            dispatch.address,
            {"Message-ID": message_id},
            getattr(dispatch, "unsubscribe_url", None),
        )

    def _message_id(self, message_model: Message, dispatch: Dispatch) -> str:
        # Stable per dispatch: a receiver can drop the duplicate of a redelivered batch.
        return f"<sitemessage.{message_model.pk}.{dispatch.pk}@{self._domain()}>"

    def _compose(
        self,
        message_cls: type[MessageBase],
        message_model: Message,
        body: str,
        to: str,
        headers: dict[str, str],
        unsubscribe_url: Any,
    ) -> EmailMessage:
        context = message_model.context or {}
        email = EmailMessage(
            subject=str(context.get("subject") or ""),
            body=body,
            from_email=self._opt("from_email"),
            to=[to],
            headers=headers,
        )
        email.content_subtype = getattr(message_cls, "content_subtype", "plain")
        _add_list_unsubscribe(email, unsubscribe_url)
        return email

    def _domain(self) -> str:
        sender = str(self._opt("from_email"))
        return sender.rpartition("@")[2].strip(">") or str(DNS_NAME)

    def _deliver(self, email: EmailMessage, to: str, dispatch_id: int | None) -> None:
        """Sends one e-mail on the open connection (see _transmit)."""
        self._transmit(*self._encode(email, to, dispatch_id), dispatch_id)

    def _encode(
        self, email: EmailMessage, to: str, dispatch_id: int | None = None
    ) -> tuple[str, str, bytes]:
        """The envelope sender, the envelope recipient and the bytes of ``email`` to ``to``;
        raises PermanentDeliveryError for what cannot be encoded."""
        try:
            # The envelope sender is the bare address of From ("Shop <shop@example.com>").
            sender = ascii_address(parseaddr(email.from_email)[1] or email.from_email)
            return sender, ascii_address(to), email.message().as_bytes(linesep="\r\n")
        except ValueError as exc:  # UnicodeError included
            raise PermanentDeliveryError(
                f"cannot encode the e-mail to {to!r}: {exc}",
                alias=self.alias,
                dispatch_id=dispatch_id,
            ) from exc

    def _transmit(
        self, sender: str, envelope_to: str, data: bytes, dispatch_id: int | None
    ) -> None:
        """Sends one encoded e-mail on the open connection; raises a Temporary- or
        PermanentDeliveryError (closing the connection when it is no longer usable, resetting
        the session when it stopped inside a transaction, so the next e-mail starts clean)."""
        assert self._conn is not None
        on_trust, self._on_trust = self._on_trust, False
        try:
            _sendmail(self._conn, sender, envelope_to, data)
            self._answered_at = time.monotonic()
        except Exception as exc:
            error = self._failure(exc, envelope_to, dispatch_id)
            if on_trust and _lost(exc):  # reused without a NOOP, and it had died: again
                self._ensure_connection()
                return self._transmit(sender, envelope_to, data, dispatch_id)
            raise error from exc

    def _failure(self, exc: Exception, envelope_to: str, dispatch_id: int | None) -> Exception:
        """The Temporary- or PermanentDeliveryError for what sending one e-mail raised; closes
        the connection when it is no longer usable, resets the session when it stopped inside
        a transaction, so the next e-mail starts clean."""
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            code, reply = exc.recipients.get(envelope_to, (451, b"recipient refused"))
            if code == 421:  # smtplib closed the connection: the next e-mail opens a new one
                self._drop()
            return _smtp_error(code, reply, self.alias, dispatch_id)
        if isinstance(exc, smtplib.SMTPResponseException):
            if exc.smtp_code == 421:  # the server is closing the channel
                self._drop()
            return _smtp_error(exc.smtp_code, exc.smtp_error, self.alias, dispatch_id)
        if _lost(exc):
            self._drop()
            return TemporaryDeliveryError(
                f"SMTP connection lost: {exc!r}", alias=self.alias, dispatch_id=dispatch_id
            )
        self._reset()  # smtplib stopped mid-transaction (MAIL FROM already sent)
        return TemporaryDeliveryError(
            f"SMTP transaction failed: {exc!r}", alias=self.alias, dispatch_id=dispatch_id
        )

    def _reset(self) -> None:
        """Ends a half-done transaction (RSET); a connection that does not answer is dropped."""
        try:
            if self._conn is not None and self._conn.rset()[0] == 250:
                return
        except (smtplib.SMTPException, OSError):
            pass
        self._drop()

    def _ensure_connection(self) -> None:
        """Reuses the open connection if the server answered on it in the last FRESH_SECONDS
        or still answers NOOP, else reconnects."""
        if self._conn is not None:
            if time.monotonic() - self._answered_at < FRESH_SECONDS:
                self._on_trust = True
                return
            try:
                if self._conn.noop()[0] == 250:
                    self._answered_at = time.monotonic()
                    return
            except (smtplib.SMTPException, OSError):
                pass
            self._drop()
        self._conn = self._connect()
        self._answered_at = time.monotonic()

    def _connect(self) -> smtplib.SMTP:
        host, port, timeout = self._opt("host"), int(self._opt("port")), float(self._opt("timeout"))
        encrypted = self._opt("use_tls") or self._opt("use_ssl")
        if self._opt("login") and not encrypted and not self.allow_plaintext_login:
            if not _is_loopback(host):
                raise TemporaryDeliveryError(
                    f"refusing to send the login of {self._opt('login')!r} in clear to SMTP "
                    f"server {host}:{port}: set use_tls or use_ssl, or allow_plaintext_login=True",
                    alias=self.alias,
                )
        context = self._ssl_context()
        try:
            if self._opt("use_ssl"):
                conn: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
            else:
                conn = smtplib.SMTP(host, port, timeout=timeout)
        except (smtplib.SMTPException, OSError) as exc:
            raise TemporaryDeliveryError(
                f"cannot connect to SMTP server {host}:{port}: {exc!r}", alias=self.alias
            ) from exc
        try:
            conn.set_debuglevel(1 if self.debug else 0)
            if self._opt("use_tls") and not self._opt("use_ssl"):
                conn.starttls(context=context)
            if self._opt("login"):
                conn.set_debuglevel(0)  # the AUTH exchange shows the password (base64)
                conn.login(self._opt("login"), self._opt("password") or "")
                conn.set_debuglevel(1 if self.debug else 0)
        except smtplib.SMTPAuthenticationError as exc:
            conn.close()
            raise TemporaryDeliveryError(
                f"SMTP server {host}:{port} refused the login of {self._opt('login')!r}",
                alias=self.alias,
                response=exc.smtp_code,
            ) from exc
        except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
            conn.close()
            raise TemporaryDeliveryError(
                f"SMTP session setup with {host}:{port} failed: {exc!r}", alias=self.alias
            ) from exc
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        # Verifies the server's certificate and host name: the system's CAs and those of
        # SITEMESSAGE_CA_FILE.
        context = tls_context()
        if settings.EMAIL_SSL_CERTFILE:
            context.load_cert_chain(settings.EMAIL_SSL_CERTFILE, settings.EMAIL_SSL_KEYFILE)
        return context

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


#: Stand-ins in the one e-mail _SharedBody builds per body, replaced per recipient: short, so
#: their header lines are never folded, and random per process, so no body holds them.
_TOKEN = secrets.token_hex(8)
_TO = f"t{_TOKEN}@p.invalid"
_ID = f"<i{_TOKEN}@p.invalid>"
_DATE = f"d{_TOKEN}"
_UNSUBSCRIBE = f"://p.invalid/u{_TOKEN}"
#: What the fast path takes as it is: a header value with nothing to encode or quote, and no
#: character a header may be folded at but the one before it (the value then moves to a
#: continuation line, as _header_line() writes it).
_PLAIN = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@:\[\]()<>-]+")
#: Longest header line the e-mail package writes on one line (RFC 5322's recommended 78).
_MAX_LINE = 78


class _Stream:
    """The e-mails of one send() on a connection that offers PIPELINING, back to back: the
    content of one goes in the same write as the next one's MAIL, RCPT and DATA (RFC 2920 lets
    the content open a group), so an e-mail costs one round trip instead of two. A content goes
    only after settle_outcomes(): the SENT mark of the e-mail before it is stored first."""

    def __init__(self, messenger: SMTPMessenger) -> None:
        self.messenger = messenger
        #: The e-mail whose DATA is open and whose content has not gone yet.
        self.held: tuple[Dispatch, str, str, bytes] | None = None

    def add(
        self,
        dispatch: Dispatch,
        message_id: str,
        sender: str,
        to: str,
        data: bytes,
        again: bool = True,
    ) -> None:
        """Sends the held content, if any, with this e-mail's group, marks the held e-mail by
        its reply, and holds this one once the server opened DATA for it. This e-mail's
        content has not gone when the connection dies here: it is sent once more on a new
        connection."""
        messenger = self.messenger
        conn = messenger._conn
        assert conn is not None
        messenger._on_trust = False  # a dead connection is met below, and this e-mail resent
        held, self.held = self.held, None
        group = _group(conn, sender, to, data)
        try:
            if held is not None:
                settle_outcomes()
                conn.send(held[3] + group)
                self._answer(held)
            else:
                conn.send(group)
            if messenger._conn is None:  # it ended with the held e-mail's reply
                raise smtplib.SMTPServerDisconnected("closed after the previous e-mail")
            _open_data(conn, sender, to)
        except Exception as exc:
            if held is not None and not _marked(held[0]):
                self._lost(held, exc)  # the write failed: the held content may have gone
            error = messenger._failure(exc, to, dispatch.pk)
            if again and _lost(exc):
                self._again(dispatch, message_id, sender, to, data)
            else:
                messenger.mark_exception(dispatch, error)
            return
        messenger._answered_at = time.monotonic()
        self.held = (dispatch, message_id, to, _content(data))

    def close(self) -> None:
        """Sends the held content and marks its e-mail by the reply."""
        held, self.held = self.held, None
        if held is None:
            return
        assert self.messenger._conn is not None
        settle_outcomes()
        try:
            self.messenger._conn.send(held[3])
        except OSError as exc:
            self._lost(held, exc)
            return
        self._answer(held)

    def abandon(self) -> None:
        """An error out of send(): the held e-mail stays unmarked (the pipeline marks it with
        that error) and its open DATA ends with the connection."""
        if self.held is not None:
            self.held = None
            self.messenger._drop()

    def _answer(self, held: tuple[Dispatch, str, str, bytes]) -> None:
        """Reads the reply to a held content and marks its e-mail; a lost connection or a 421
        closes the connection."""
        messenger = self.messenger
        dispatch, message_id, to, _ = held
        try:
            assert messenger._conn is not None
            code, text = _reply(messenger._conn, smtplib.SMTPDataError)
        except Exception as exc:
            messenger.mark_exception(dispatch, messenger._failure(exc, to, dispatch.pk))
            return
        if code == 250:
            messenger._answered_at = time.monotonic()
            messenger.mark_sent(dispatch, provider_id=message_id)
        else:  # the transaction is over either way: the next group needs no RSET
            messenger.mark_exception(
                dispatch, _smtp_error(code, text, messenger.alias, dispatch.pk)
            )

    def _lost(self, held: tuple[Dispatch, str, str, bytes], exc: Exception) -> None:
        """Marks a held e-mail whose content may have gone on a connection that failed."""
        dispatch, _, to, _ = held
        self.messenger.mark_exception(dispatch, self.messenger._failure(exc, to, dispatch.pk))

    def _again(
        self, dispatch: Dispatch, message_id: str, sender: str, to: str, data: bytes
    ) -> None:
        """Sends an e-mail whose content has not gone on a new connection, once."""
        messenger = self.messenger
        try:
            messenger._ensure_connection()
            if not messenger._pipelines():
                messenger._transmit(sender, to, data, dispatch.pk)
                messenger.mark_sent(dispatch, provider_id=message_id)
                return
        except (TemporaryDeliveryError, PermanentDeliveryError) as error:
            messenger.mark_exception(dispatch, error)
            return
        self.add(dispatch, message_id, sender, to, data, again=False)


class _SharedBody:
    """The e-mails of one message, built from a template: one e-mail built and encoded with
    stand-ins for what differs per recipient (To, Message-ID, Date, List-Unsubscribe) and for
    the body, which are then replaced in its bytes. Building and encoding an e-mail (Django's
    message(), then as_bytes()) was a third of a worker's time per dispatch, and half of it for
    a one-recipient message. The templates are kept by the messenger per type, subject, sender
    and unsubscribe scheme (see _Templates), so a stream of one-recipient messages of one type
    builds its template once. The bytes are those the e-mail built for the recipient would
    have, folding of long header lines included (a test compares them); anything else (an
    address or a link that is not plain ASCII, a line the e-mail package would encode, a type
    that builds its own e-mail) is built the usual way."""

    def __init__(
        self, messenger: SMTPMessenger, message_cls: type[MessageBase], message_model: Message
    ) -> None:
        self.messenger, self.message_cls, self.message_model = messenger, message_cls, message_model
        self.usable = (
            getattr(message_cls, "build_email", None) is None
            and settings.DEFAULT_CHARSET == "utf-8"  # the body encoding _body_bytes() writes
        )
        #: What the template depends on besides the dispatch's scheme and body kind.
        subject = str((message_model.context or {}).get("subject") or "")
        self.key: tuple[Any, ...] = (message_cls, subject, str(messenger._opt("from_email")))
        if type(messenger)._compose is not SMTPMessenger._compose:
            self.key += (message_model.pk,)  # a subclass's e-mail may differ per message
        self.body: tuple[str, bytes | None] | None = None  # the last body and its bytes

    def prepare(self, dispatch: Dispatch) -> tuple[str, str, str, bytes] | None:
        """(Message-ID, envelope sender, envelope recipient, bytes) for the dispatch; None:
        build it the usual way."""
        if not self.usable:
            return None
        url = getattr(dispatch, "unsubscribe_url", None)
        url = url if isinstance(url, str) else ""  # as _add_list_unsubscribe() reads it
        message_id = self.messenger._message_id(self.message_model, dispatch)
        if not all(_PLAIN.fullmatch(value) for value in (dispatch.address, message_id, url or "-")):
            return None
        text = dispatch.message_cache or ""  # as Django's EmailMessage takes a body of None
        if self.body is None or self.body[0] != text:
            self.body = (text, _body_bytes(text))
        body = self.body[1]
        if body is None:
            return None
        scheme = url.partition("://")[0] if url else ""
        ascii_body = body.isascii()
        template = self.messenger._templates.get(
            (*self.key, scheme, ascii_body), lambda: self._template(scheme, ascii_body)
        )
        if template is None:
            return None
        sender, head, tail = template
        head = (
            head.replace(_header_line("To", _TO), _header_line("To", dispatch.address))
            .replace(_header_line("Message-ID", _ID), _header_line("Message-ID", message_id))
            .replace(_DATE.encode(), formatdate(localtime=settings.EMAIL_USE_LOCALTIME).encode())
        )
        if scheme:
            stand_in = f"<{scheme}{_UNSUBSCRIBE}>"
            head = head.replace(
                _header_line("List-Unsubscribe", stand_in),
                _header_line("List-Unsubscribe", f"<{url}>"),
            )
        return message_id, sender, dispatch.address, head + body + tail

    def _template(self, scheme: str, ascii_body: bool) -> tuple[str, bytes, bytes] | None:
        """(envelope sender, bytes before the body, bytes after it) of the e-mail with the
        stand-ins; None when it did not encode as expected."""
        stand_in = _BODY if ascii_body else _BODY_8BIT
        email = self.messenger._compose(
            self.message_cls,
            self.message_model,
            stand_in,
            _TO,
            {"Date": _DATE, "Message-ID": _ID},
            f"{scheme}{_UNSUBSCRIBE}" if scheme else None,
        )
        try:
            sender, _, data = self.messenger._encode(email, _TO)
        except PermanentDeliveryError:
            return None  # each built the usual way, to fail with its own error
        lines = [_header_line("To", _TO), _header_line("Message-ID", _ID), _DATE.encode()]
        if scheme:
            lines.append(_header_line("List-Unsubscribe", f"<{scheme}{_UNSUBSCRIBE}>"))
        body = stand_in.encode()
        if any(data.count(line) != 1 for line in [*lines, body]):
            return None  # encoded differently after all: not safe to replace
        head, _, tail = data.partition(body)
        if any(line not in head for line in lines):
            return None
        return sender, head, tail


class _Templates:
    """The templates of _SharedBody, kept for the life of the messenger: a bounded map (a
    worker sees few types and subjects; past the bound it starts over)."""

    LIMIT = 256

    def __init__(self) -> None:
        self.entries: dict[tuple[Any, ...], tuple[str, bytes, bytes] | None] = {}

    def get(
        self, key: tuple[Any, ...], build: Callable[[], tuple[str, bytes, bytes] | None]
    ) -> tuple[str, bytes, bytes] | None:
        if key not in self.entries:
            if len(self.entries) >= self.LIMIT:
                self.entries.clear()
            self.entries[key] = build()
        return self.entries[key]


def _body_bytes(text: str) -> bytes | None:
    """The bytes Django's e-mail gives a utf-8 body: its lines ended with CRLF, as UTF-8
    (Content-Transfer-Encoding 7bit or 8bit); None when it would be quoted-printable instead
    (a line over RFC 5322's 998 bytes, tested as Django's SafeMIMEText tests it)."""
    if any(len(line.encode(errors="surrogateescape")) > 998 for line in text.splitlines()):
        return None
    return _LINE_END.sub("\r\n", text).encode("utf-8", errors="surrogateescape")


_LINE_END = re.compile(r"\r\n|\r|\n")  # the e-mail package's line ends (NLCRE)
_BODY = f"b{_TOKEN}"
_BODY_8BIT = f"b{_TOKEN}\u00e9"  # not ASCII: the e-mail's Content-Transfer-Encoding is 8bit


def _sendmail(conn: smtplib.SMTP, sender: str, to: str, data: bytes) -> None:
    """smtplib's sendmail() for one recipient, with MAIL, RCPT and DATA sent as one group when
    the server offers PIPELINING (RFC 2920, as most servers do): two round trips per e-mail
    instead of four, which halves the time per e-mail on a server some milliseconds away.
    Raises what sendmail() raises for the same replies; after a refusal the session is reset,
    after a 421 the connection is closed."""
    conn.ehlo_or_helo_if_needed()
    if not conn.has_extn("pipelining"):
        settle_outcomes()
        conn.sendmail(sender, [to], data)
        return
    # Ready before the group goes: once DATA is open, nothing but the content may fail.
    content = _content(data)
    conn.send(_group(conn, sender, to, data))
    _open_data(conn, sender, to)
    settle_outcomes()  # the previous e-mail's SENT mark is stored before this one goes
    conn.send(content)
    code, text = _reply(conn, smtplib.SMTPDataError)
    if code != 250:
        _rset(conn)
        raise smtplib.SMTPDataError(code, text)


def _group(conn: smtplib.SMTP, sender: str, to: str, data: bytes) -> bytes:
    """MAIL, RCPT and DATA for one e-mail, sent as one group (RFC 2920)."""
    size = f" SIZE={len(data)}" if conn.has_extn("size") else ""
    return f"MAIL FROM:{_angle(sender)}{size}\r\nRCPT TO:{_angle(to)}\r\nDATA\r\n".encode("ascii")


def _content(data: bytes) -> bytes:
    """The e-mail as it goes after DATA: dot-stuffed, as smtplib.SMTP.data() does, and ended."""
    content = _DOT_AT_LINE_START.sub(b"..", data)
    return content + (b".\r\n" if content.endswith(b"\r\n") else b"\r\n.\r\n")


def _open_data(conn: smtplib.SMTP, sender: str, to: str) -> None:
    """Reads the replies to a group of _group(); returns when DATA is open, else resets the
    session and raises what sendmail() raises for the same replies."""
    # Every reply of the group is read, in order, whatever the first ones said (RFC 2920).
    mail = _reply(conn, lambda code, text: smtplib.SMTPSenderRefused(code, text, sender))
    rcpt = _reply(conn, lambda code, text: smtplib.SMTPRecipientsRefused({to: (code, text)}))
    go = _reply(conn, smtplib.SMTPDataError)
    refused = mail[0] != 250 or rcpt[0] not in (250, 251)
    if go[0] == 354 and refused:  # a server that opened DATA anyway: end it with no content
        conn.send(b".\r\n")
        _reply(conn, smtplib.SMTPDataError)
    if mail[0] != 250:
        _rset(conn)
        raise smtplib.SMTPSenderRefused(*mail, sender)
    if rcpt[0] not in (250, 251):
        _rset(conn)
        raise smtplib.SMTPRecipientsRefused({to: rcpt})
    if go[0] != 354:
        _rset(conn)
        raise smtplib.SMTPDataError(*go)


def _marked(dispatch: Dispatch) -> bool:
    return getattr(dispatch, "outcome", None) is not None


def _lost(exc: Exception) -> bool:
    """Whether ``exc`` means the connection is gone (rather than a reply refusing something)."""
    refusals = (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused)
    return isinstance(exc, OSError) and not isinstance(exc, refusals)


_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")
#: A bare address: what the messenger hands _sendmail() (ascii_address()) nearly always.
_BARE_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]+@[A-Za-z0-9.\-]+")


def _angle(address: str) -> str:
    """``<address>`` for MAIL and RCPT, as smtplib.quoteaddr() gives, without parsing a bare
    address (parsing was a tenth of a worker's time per e-mail)."""
    return f"<{address}>" if _BARE_ADDRESS.fullmatch(address) else smtplib.quoteaddr(address)


def _reply(conn: smtplib.SMTP, error: Callable[[int, bytes], Exception]) -> tuple[int, bytes]:
    """The next reply; a 421 (the server is closing the channel) closes the connection and
    raises ``error``, since no further reply will come."""
    code, text = conn.getreply()
    if code == 421:
        conn.close()
        raise error(code, text)
    return code, text


def _rset(conn: smtplib.SMTP) -> None:
    try:
        conn.rset()
    except smtplib.SMTPServerDisconnected:
        pass  # sendmail() leaves the same to the next command


def _header_line(name: str, value: str) -> bytes:
    """A header line as the e-mail package writes a value without folding points: on the
    line of its name when it fits, else on a continuation line."""
    line = f"{name}: {value}"
    return (line if len(line) <= _MAX_LINE else f"{name}: \r\n {value}").encode()


def _header(email: EmailMessage, name: str) -> str:
    """An extra header of the e-mail, whatever the case of its name ('' when absent)."""
    lowered = name.lower()
    return next((str(v) for k, v in email.extra_headers.items() if k.lower() == lowered), "")


def _add_list_unsubscribe(email: EmailMessage, url: Any) -> None:
    """Adds the RFC 8058 one-click unsubscribe headers for ``url`` (a non-empty string),
    unless the e-mail has its own List-Unsubscribe. The POST header only goes with an https
    URL, which RFC 8058 requires of one-click unsubscribing."""
    if not (isinstance(url, str) and url) or _header(email, "List-Unsubscribe"):
        return
    email.extra_headers["List-Unsubscribe"] = f"<{url}>"
    if url.startswith("https://"):
        email.extra_headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ascii_address(address: str) -> str:
    """The address for the SMTP envelope: an internationalised domain in its IDNA (punycode)
    form. Local parts are ASCII already: validate_address() refuses any other."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    return f"{local}@{domain.encode('idna').decode('ascii')}"


def _smtp_error(
    code: int, reply: bytes | str, alias: str | None, dispatch_id: int | None
) -> Exception:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    cls = PermanentDeliveryError if 500 <= code < 600 else TemporaryDeliveryError
    return cls(f"SMTP {code} {text}", alias=alias, dispatch_id=dispatch_id, response=code)
