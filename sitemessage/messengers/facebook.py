from messengers.exceptions import FacebookMessengerException
from messengers.facebook import FacebookMessenger

__all__ = ["FacebookMessenger", "FacebookMessengerException"]
