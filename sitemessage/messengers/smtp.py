from messengers.smtp import SMTPMessenger

__all__ = ["SMTPMessenger"]
