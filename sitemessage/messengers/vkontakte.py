from messengers.vkontakte import VKontakteMessenger

__all__ = ["VKontakteMessenger"]
