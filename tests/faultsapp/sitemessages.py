"""Message types for fault tests and benchmarks: a poison type (rendering always raises, so its
dispatches can only fail) and an e-mail type rendered per recipient."""

from __future__ import annotations

from typing import Any

from dispatcher.messages import EmailTextMessage, MessageBase, register_message_types


class PoisonRenderError(RuntimeError):
    """Raised by PoisonMessage.render(), every time."""


class PoisonMessage(MessageBase):
    alias = "poison"
    title = "Poison (rendering always fails)"
    send_retry_limit = 3

    @classmethod
    def render(cls, message_model: Any, dispatch: Any) -> str:
        raise PoisonRenderError(f"message {message_model.pk}: this message type cannot render")


class PerRecipientEmail(EmailTextMessage):
    """A plain-text e-mail rendered, and stored, once per recipient (a dynamic context)."""

    alias = "email_per_recipient"
    template = "sitemessage/messages/email_plain.txt"
    has_dynamic_context = True


register_message_types(PoisonMessage, PerRecipientEmail)
