from dispatcher.messages import EmailHtmlMessage, EmailTextMessage

__all__ = ["EmailHtmlMessage", "EmailTextMessage"]
