from messengers.telegram import TelegramMessenger

__all__ = ["TelegramMessenger"]
