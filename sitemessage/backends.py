from dispatcher.backends import EmailBackend

__all__ = ["EmailBackend"]
