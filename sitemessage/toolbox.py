from dispatcher.hints import TypeMessages
from dispatcher.messages import (
    get_registered_message_type,
    get_registered_message_types,
    register_builtin_message_types,
    register_message_types,
)
from dispatcher.operations import check_undelivered, cleanup_sent_messages, send_scheduled_messages
from dispatcher.preferences import get_user_preferences_for_ui, set_user_preferences_from_request
from dispatcher.toolbox import (
    _ALIAS_SEP,
    _PREF_POST_KEY,
    Recipient,
    get_message_type_for_app,
    override_message_type_for_app,
    prepare_dispatches,
    recipients,
    schedule_messages,
    send_test_message,
)
from dispatcher.views import get_sitemessage_urls
from messengers.registry import (
    get_registered_messenger_object,
    get_registered_messenger_objects,
    register_messenger_objects,
)

__all__ = [
    "_ALIAS_SEP",
    "_PREF_POST_KEY",
    "Recipient",
    "TypeMessages",
    "check_undelivered",
    "cleanup_sent_messages",
    "get_message_type_for_app",
    "get_registered_message_type",
    "get_registered_message_types",
    "get_registered_messenger_object",
    "get_registered_messenger_objects",
    "get_sitemessage_urls",
    "get_user_preferences_for_ui",
    "override_message_type_for_app",
    "prepare_dispatches",
    "recipients",
    "register_builtin_message_types",
    "register_message_types",
    "register_messenger_objects",
    "schedule_messages",
    "send_scheduled_messages",
    "send_test_message",
    "set_user_preferences_from_request",
]
