from dispatcher.messages import PlainTextMessage

__all__ = ["PlainTextMessage"]
