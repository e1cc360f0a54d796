"""Signals: django-sitemessage's four for its links, and one per final delivery outcome.

Every signal is sent with the message type class as sender. The link signals carry
``request``, ``message`` and ``dispatch`` (the Message and Dispatch rows; ids when the rows are
gone or the link was not valid); the delivery signals carry ``message`` and ``dispatch`` and are
sent by the process that delivered, once per dispatch, after its outcome is stored.
"""

import logging
from collections.abc import Iterable
from typing import Any

import django.dispatch

from .types import get_registered_message_type

logger = logging.getLogger(__name__)

#: An unsubscribe link was used and the recipient is unsubscribed.
sig_unsubscribe_success = django.dispatch.Signal()
#: An unsubscribe link was used but was not valid (forged, expired, for another purpose).
sig_unsubscribe_failed = django.dispatch.Signal()
#: A read link (the tracking pixel) was opened and the dispatch is marked read.
sig_mark_read_success = django.dispatch.Signal()
#: A read link was opened but was not valid.
sig_mark_read_failed = django.dispatch.Signal()
#: A dispatch was delivered (its SENT status is stored).
dispatch_sent = django.dispatch.Signal()
#: A dispatch failed for good (its FAILED status is stored: no more attempts).
dispatch_failed = django.dispatch.Signal()


def send_outcome(signal: django.dispatch.Signal, dispatches: Iterable[Any]) -> None:
    """Sends a delivery signal for dispatches whose outcome is stored (each with its
    ``message``); a receiver that raises is logged and changes nothing."""
    if not signal.has_listeners():
        return
    for dispatch in dispatches:
        try:
            sender: Any = get_registered_message_type(dispatch.message.cls)
        except LookupError:
            sender = None
        for receiver, result in signal.send_robust(
            sender, message=dispatch.message, dispatch=dispatch
        ):
            if isinstance(result, Exception):
                logger.error(
                    "receiver %r of a delivery signal raised for dispatch %s: %r",
                    receiver,
                    dispatch.pk,
                    result,
                )
