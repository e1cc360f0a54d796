"""Message types for fault tests and benchmarks: a poison type (rendering always raises, so its
dispatches can only fail) and an e-mail type rendered per recipient."""

from __future__ import annotations

from typing import Any

from dispatcher.messages import EmailTextMessage, MessageBase, register_message_types


class PoisonRenderError(RuntimeError):
    """Raised by PoisonMessage.compile(), every time."""


class PoisonMessage(MessageBase):
    alias = "poison"
    title = "Poison (rendering always fails)"
    send_retry_limit = 3

    @classmethod
    def compile(cls, message: Any, messenger: Any, dispatch: Any = None) -> str:
        raise PoisonRenderError(f"message {message.pk}: this message type cannot render")


class PerRecipientEmail(EmailTextMessage):
    """A plain-text e-mail rendered, and stored, once per recipient (a dynamic context)."""

    alias = "email_per_recipient"
    has_dynamic_context = True


register_message_types(PoisonMessage, PerRecipientEmail)
