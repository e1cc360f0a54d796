from dispatcher.signals import (
    dispatch_failed,
    dispatch_sent,
    sig_mark_read_failed,
    sig_mark_read_success,
    sig_unsubscribe_failed,
    sig_unsubscribe_success,
)

__all__ = [
    "dispatch_failed",
    "dispatch_sent",
    "sig_mark_read_failed",
    "sig_mark_read_success",
    "sig_unsubscribe_failed",
    "sig_unsubscribe_success",
]
