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
    """One message, scheduled once, delivered through any number of dispatches.

    Columns and names are django-sitemessage's (its databases upgrade in place).
    """

    id = models.BigAutoField(primary_key=True)
    time_created = models.DateTimeField(default=timezone.now)
    sender = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    #: The message type's alias.
    cls = models.CharField("message type", max_length=250, db_index=True)
    #: Messages of one type with the same mark may be grouped into one.
    group_mark = models.CharField(max_length=128, db_index=True, db_column="gmark", blank=True)
    context = models.JSONField(default=dict)
    priority = models.PositiveIntegerField(default=0, db_index=True)
    #: False while a message waits for its dispatches (to subscribers, made later).
    dispatches_ready = models.BooleanField(default=False, db_index=True)

    class Meta:
        verbose_name = "message"

    def __str__(self) -> str:
        return f"{self.cls} #{self.pk}"


class Dispatch(models.Model):
    """Delivery of one message to one address through one messenger."""

    class Status(models.IntegerChoices):
        # django-sitemessage's values, so its rows keep their meaning.
        PENDING = 1, "pending"
        PROCESSING = 5, "processing"
        SENT = 2, "sent"
        ERROR = 3, "error (will retry)"
        FAILED = 4, "failed"

    class ReadStatus(models.IntegerChoices):
        UNREAD = 0, "unread"
        READ = 1, "read"

    DISPATCH_STATUS_PENDING = Status.PENDING
    DISPATCH_STATUS_PROCESSING = Status.PROCESSING
    DISPATCH_STATUS_SENT = Status.SENT
    DISPATCH_STATUS_ERROR = Status.ERROR
    DISPATCH_STATUS_FAILED = Status.FAILED
    READ_STATUS_UNREAD = ReadStatus.UNREAD
    READ_STATUS_READ = ReadStatus.READ

    id = models.BigAutoField(primary_key=True)
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="dispatches")
    messenger = models.CharField(max_length=250, db_index=True)
    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    address = models.CharField(max_length=255)
    dispatch_status = models.PositiveIntegerField(choices=Status.choices, default=Status.PENDING)
    read_status = models.PositiveIntegerField(choices=ReadStatus.choices, default=ReadStatus.UNREAD)
    #: Delivery attempts started (a claim counts one), independent of the status.
    retry_count = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    #: Who is delivering the dispatch right now, and until when the claim holds.
    lease_owner = models.CharField(max_length=100, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    provider_message_id = models.CharField(max_length=255, blank=True)
    time_created = models.DateTimeField(default=timezone.now)
    #: When the last attempt ended (django-sitemessage's name).
    time_dispatched = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    #: The body rendered for this recipient, kept so a retry sends the same text; empty when
    #: the message type renders one body for all recipients (it is rendered again instead).
    message_cache = models.TextField(blank=True, default="")

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
            models.Index(
                fields=["dispatch_status", "next_attempt_at"], name="sm_dispatch_status_next"
            ),
            models.Index(
                fields=["dispatch_status", "lease_expires_at"], name="sm_dispatch_status_lease"
            ),
            models.Index(
                fields=["dispatch_status", "time_created"], name="sm_dispatch_status_created"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.messenger} dispatch #{self.pk} to {self.address} ({self.get_dispatch_status_display()})"


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

    id = models.BigAutoField(primary_key=True)
    dispatch = models.ForeignKey(Dispatch, on_delete=models.CASCADE, related_name="errors")
    attempt = models.PositiveIntegerField(default=0)
    exc_type = models.CharField("exception type", max_length=255, blank=True)
    error_log = models.TextField("error")
    time_created = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "dispatch error"
        ordering = ["pk"]

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.error_log[:80]}"


class Subscription(models.Model):
    """A user's (or an address's) subscription to a message type through a messenger."""

    id = models.BigAutoField(primary_key=True)
    time_created = models.DateTimeField(default=timezone.now)
    message_cls = models.CharField("message type", max_length=250, db_index=True)
    messenger_cls = models.CharField("messenger", max_length=250, db_index=True)
    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    address = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001 (as upstream)

    class Meta:
        verbose_name = "subscription"

    def __str__(self) -> str:
        return f"{self.recipient_id or self.address} to {self.message_cls} by {self.messenger_cls}"
