from messengers.exceptions import VKontakteMessengerException
from messengers.vkontakte import VKontakteMessenger

__all__ = ["VKontakteMessenger", "VKontakteMessengerException"]
