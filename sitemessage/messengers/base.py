from messengers.base import MessengerBase

__all__ = ["MessengerBase"]
