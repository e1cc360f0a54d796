from messengers.base import MessengerBase, Recipient
from messengers.http import HTTPMessenger as RequestsMessengerBase
from messengers.http import Proxy as TypeProxy

__all__ = ["MessengerBase", "Recipient", "RequestsMessengerBase", "TypeProxy"]
