from messengers.twitter import TwitterMessenger

__all__ = ["TwitterMessenger"]
