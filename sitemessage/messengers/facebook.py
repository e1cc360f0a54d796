from messengers.facebook import FacebookMessenger

__all__ = ["FacebookMessenger"]
