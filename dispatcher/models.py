"""Messages, their dispatches (one per recipient and messenger) and the dispatches' error log.

The database is the source of truth: a dispatch's row says whether it was sent, is being sent
(and by whom, until when), must be retried (and when), or has failed for good.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone


class Message(models.Model):
    """One message, scheduled once, delivered through any number of dispatches."""

    cls = models.CharField("message type", max_length=250)
    context = models.JSONField(default=dict)
    sender = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    priority = models.PositiveSmallIntegerField(default=0, db_index=True)
    time_created = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "message"

    def __str__(self) -> str:
        return f"{self.cls} #{self.pk}"


class Dispatch(models.Model):
    """Delivery of one message to one address through one messenger."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        PROCESSING = "processing", "processing"
        SENT = "sent", "sent"
        ERROR = "error", "error (will retry)"
        FAILED = "failed", "failed"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="dispatches")
    messenger = models.CharField(max_length=250)
    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    address = models.CharField(max_length=255)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    #: Delivery attempts started (a claim counts one), independent of the status.
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    #: Who is delivering the dispatch right now, and until when the claim holds.
    lease_owner = models.CharField(max_length=100, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    provider_message_id = models.CharField(max_length=255, blank=True)
    time_created = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)
    #: The body rendered for this recipient, kept so a retry sends the same text; empty when
    #: the message type renders one body for all recipients (it is rendered again instead).
    message_cache = models.TextField(blank=True)

    #: Set by the messenger's mark_*() calls during a batch; never stored as such.
    outcome: Any = None
    #: True while ``message_cache`` holds the body shared by the message's recipients (in
    #: memory only: one string for the whole batch, not stored per dispatch).
    body_shared: bool = False

    class Meta:
        verbose_name = "dispatch"
        verbose_name_plural = "dispatches"
        indexes = [
            # The sweep: due retries and stale pending rows per status; expired leases.
            models.Index(fields=["status", "next_attempt_at"], name="sm_dispatch_status_next"),
            models.Index(fields=["status", "lease_expires_at"], name="sm_dispatch_status_lease"),
            models.Index(fields=["status", "time_created"], name="sm_dispatch_status_created"),
        ]

    def __str__(self) -> str:
        return f"{self.messenger} dispatch #{self.pk} to {self.address} ({self.status})"


class ScheduleRequest(models.Model):
    """A ``schedule_messages.delay()`` call waiting for a worker: the transactional outbox.

    Written in the caller's transaction, so a rollback sends nothing; only its id reaches the
    broker, after commit. The worker that expands it into a message and its dispatches deletes
    it in the same transaction, so it is expanded once however often its task is delivered.
    """

    #: The call as plain data (toolbox.encode_call): message types, contexts, recipients.
    payload = models.JSONField()
    time_created = models.DateTimeField(default=timezone.now, db_index=True)
    #: Why the call could not be expanded (say, its message type is no longer registered);
    #: such a request is kept for an operator and not tried again.
    error = models.TextField(blank=True)

    class Meta:
        verbose_name = "schedule request"

    def __str__(self) -> str:
        return f"schedule request #{self.pk}" + (" (failed)" if self.error else "")


class DispatchError(models.Model):
    """One failed delivery attempt of a dispatch."""

    dispatch = models.ForeignKey(Dispatch, on_delete=models.CASCADE, related_name="errors")
    attempt = models.PositiveIntegerField()
    exc_type = models.CharField("exception type", max_length=255)
    error = models.TextField()
    time_created = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "dispatch error"
        ordering = ["pk"]

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.error[:80]}"
