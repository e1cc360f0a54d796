from dispatcher.messages import (
    MessageBase,
    get_registered_message_type,
    get_registered_message_types,
    register_message_types,
)
from dispatcher.toolbox import (
    Recipient,
    get_message_type_for_app,
    override_message_type_for_app,
    recipients,
)
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
    "get_message_type_for_app",
    "get_registered_message_type",
    "get_registered_message_types",
    "get_registered_messenger_object",
    "get_registered_messenger_objects",
    "override_message_type_for_app",
    "recipients",
    "register_message_types",
    "register_messenger_objects",
]
