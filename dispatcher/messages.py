"""Message types: what a message says and how it is rendered for each messenger and recipient.

A message object holds all its state in ``context`` (a JSON object), so it can be stored in a
``Message`` row and travel through the broker as data. The API is django-sitemessage's
``MessageBase``: a text context is sent as it is, a dict context (``use_tpl``) renders a
template chosen per messenger (see ``get_template()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.shortcuts import redirect
from django.template.loader import render_to_string
from django.utils.crypto import get_random_string

from messengers.registry import get_registered_messenger_objects

from . import links
from .models import Dispatch, Message, MessageTuple, OptOut, Subscription
from .signals import (
    sig_mark_read_failed,
    sig_mark_read_success,
    sig_unsubscribe_failed,
    sig_unsubscribe_success,
)
from .types import (
    DEFAULT_RETRY_LIMIT,
    add_message_type,
    get_registered_message_type,
    get_registered_message_types,
    retry_limit,
)
from .validation import Recipient, recipients

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse

    from messengers.base import MessengerBase

__all__ = [
    "SIMPLE_TEXT_ID",
    "EmailHtmlMessage",
    "EmailTextMessage",
    "MessageBase",
    "PlainTextMessage",
    "get_registered_message_type",
    "get_registered_message_types",
    "register_builtin_message_types",
    "register_message_types",
    "retry_limit",
]

#: Context key of the text of a message given as text.
SIMPLE_TEXT_ID = "stext_"
#: Context keys of a per-message template path and of whether the template is used.
TEMPLATE_KEY = "tpl"
USE_TEMPLATE_KEY = "use_tpl"
#: Stand-ins for the recipient's links in a body rendered once for all recipients; replaced per
#: dispatch (personalise()). Letters and digits only, so escaping and URL filters keep them.
LINK_PLACEHOLDERS: dict[links.Purpose, str] = {
    purpose: f"sitemessageLink{purpose.title().replace('_', '')}{get_random_string(12)}"
    for purpose in links.URL_NAMES
}


class MessageBase:
    """Base class of message types. Subclasses set ``alias`` and usually ``template``."""

    #: Unique name stored with every message; defaults to the class name.
    alias: str | None = None
    #: Human-readable name (the admin, the preferences table).
    title: str = "Notification"
    #: Default priority of messages of this type (schedule_messages(priority=...) overrides).
    priority: int = 0
    #: Attempts a dispatch gets before it is marked failed.
    send_retry_limit: int = DEFAULT_RETRY_LIMIT
    #: Template path; default: see get_template().
    template: str | None = None
    template_ext: str = "tpl"
    #: MIME subtype of the rendered body ("plain" or "html").
    content_subtype: str = "plain"
    #: Context keys whose values messengers put into a header: refused at scheduling unless
    #: they are one line of text.
    header_fields: tuple[str, ...] = ()
    #: Whether the body differs per recipient beyond its links (the template uses
    #: ``dispatch_model``, ``recipient`` or ``address``). False: rendered once per message and
    #: batch, shared by every dispatch and not stored per dispatch; the unsubscribe and read
    #: links are still each recipient's own.
    has_dynamic_context: bool = False
    #: Aliases of the messengers this type may be sent through (empty: any); enforced when
    #: scheduling.
    supported_messengers: list[str] = []
    #: Whether users may subscribe to this type (the preferences UI) and unsubscribe from it
    #: (messages carry an unsubscribe link and List-Unsubscribe only then).
    allow_user_subscription: bool = True
    #: Messages of this type with the same mark are grouped into one unsent message per
    #: recipient (see Message.create); empty: no grouping.
    group_mark: str = ""
    SIMPLE_TEXT_ID = SIMPLE_TEXT_ID

    def __init__(
        self, context: str | dict[str, Any] | None = None, template_path: str | None = None
    ):
        self.context: dict[str, Any] = {TEMPLATE_KEY: None, USE_TEMPLATE_KEY: False}
        if context is not None:
            self.update_context(self.context, context, template_path)

    @classmethod
    def get_alias(cls) -> str:
        return cls.alias or cls.__name__

    def __str__(self) -> str:
        return self.get_alias()

    def get_context(self) -> dict[str, Any]:
        return self.context

    @classmethod
    def update_context(
        cls,
        base_context: dict[str, Any],
        str_or_dict: str | dict[str, Any],
        template_path: str | None = None,
    ) -> None:
        """Puts a text (under SIMPLE_TEXT_ID) or a dict (for a template) into ``base_context``,
        in place, with the template path."""
        if isinstance(str_or_dict, dict):
            base_context.update(str_or_dict)
            base_context[USE_TEMPLATE_KEY] = SIMPLE_TEXT_ID not in str_or_dict
        else:
            base_context[SIMPLE_TEXT_ID] = str_or_dict
            base_context[USE_TEMPLATE_KEY] = False
        base_context[TEMPLATE_KEY] = template_path

    def schedule(
        self, recipients: Any = None, sender: Any = None, priority: int | None = None
    ) -> MessageTuple:
        """Stores this message (and one dispatch per recipient) as Message.create() does;
        without recipients its dispatches are made later from the subscribers
        (prepare_dispatches()). Dispatches are delivered by the next sweep; use
        schedule_messages() to have them published at once."""
        return Message.create(
            self.get_alias(),
            self.get_context(),
            recipients=recipients,
            sender=sender,
            priority=self.priority if priority is None else priority,
            group_mark=self.group_mark,
            context_merge_hook=self.merge_context,
        )

    @classmethod
    def merge_context(cls, context: dict[str, Any], new_context: dict[str, Any]) -> dict[str, Any]:
        """The context of a grouped message after ``new_context`` joined it: the new values
        win, and the texts are joined with a new line."""
        merged = {**context, **new_context}
        if SIMPLE_TEXT_ID in context:
            merged[SIMPLE_TEXT_ID] = (
                f"{context[SIMPLE_TEXT_ID]}\n{new_context.get(SIMPLE_TEXT_ID, '')}"
            )
        return merged

    @classmethod
    def recipients(cls, messenger: Any, addresses: Any) -> list[Recipient]:
        """Shortcut of recipients()."""
        return recipients(messenger, addresses)

    @classmethod
    def get_subscribers(cls, active_only: bool = True) -> list[Recipient]:
        """The subscribers of this type as recipients: users through their address for the
        messenger (inactive users left out unless ``active_only`` is False), and addresses."""
        messengers = get_registered_messenger_objects()
        result = []
        for subscription in Subscription.get_for_message_cls(cls.get_alias()):
            user, address = subscription.recipient, subscription.address
            messenger = messengers.get(subscription.messenger_cls)
            if messenger is None:
                continue
            if user is not None:
                if active_only and not getattr(user, "is_active", False):
                    continue
                address = messenger.get_address(user)
            if address and isinstance(address, str):
                result.append(Recipient(subscription.messenger_cls, user, address))
        return result

    @classmethod
    def prepare_dispatches(
        cls, message: Message, recipients: list[Recipient] | None = None
    ) -> list[Dispatch]:
        """Stores the dispatches of a message: to ``recipients``, else to the subscribers."""
        return Dispatch.create(message, cls.get_subscribers() if recipients is None else recipients)

    @classmethod
    def get_dispatch_hash(
        cls, dispatch_id: int, message_id: int, purpose: links.Purpose = "unsubscribe"
    ) -> str:
        """The token of a ``purpose`` link of a stored dispatch (django-sitemessage's name;
        its links had one hash for both purposes, ours are bound to one)."""
        dispatch = Dispatch.objects.get(pk=dispatch_id, message_id=message_id)
        return links.make_token(purpose, dispatch, cls.get_alias())

    @classmethod
    def get_unsubscribe_directive(
        cls, message_model: Message, dispatch_model: Dispatch | None
    ) -> str:
        """The recipient's unsubscribe URL ('' for a type without subscriptions, without a
        dispatch, or when the links are not set up)."""
        if not cls.allow_user_subscription or dispatch_model is None:
            return ""
        return links.link_url("unsubscribe", dispatch_model, cls.get_alias())

    @classmethod
    def get_mark_read_directive(
        cls, message_model: Message, dispatch_model: Dispatch | None
    ) -> str:
        """The recipient's read-tracking URL ('' without a dispatch or without the links)."""
        if dispatch_model is None:
            return ""
        return links.link_url("mark_read", dispatch_model, cls.get_alias())

    @classmethod
    def handle_unsubscribe_request(
        cls,
        request: HttpRequest,
        message: Message | int,
        dispatch: Dispatch | int,
        hash_is_valid: bool,
        redirect_to: str | None,
        link: links.Link | None = None,
    ) -> HttpResponse | None:
        """Unsubscribes the recipient of a valid link (sitemessage.views calls it on POST):
        removes their subscriptions to this type through the messenger and records an opt-out,
        so not even messages addressed to them explicitly are sent; sends the success or
        failed signal. Returns a response, or None for the view's own page. The view puts
        what the link says in ``request.sitemessage_link`` (django-sitemessage's signature has
        no place for it)."""
        link = link or getattr(request, "sitemessage_link", None)
        if hash_is_valid and link is not None:
            OptOut.record(link)
            signal = sig_unsubscribe_success
        else:
            signal = sig_unsubscribe_failed
        signal.send(cls, request=request, message=message, dispatch=dispatch)
        return _redirect(redirect_to)

    @classmethod
    def handle_mark_read_request(
        cls,
        request: HttpRequest,
        message: Message | int,
        dispatch: Dispatch | int,
        hash_is_valid: bool,
        redirect_to: str | None,
        link: links.Link | None = None,
    ) -> HttpResponse | None:
        """Marks the dispatch of a valid link read, changing only its read status (a dispatch
        cleaned up since is not there to mark); sends the success or failed signal. Returns a
        response, or None for the view's pixel."""
        link = link or getattr(request, "sitemessage_link", None)
        if hash_is_valid and link is not None:
            Dispatch.objects.filter(pk=link.dispatch_id, message_id=link.message_id).update(
                read_status=Dispatch.READ_STATUS_READ
            )
            signal = sig_mark_read_success
        else:
            signal = sig_mark_read_failed
        signal.send(cls, request=request, message=message, dispatch=dispatch)
        return _redirect(redirect_to)

    @classmethod
    def get_template(cls, message: Message, messenger: MessengerBase | str) -> str:
        """The template of a message for a messenger: the message's ``tpl``, else the type's
        ``template``, else ``sitemessage/messages/<type alias>__<messenger alias>.<ext>``
        (per messenger: django-sitemessage kept the first messenger's on the class)."""
        return (
            (message.context or {}).get(TEMPLATE_KEY)
            or cls.template
            or cls._messenger_template(messenger)
        )

    @classmethod
    def _messenger_template(cls, messenger: MessengerBase | str) -> str:
        alias = messenger if isinstance(messenger, str) else messenger.get_alias()
        return f"sitemessage/messages/{cls.get_alias()}__{alias}.{cls.template_ext}"

    @classmethod
    def compile(
        cls, message: Message, messenger: MessengerBase | str, dispatch: Dispatch | None = None
    ) -> str:
        """The body of a message for one dispatch, or (``dispatch`` None) the body its
        recipients share, with LINK_PLACEHOLDERS for their links (see personalise()).

        A text context is the body as it is. A dict context renders the template
        (get_template(); when it is the per-messenger default and missing,
        ``sitemessage/messages/<type alias>.<ext>``) with the context plus ``SITE_URL``,
        ``directive_unsubscribe``, ``directive_mark_read``, ``message_model``,
        ``dispatch_model``, ``recipient`` and ``address`` (the last three None in a shared
        body), through get_template_context()."""
        context = dict(message.context or {})
        if not context.get(USE_TEMPLATE_KEY, SIMPLE_TEXT_ID not in context):
            return str(context.get(SIMPLE_TEXT_ID, ""))
        if dispatch is None:  # placeholders, only where personalise() will put a link
            unsubscribe, mark_read = (
                LINK_PLACEHOLDERS[purpose] if links.available(purpose) else ""
                for purpose in ("unsubscribe", "mark_read")
            )
            if not cls.allow_user_subscription:
                unsubscribe = ""
        else:
            unsubscribe = cls.get_unsubscribe_directive(message, dispatch)
            mark_read = cls.get_mark_read_directive(message, dispatch)
        context.update(
            SITE_URL=links.site_url(),
            directive_unsubscribe=unsubscribe,
            directive_mark_read=mark_read,
            message_model=message,
            dispatch_model=dispatch,
            recipient=dispatch.recipient if dispatch else None,
            address=dispatch.address if dispatch else None,
        )
        context = cls.get_template_context(context)
        name = cls.get_template(message, messenger)
        names = [name]
        if name == cls._messenger_template(messenger):
            names.append(f"sitemessage/messages/{cls.get_alias()}.{cls.template_ext}")
        return render_to_string(names, context)

    @classmethod
    def personalise(
        cls,
        shared_body: str,
        message: Message,
        dispatch: Dispatch,
        unsubscribe_url: str | None = None,
    ) -> str:
        """A shared body with this dispatch's links in place of the placeholders (the body
        itself when it has none, without a copy). ``unsubscribe_url``: that link, when the
        caller has it already (else get_unsubscribe_directive() makes it)."""
        for purpose, placeholder in LINK_PLACEHOLDERS.items():
            if placeholder in shared_body:
                if purpose == "mark_read":
                    url = cls.get_mark_read_directive(message, dispatch)
                elif unsubscribe_url is None:
                    url = cls.get_unsubscribe_directive(message, dispatch)
                else:
                    url = unsubscribe_url
                shared_body = shared_body.replace(placeholder, url)
        return shared_body

    @classmethod
    def get_template_context(cls, context: dict[str, Any]) -> dict[str, Any]:
        """Hook: the template context built from the message context (with the keys compile()
        adds). Called once per rendering."""
        return context

    def to_wire(self) -> dict[str, Any]:
        """Plain data for the JSON serializer (schedule_messages.delay)."""
        return {"type": self.get_alias(), "context": self.context}

    @staticmethod
    def from_wire(data: dict[str, Any]) -> MessageBase:
        cls = get_registered_message_type(data["type"])
        message = cls.__new__(cls)
        message.context = dict(data["context"])
        return message


def _redirect(to: str | None) -> HttpResponse | None:
    return redirect(to) if to else None


class PlainTextMessage(MessageBase):
    """A text, sent as it is."""

    alias = "plain"
    title = "Text notification"

    def __init__(self, text: str, template_path: str | None = None):
        super().__init__({SIMPLE_TEXT_ID: text}, template_path)


class EmailTextMessage(MessageBase):
    """A plain-text e-mail: a subject and a text, or a dict for the template
    ``sitemessage/messages/email_plain__smtp.txt`` (yours; without it ours,
    ``email_plain.txt``, shows ``contents``)."""

    alias = "email_plain"
    title = "Email notification"
    template_ext = "txt"
    supported_messengers = ["smtp"]
    header_fields = ("subject",)
    type_name = "plain"

    def __init__(
        self, subject: str, text_or_dict: str | dict[str, Any], template_path: str | None = None
    ):
        context: dict[str, Any] = {"subject": subject, "type": self.type_name}
        self.update_context(context, text_or_dict)
        super().__init__(context, template_path)


class EmailHtmlMessage(EmailTextMessage):
    """An HTML e-mail: a subject and HTML, or a dict for the template
    ``sitemessage/messages/email_html__smtp.html`` (``contents`` is put in as HTML)."""

    alias = "email_html"
    template_ext = "html"
    content_subtype = "html"
    type_name = "html"


def register_message_types(*message_types: type[MessageBase]) -> None:
    """Registers message types under their aliases."""
    for message_type in message_types:
        if not (isinstance(message_type, type) and issubclass(message_type, MessageBase)):
            raise TypeError(
                f"register_message_types() takes MessageBase subclasses, got {message_type!r}"
            )
        add_message_type(message_type)


def register_builtin_message_types() -> None:
    register_message_types(PlainTextMessage, EmailTextMessage, EmailHtmlMessage)
