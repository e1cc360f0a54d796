from dispatcher.apps import import_app_sitemessage_module, import_project_sitemessage_modules
from dispatcher.hints import (
    TypeMessage,
    TypeMessenger,
    TypeRecipient,
    TypeRecipients,
    TypeUser,
)
from dispatcher.links import site_url as get_site_url
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
from messengers.base import MessengerBase, is_iterable
from messengers.registry import (
    get_registered_messenger_object,
    get_registered_messenger_objects,
    register_messenger_objects,
)

__all__ = [
    "MessageBase",
    "MessengerBase",
    "Recipient",
    "TypeMessage",
    "TypeMessenger",
    "TypeRecipient",
    "TypeRecipients",
    "TypeUser",
    "get_message_type_for_app",
    "get_registered_message_type",
    "get_registered_message_types",
    "get_registered_messenger_object",
    "get_registered_messenger_objects",
    "get_site_url",
    "import_app_sitemessage_module",
    "import_project_sitemessage_modules",
    "is_iterable",
    "override_message_type_for_app",
    "recipients",
    "register_message_types",
    "register_messenger_objects",
]
