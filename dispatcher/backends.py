"""Django's e-mail through the pipeline: ``EMAIL_BACKEND = 'sitemessage.backends.EmailBackend'``.

``send_mail()``, ``send_mass_mail()``, ``mail_admins()``, ``EmailMessage.send()``: each e-mail
becomes one message of type ``email_django`` with one dispatch per recipient (To, Cc and Bcc,
each address once), delivered by the workers of the messenger named by
SITEMESSAGE_SHORTCUT_EMAIL_MESSENGER_TYPE (``smtp``). The message keeps what Django would have
sent (From, To, Cc, Reply-To, extra headers, the body with its subtype, HTML and other
alternatives, attachments), and each copy goes to its dispatch's address only. Bcc addresses
are dispatch addresses and nothing else: no copy names them.

The context of an ``email_django`` message (JSON)::

    {"subject": str, "body": str, "content_subtype": "plain", "mixed_subtype": "mixed",
     "alternative_subtype": "alternative", "encoding": str | None, "from_email": str,
     "to": [str], "cc": [str], "reply_to": [str], "headers": {name: value},
     "alternatives": [part], "attachments": [part]}

A part is ``{"mimetype": str, "content": str}`` (text) or ``{"mimetype": str, "base64": str}``
(bytes); an attachment also has its ``"filename"`` (str or None), or is ``{"mime": base64}``:
the bytes of an attachment Django was given as a MIME object.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Mapping, Sequence
from email import message_from_bytes
from email._header_value_parser import get_mailbox  # what Django's SMTP backend parses with
from email.errors import HeaderParseError
from email.message import Message as PyEmailMessage
from email.mime.base import MIMEBase
from email.policy import Policy, compat32
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.message import BadHeaderError
from django.db import DatabaseError, transaction

from messengers.exceptions import InvalidAddressError, InvalidContextError, ScheduleError

from . import conf
from .messages import MessageBase
from .toolbox import checked_call, recipients, schedule
from .validation import Recipient

if TYPE_CHECKING:
    from messengers.base import MessengerBase

    from .models import Dispatch, Message

logger = logging.getLogger(__name__)

#: A header name: printable ASCII without space or colon (RFC 5322 ftext).
_HEADER_NAME = re.compile(r"[!-9;-~]+")
#: The header left out of every copy: it would name the blind recipients.
_BCC = "bcc"


class InvalidEmailHeaderError(InvalidContextError, BadHeaderError):
    """A header of a Django e-mail (subject, an address, an extra header) that is not one line,
    or a header name that is not one. Also Django's BadHeaderError, which callers of
    send_mail() catch for header injection."""


class EmailBackendMessage(MessageBase):
    """A Django e-mail as it was given to EmailBackend: see the module docstring."""

    alias = "email_django"
    title = "E-mail (Django)"
    supported_messengers = ["smtp"]
    header_fields = ("subject", "from_email")
    #: One body for every recipient: the e-mail is the same, only its envelope differs.
    has_dynamic_context = False
    #: Django's e-mail is the project's own (password resets, notices): no one opts out of it,
    #: and it carries no unsubscribe link or List-Unsubscribe header.
    allow_user_subscription = False

    def __init__(self, email: EmailMessage) -> None:
        super().__init__()
        self.context.update(email_context(email))

    @classmethod
    def compile(
        cls, message: Message, messenger: MessengerBase | str, dispatch: Dispatch | None = None
    ) -> str:
        """The body is the e-mail's own text, as the sender wrote it: no template, no
        escaping."""
        return str((message.context or {}).get("body", ""))

    @classmethod
    def build_email(
        cls, message_model: Message, dispatch: Dispatch, defaults: Mapping[str, str]
    ) -> EmailMultiAlternatives:
        """Called by the SMTP messenger for each dispatch: the stored e-mail, with the body
        the pipeline compiled (``dispatch.message_cache``). ``defaults`` holds the messenger's
        ``from_email`` (used when the e-mail had none) and the stable ``message_id`` it would
        give the dispatch (used unless the e-mail set its own Message-ID). The messenger sends
        it to ``dispatch.address`` only."""
        context = message_model.context or {}
        headers = dict(context.get("headers") or {})
        if not any(name.lower() == "message-id" for name in headers):
            headers["Message-ID"] = defaults["message_id"]
        email = EmailMultiAlternatives(
            subject=context.get("subject", ""),
            body=dispatch.message_cache,
            from_email=context.get("from_email") or defaults["from_email"],
            to=context.get("to"),
            cc=context.get("cc"),
            reply_to=context.get("reply_to"),
            headers=headers,
        )
        email.content_subtype = context.get("content_subtype", "plain")
        email.mixed_subtype = context.get("mixed_subtype", "mixed")
        email.alternative_subtype = context.get("alternative_subtype", "alternative")
        email.encoding = context.get("encoding")
        for part in context.get("alternatives", []):
            email.attach_alternative(_content_of(part), part["mimetype"])
        for part in context.get("attachments", []):
            if "mime" in part:
                email.attach(_mime_part(base64.b64decode(part["mime"])))
            else:
                email.attach(part["filename"], _content_of(part), part["mimetype"])
        return email


def email_context(email: EmailMessage) -> dict[str, Any]:
    """The context of an ``email_django`` message for a Django e-mail (Bcc left out); raises
    InvalidEmailHeaderError for a header that is not one line, InvalidContextError for an
    attachment or alternative it cannot store."""
    context: dict[str, Any] = {
        "subject": _one_line("subject", email.subject),
        "body": str(email.body),
        "content_subtype": str(email.content_subtype),
        "mixed_subtype": str(email.mixed_subtype),
        "alternative_subtype": str(getattr(email, "alternative_subtype", "alternative")),
        "encoding": None if email.encoding is None else str(email.encoding),
        "from_email": _one_line("from_email", email.from_email),
        "to": [_one_line("to", address) for address in email.to],
        "cc": [_one_line("cc", address) for address in email.cc],
        "reply_to": [_one_line("reply_to", address) for address in email.reply_to],
        "headers": _headers(email.extra_headers),
        "alternatives": [
            _stored_part(content, mimetype, f"alternative {index}")
            for index, (content, mimetype) in enumerate(getattr(email, "alternatives", []))
        ],
        "attachments": [
            _stored_attachment(item, f"attachment {index}")
            for index, item in enumerate(email.attachments)
        ],
    }
    return context


def envelope_addresses(email: EmailMessage) -> list[str]:
    """The bare addresses of every recipient (To, Cc, Bcc; ``Name <a@example.com>`` gives
    ``a@example.com``), each once, in order."""
    return list(dict.fromkeys(bare_address(entry) for entry in email.recipients()))


def bare_address(entry: Any) -> str:
    """The address of one recipient entry, parsed as Django's SMTP backend parses it; raises
    InvalidAddressError unless the entry is exactly one address with a domain
    (``"a@example.com, b@example.com"`` in one entry is refused, not cut short)."""
    text = str(entry)
    try:
        mailbox, rest = get_mailbox(text)
    except (HeaderParseError, ValueError, IndexError):
        raise InvalidAddressError(
            f"e-mail recipient {text!r:.100} is not an e-mail address"
        ) from None
    if rest.strip() or not mailbox.domain or mailbox.all_defects:
        raise InvalidAddressError(f"e-mail recipient {text!r:.100} is not one e-mail address")
    return f"{mailbox.local_part}@{mailbox.domain}"


class EmailBackend(BaseEmailBackend):
    """Schedules Django's e-mail for the workers instead of sending it: one message per e-mail,
    one dispatch per recipient. ``send_messages()`` returns the number of e-mails scheduled.

    All-or-nothing: every e-mail of a call is checked before any is written, and all are written
    in one transaction, so an error leaves nothing scheduled and the caller may simply call
    again (scheduling the valid ones first would send those twice on that retry). With
    ``fail_silently`` the invalid e-mails are skipped and logged (by error class, never by
    address) and the others scheduled; a database error then schedules nothing and returns 0.
    Inside the caller's transaction the messages are published when it commits, and a rollback
    sends nothing."""

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        prepared: list[tuple[EmailBackendMessage, list[Recipient]]] = []
        for index, email in enumerate(email_messages or []):
            if not email.recipients():
                continue
            try:
                prepared.append(self._prepare(email))
            except ScheduleError as exc:
                if not self.fail_silently:
                    raise
                logger.warning(
                    "e-mail %d of %d not scheduled: %s",
                    index + 1,
                    len(email_messages),
                    type(exc).__name__,
                )
        if not prepared:
            return 0
        priority = conf.EMAIL_BACKEND_MESSAGES_PRIORITY.get()
        try:
            with transaction.atomic():
                for message, recipient_list in prepared:
                    schedule(message, recipient_list, priority=priority)
        except DatabaseError as exc:
            if not self.fail_silently:
                raise
            logger.warning("%d e-mails not scheduled: %s", len(prepared), type(exc).__name__)
            return 0
        return len(prepared)

    @staticmethod
    def _prepare(email: EmailMessage) -> tuple[EmailBackendMessage, list[Recipient]]:
        """The message and recipients of one e-mail, checked as schedule() will check them."""
        message = EmailBackendMessage(email)
        recipient_list = recipients(
            conf.SHORTCUT_EMAIL_MESSENGER_TYPE.get(), envelope_addresses(email)
        )
        checked_call(message, recipient_list, None, conf.EMAIL_BACKEND_MESSAGES_PRIORITY.get())
        return message, recipient_list


def _one_line(what: str, value: Any) -> str:
    text = str(value)
    if "\n" in text or "\r" in text:
        raise InvalidEmailHeaderError(
            f"e-mail {what} must be one line (header injection?), got {text!r:.100}"
        )
    return text


def _headers(extra_headers: Mapping[Any, Any]) -> dict[str, str]:
    """The extra headers as stored, without Bcc (no copy may name a blind recipient), with a
    Date (when it was scheduled: the same on every copy and every attempt) unless one is set."""
    result: dict[str, str] = {}
    for name, value in extra_headers.items():
        if not (isinstance(name, str) and _HEADER_NAME.fullmatch(name)):
            raise InvalidEmailHeaderError(f"e-mail header name {name!r:.100} is not valid")
        if name.lower() != _BCC:
            result[name] = _one_line(f"header {name}", value)
    if not any(name.lower() == "date" for name in result):
        result["Date"] = formatdate(localtime=settings.EMAIL_USE_LOCALTIME)
    return result


def _stored_part(content: Any, mimetype: Any, what: str) -> dict[str, Any]:
    if not isinstance(mimetype, str) or "/" not in mimetype:
        raise InvalidContextError(f"e-mail {what}: mimetype {mimetype!r:.100} is not type/subtype")
    if isinstance(content, bytes):
        return {"mimetype": mimetype, "base64": base64.b64encode(content).decode("ascii")}
    if isinstance(content, EmailMessage):  # a message/rfc822 attachment
        content = content.message()
    if isinstance(content, PyEmailMessage):
        return {"mimetype": mimetype, "base64": base64.b64encode(content.as_bytes()).decode()}
    if isinstance(content, str):
        return {"mimetype": mimetype, "content": content}
    raise InvalidContextError(
        f"e-mail {what}: content must be str or bytes, got {type(content).__name__}"
    )


def _stored_attachment(item: Any, what: str) -> dict[str, Any]:
    if isinstance(item, MIMEBase):
        return {"mime": base64.b64encode(item.as_bytes()).decode("ascii")}
    filename, content, mimetype = item
    if filename is not None:
        filename = _one_line(f"{what} filename", filename)
    return {"filename": filename, **_stored_part(content, mimetype, what)}


def _content_of(part: Mapping[str, Any]) -> str | bytes:
    return base64.b64decode(part["base64"]) if "base64" in part else str(part["content"])


class _StoredPart(MIMEBase):
    """A MIME part read back from its bytes, headers and payload as they were: a MIMEBase, so
    Django attaches it as it is, without the headers MIMEBase() would add."""

    def __init__(self, *, policy: Policy = compat32) -> None:
        PyEmailMessage.__init__(self, policy=policy)


def _mime_part(data: bytes) -> MIMEBase:
    part = message_from_bytes(data, _class=_StoredPart)
    assert isinstance(part, MIMEBase)
    return part
