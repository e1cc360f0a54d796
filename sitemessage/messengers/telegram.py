from messengers.exceptions import TelegramMessengerException
from messengers.telegram import TelegramMessenger

__all__ = ["TelegramMessenger", "TelegramMessengerException"]
