from messengers.xmpp import XMPPSleekMessenger

__all__ = ["XMPPSleekMessenger"]
