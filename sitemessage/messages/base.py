from dispatcher.messages import MessageBase

__all__ = ["MessageBase"]
