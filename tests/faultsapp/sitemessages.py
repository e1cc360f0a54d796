"""A poison message type: rendering it always raises, so its dispatches can only fail."""

from __future__ import annotations

from typing import Any

from dispatcher.messages import MessageBase, register_message_types


class PoisonRenderError(RuntimeError):
    """Raised by PoisonMessage.render(), every time."""


class PoisonMessage(MessageBase):
    alias = "poison"
    title = "Poison (rendering always fails)"
    send_retry_limit = 3

    @classmethod
    def render(cls, message_model: Any, dispatch: Any) -> str:
        raise PoisonRenderError(f"message {message_model.pk}: this message type cannot render")


register_message_types(PoisonMessage)
