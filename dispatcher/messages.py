"""Message types: what a message says and how it is rendered for each recipient.

A message object holds all its state in ``context`` (a JSON object), so it can be stored in a
``Message`` row and travel through the broker as data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.template.loader import render_to_string

from messengers.exceptions import UnknownMessageTypeError

if TYPE_CHECKING:
    from .models import Dispatch, Message

#: Context key of the text of the simple message types.
SIMPLE_TEXT_ID = "stext_"
#: Context key of a per-message template override.
TEMPLATE_KEY = "tpl"


class MessageBase:
    """Base class of message types. Subclasses set ``alias`` and usually ``template``."""

    #: Unique name stored with every message; defaults to the class name.
    alias: str | None = None
    #: Human-readable name for the admin.
    title: str | None = None
    #: Default priority of messages of this type (schedule_messages(priority=...) overrides).
    priority: int = 0
    #: Attempts a dispatch gets before it is marked failed.
    send_retry_limit: int = 10
    #: Template name; defaults to ``sitemessage/messages/<alias>.<template_ext>``.
    template: str | None = None
    template_ext: str = "txt"
    #: MIME subtype of the rendered body ("plain" or "html").
    content_subtype: str = "plain"
    #: Context keys whose values messengers put into a header: refused at scheduling unless
    #: they are one line of text.
    header_fields: tuple[str, ...] = ()
    #: Whether the body differs per recipient (the template uses ``dispatch_model``,
    #: ``recipient`` or ``address``). False: rendered once per message and batch, without any
    #: recipient's data, shared by every dispatch and not stored per dispatch.
    has_dynamic_context: bool = False

    def __init__(self, context: dict[str, Any] | None = None, template_path: str | None = None):
        self.context: dict[str, Any] = dict(context or {})
        if template_path:
            self.context[TEMPLATE_KEY] = template_path

    @classmethod
    def get_alias(cls) -> str:
        return cls.alias or cls.__name__

    @classmethod
    def get_template(cls, context: dict[str, Any]) -> str:
        return (
            context.get(TEMPLATE_KEY)
            or cls.template
            or f"sitemessage/messages/{cls.get_alias()}.{cls.template_ext}"
        )

    @classmethod
    def get_template_context(cls, context: dict[str, Any]) -> dict[str, Any]:
        """Hook: returns the template context built from the stored message context.
        Called once per dispatch at render time."""
        return context

    @classmethod
    def render(cls, message_model: Message, dispatch: Dispatch | None) -> str:
        """Renders the body for one dispatch, or (``dispatch`` None, for a type without a
        dynamic context) the body all recipients share. The template sees the message context
        plus ``message_model``, ``dispatch_model``, ``recipient`` (a user or None) and
        ``address`` (the last three None in a shared body)."""
        context = dict(cls.get_template_context(dict(message_model.context or {})))
        context.update(
            message_model=message_model,
            dispatch_model=dispatch,
            recipient=dispatch.recipient if dispatch else None,
            address=dispatch.address if dispatch else None,
        )
        return render_to_string(cls.get_template(context), context)

    def to_wire(self) -> dict[str, Any]:
        """Plain data for the JSON serializer (schedule_messages.delay)."""
        return {"type": self.get_alias(), "context": self.context}

    @staticmethod
    def from_wire(data: dict[str, Any]) -> MessageBase:
        cls = get_registered_message_type(data["type"])
        message = cls.__new__(cls)
        message.context = dict(data["context"])
        return message


class PlainTextMessage(MessageBase):
    """A text, sent as it is."""

    alias = "plain"
    title = "Plain text"

    def __init__(self, text: str, template_path: str | None = None):
        super().__init__({SIMPLE_TEXT_ID: text}, template_path)


class EmailTextMessage(MessageBase):
    """A plain-text e-mail: a subject and a text (or a context dict for a custom template)."""

    alias = "email_plain"
    title = "E-mail (text)"
    header_fields = ("subject",)

    def __init__(
        self, subject: str, text_or_dict: str | dict[str, Any], template_path: str | None = None
    ):
        context = (
            dict(text_or_dict) if isinstance(text_or_dict, dict) else {SIMPLE_TEXT_ID: text_or_dict}
        )
        context["subject"] = subject
        super().__init__(context, template_path)


class EmailHtmlMessage(EmailTextMessage):
    """An HTML e-mail; the text is escaped unless a custom template says otherwise."""

    alias = "email_html"
    title = "E-mail (HTML)"
    template_ext = "html"
    content_subtype = "html"


_message_types: dict[str, type[MessageBase]] = {}


def register_message_types(*message_types: type[MessageBase]) -> None:
    """Registers message types under their aliases."""
    for message_type in message_types:
        if not (isinstance(message_type, type) and issubclass(message_type, MessageBase)):
            raise TypeError(
                f"register_message_types() takes MessageBase subclasses, got {message_type!r}"
            )
        _message_types[message_type.get_alias()] = message_type


def get_registered_message_types() -> dict[str, type[MessageBase]]:
    return dict(_message_types)


def get_registered_message_type(alias: str) -> type[MessageBase]:
    try:
        return _message_types[alias]
    except KeyError:
        raise UnknownMessageTypeError(alias, list(_message_types)) from None


def retry_limit(message_type: str) -> int:
    """Attempts a dispatch of this message type gets (the default for an unknown type)."""
    try:
        return get_registered_message_type(message_type).send_retry_limit
    except LookupError:
        return MessageBase.send_retry_limit


def register_builtin_message_types() -> None:
    register_message_types(PlainTextMessage, EmailTextMessage, EmailHtmlMessage)
