from dispatcher.messages import (
    MessageBase,
    get_registered_message_type,
    get_registered_message_types,
    register_message_types,
)
from dispatcher.toolbox import Recipient
from messengers.base import MessengerBase
from messengers.registry import (
    get_registered_messenger_object,
    get_registered_messenger_objects,
    register_messenger_objects,
)

__all__ = [
    "MessageBase",
    "MessengerBase",
    "Recipient",
    "get_registered_message_type",
    "get_registered_message_types",
    "get_registered_messenger_object",
    "get_registered_messenger_objects",
    "register_message_types",
    "register_messenger_objects",
]
