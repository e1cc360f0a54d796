from dispatcher.messages import register_builtin_message_types

__all__ = ["register_builtin_message_types"]
