"""Messages, their dispatches (one per recipient and messenger) and the dispatches' error log.

The database is the source of truth: a dispatch's row says whether it was sent, is being sent
(and by whom, until when), must be retried (and when), or has failed for good.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from django.conf import settings
from django.db import models, transaction
from django.db.models import QuerySet
from django.utils import timezone

from messengers.base import alias_of
from messengers.exceptions import ScheduleError
from messengers.registry import get_registered_messenger_object

from .links import Link, address_digest
from .types import get_registered_message_type
from .validation import (
    check_priority,
    check_supported,
    check_user,
    checked_context,
    checked_recipients,
)

if TYPE_CHECKING:
    from .messages import MessageBase

#: The label of the user model that senders and recipients are (django-sitemessage's name).
USER_MODEL: str = settings.AUTH_USER_MODEL


class MessageTuple(NamedTuple):
    """A message and its dispatches: what Message.create() returns (django-sitemessage's)."""

    message: Message
    dispatches: list[Dispatch]


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
        return self.cls

    @property
    def dispatch_set(self) -> Any:
        """django-sitemessage's name of ``dispatches`` (its Dispatch.message had no related
        name); lookups across the relation use ``dispatches__``."""
        return self.dispatches

    def get_type(self) -> type[MessageBase]:
        """Returns the registered message type of this message.

        Raises UnknownMessageTypeError when ``cls`` is not registered (any more)."""
        return get_registered_message_type(self.cls)

    @classmethod
    def get_without_dispatches(cls) -> QuerySet[Message]:
        """Returns the messages waiting for their dispatches: scheduled without recipients,
        they get them from their type's subscribers (prepare_dispatches())."""
        return cls.objects.filter(dispatches_ready=False)

    @classmethod
    def create(
        cls,
        message_class: str,
        context: dict[str, Any],
        recipients: Any = None,
        sender: Any = None,
        priority: int | None = None,
        group_mark: str = "",
        context_merge_hook: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
        | None = None,
    ) -> MessageTuple:
        """Stores a message and its dispatches (django-sitemessage's ``Message.create``);
        returns a MessageTuple ``(message, dispatches)``. Without recipients the message waits for its
        dispatches (made later from the subscribers). Dispatches are delivered by the next
        sweep. With a ``group_mark``, the new context is merged (``context_merge_hook(old,
        new)``, default: the new one replaces the old) into a stored message of the same type,
        mark and sender whose dispatches all wait, never tried, and go to exactly the same
        recipients; otherwise a new message is stored.

        Raises ScheduleError (InvalidAddressError, InvalidContextError, UnknownMessengerError)
        for bad input before anything is written."""
        _check_text(message_class, "message_class")
        _check_text(group_mark, "group_mark", allow_empty=True)
        message_type = get_registered_message_type(message_class)
        checked_context(context, message_type)
        if sender is not None:
            check_user(sender, "sender")
        if priority is not None:
            check_priority(priority)
        wanted = None if recipients is None else checked_recipients(recipients)
        check_supported(message_type, wanted or [])
        with transaction.atomic():
            grouped = group_mark and cls._merge_into_group(
                message_class, context, wanted, sender, group_mark, context_merge_hook
            )
            if grouped:
                return MessageTuple(*grouped)
            message = cls.objects.create(
                cls=message_class,
                context=context,
                sender=sender,
                group_mark=group_mark,
                dispatches_ready=wanted is not None,
                **({} if priority is None else {"priority": priority}),
            )
            return MessageTuple(message, [] if wanted is None else Dispatch.create(message, wanted))

    @classmethod
    def _merge_into_group(
        cls,
        message_class: str,
        context: dict[str, Any],
        wanted: list[Any] | None,
        sender: Any,
        group_mark: str,
        hook: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None,
    ) -> tuple[Message, list[Dispatch]] | None:
        """Merges ``context`` into a matching unsent message of the group, if there is one.
        Runs inside create()'s transaction; the message and its dispatches are locked (on
        databases that lock rows) so a worker cannot claim them half-merged.

        Raises InvalidContextError when the merged context is not storable."""
        candidates = cls.objects.select_for_update().filter(
            cls=message_class,
            group_mark=group_mark,
            sender=sender,
            dispatches_ready=wanted is not None,
        )
        if wanted is not None:
            # Only messages no dispatch of which was ever tried: a retried one may have reached
            # its recipient already. Per candidate, so a group's sent history is not scanned.
            own = Dispatch.objects.filter(message=models.OuterRef("pk"))
            candidates = candidates.filter(models.Exists(own)).exclude(
                models.Exists(own.exclude(_UNTRIED))
            )
        wanted_keys = None if wanted is None else {(r.messenger, r.address) for r in wanted}
        for message in candidates.order_by("-pk"):
            dispatches = list(message.dispatches.select_for_update().order_by("pk"))
            unsent = all(
                d.dispatch_status == Dispatch.Status.PENDING and not d.retry_count
                for d in dispatches
            )
            keys = {(d.messenger, d.address) for d in dispatches} if dispatches else None
            if unsent and keys == wanted_keys:
                merged = (hook or (lambda _old, new: new))(message.context, context)
                message.context = checked_context(
                    merged, get_registered_message_type(message_class)
                )
                message.save(update_fields=["context"])
                message.dispatches.update(message_cache="")
                return message, dispatches
        return None


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
    #: django-sitemessage's choices: (value, label) pairs, in its order.
    DISPATCH_STATUSES = tuple(Status.choices)
    READ_STATUSES = tuple(ReadStatus.choices)

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
    #: The Celery task that claimed the dispatch last ("" when delivered in-process): the
    #: admin links it to Flower.
    task_id = models.CharField(max_length=255, blank=True, default="")
    provider_message_id = models.CharField(max_length=255, blank=True)
    time_created = models.DateTimeField(default=timezone.now)
    #: When the last attempt ended (django-sitemessage's name).
    time_dispatched = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    #: The body rendered for this recipient, kept so a retry sends the same text; empty when
    #: the message type renders one body for all recipients (it is rendered again instead).
    message_cache = models.TextField(blank=True, default="")
    #: Not delivered before this moment (None: at once); the sweep publishes it when due.
    send_at = models.DateTimeField(null=True, blank=True)
    #: Never delivered after this moment: a dispatch still unsent then ends FAILED ("expired").
    expires_at = models.DateTimeField(null=True, blank=True)

    #: Set by the messenger's mark_*() calls during a batch; never stored as such.
    outcome: Any = None
    #: Upstream's in-memory error text, stored by log_dispatches_errors(); never a column.
    error_log: str | None = None
    #: True while ``message_cache`` holds the body shared by the message's recipients (in
    #: memory only: one string for the whole batch, not stored per dispatch).
    body_shared: bool = False
    #: The recipient's https unsubscribe URL while a batch is sent (List-Unsubscribe); in
    #: memory only, set by the pipeline for types one can unsubscribe from.
    unsubscribe_url: str = ""

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
            # The sweep: pending and error rows past their expires_at.
            models.Index(
                fields=["dispatch_status", "expires_at"], name="sm_dispatch_status_expires"
            ),
            # A worker's claim: the waiting rows of its messenger oldest first, and the rows
            # held for its run. Partial, so they hold only rows in those states: every row has
            # one of a few messengers, and with the messenger index PostgreSQL's planner went
            # through every row ever sent (2 ms a claim after a busy hour, growing with the
            # table). A SENT mark writes neither.
            models.Index(
                fields=["messenger", "id"],
                condition=models.Q(dispatch_status=1),  # Status.PENDING
                name="sm_dispatch_pending",
            ),
            models.Index(
                fields=["messenger"],
                condition=models.Q(dispatch_status=5),  # Status.PROCESSING
                name="sm_dispatch_processing",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.address} [{self.messenger}]"

    def is_read(self) -> bool:
        """Tells whether the recipient has read the message (its read link was opened)."""
        return self.read_status == self.ReadStatus.READ

    def mark_read(self) -> None:
        """Marks the dispatch read, in memory only: the caller saves it (as upstream)."""
        self.read_status = self.ReadStatus.READ

    @classmethod
    def get_unread(cls) -> QuerySet[Dispatch]:
        """Returns the unread dispatches, with their messages."""
        return cls.objects.filter(read_status=cls.ReadStatus.UNREAD).select_related("message")

    @classmethod
    def get_unsent(cls, priority: int | None = None) -> QuerySet[Dispatch]:
        """Returns the dispatches neither sent nor given up on (pending, or waiting for a
        retry), of messages of ``priority`` if given, with their messages, oldest first.
        Unlike django-sitemessage's, it claims nothing: the rows stay as they are, for the
        workers (send_scheduled_messages() delivers the due ones in this process).

        Raises ScheduleError for a priority no message can have."""
        unsent = cls.objects.filter(dispatch_status__in=[cls.Status.PENDING, cls.Status.ERROR])
        if priority is not None:
            check_priority(priority)
            unsent = unsent.filter(message__priority=priority)
        return unsent.select_related("message").order_by("pk")

    @staticmethod
    def group_by_messengers(dispatches: Iterable[Dispatch]) -> dict[str, dict[int, MessageTuple]]:
        """Groups dispatches by messenger alias, then by message id, in the order they come:
        ``{alias: {message id: MessageTuple(message, [dispatch, ...])}}`` (django-sitemessage's
        shape)."""
        grouped: dict[str, dict[int, MessageTuple]] = {}
        for dispatch in dispatches:
            by_message = grouped.setdefault(dispatch.messenger, {})
            if dispatch.message_id not in by_message:
                by_message[dispatch.message_id] = MessageTuple(dispatch.message, [])
            by_message[dispatch.message_id].dispatches.append(dispatch)
        return grouped

    @classmethod
    def store(
        cls,
        message_model: Message,
        recipients: Iterable[Any],
        next_attempt_at: Any = None,
        *,
        send_at: Any = None,
        expires_at: Any = None,
    ) -> list[Dispatch]:
        """Stores one pending dispatch per (checked) recipient of a saved message, in bulk;
        returns them with ids. ``next_attempt_at``: when the sweep may publish them again
        (None: at its next run); ``send_at`` and ``expires_at`` (checked): their window."""
        return Dispatch.objects.bulk_create(
            cls.build(
                message_model, recipients, next_attempt_at, send_at=send_at, expires_at=expires_at
            ),
            batch_size=500,
        )

    @classmethod
    def build(
        cls,
        message_model: Message,
        recipients: Iterable[Any],
        next_attempt_at: Any = None,
        *,
        send_at: Any = None,
        expires_at: Any = None,
    ) -> list[Dispatch]:
        """The unsaved dispatches store() writes (all created at the same moment)."""
        now = timezone.now()
        return [
            Dispatch(
                message=message_model,
                messenger=r.messenger,
                recipient=r.user,
                address=r.address,
                next_attempt_at=next_attempt_at,
                send_at=send_at,
                expires_at=expires_at,
                time_created=now,
            )
            for r in recipients
        ]

    @classmethod
    def create(cls, message_model: Message, recipients: Any) -> list[Dispatch]:
        """Stores one pending dispatch per recipient (a ``Recipient``, or a list of them) of a
        saved message, which is then marked ``dispatches_ready``; returns the dispatches
        (with ids). A (messenger, address) pair given twice is stored once. The next sweep
        publishes them for delivery.

        Raises ScheduleError (UnknownMessengerError, InvalidAddressError) for a bad recipient
        or an unsaved message, before anything is written."""
        if message_model.pk is None:
            raise ScheduleError(f"message {message_model!r} is not saved")
        checked = checked_recipients(recipients)
        with transaction.atomic():
            dispatches = cls.store(message_model, checked)
            if checked and not message_model.dispatches_ready:
                message_model.dispatches_ready = True
                message_model.save(update_fields=["dispatches_ready"])
        return dispatches

    @classmethod
    def log_dispatches_errors(cls, dispatches: Iterable[Dispatch]) -> list[DispatchError]:
        """Stores one error row per dispatch, from its ``error_log`` attribute (upstream's
        name) or else its messenger outcome's error, and the dispatches' ``message_cache``;
        returns the error rows.

        Raises ValueError, before anything is written, for an unsaved dispatch or one with no
        error text."""
        dispatches = list(dispatches)
        entries = [
            DispatchError(
                dispatch=d, attempt=d.retry_count, exc_type=d._error_type(), error_log=d._error()
            )
            for d in dispatches
        ]
        with transaction.atomic():
            Dispatch.objects.bulk_update(dispatches, ["message_cache"], batch_size=500)
            return DispatchError.objects.bulk_create(entries, batch_size=500)

    def _error(self) -> str:
        """The error text of this dispatch's failed attempt; raises ValueError if none."""
        error = self.error_log
        if error is None and self.outcome is not None:
            error = self.outcome.error
        if self.pk is None or error is None or not str(error):
            raise ValueError(f"dispatch {self.pk} is unsaved or has no error_log to store")
        return str(error)

    def _error_type(self) -> str:
        error = getattr(self.outcome, "error", None) if self.error_log is None else None
        return type(error).__name__ if isinstance(error, BaseException) else ""

    @classmethod
    def set_dispatches_statuses(cls, **statuses: Iterable[Dispatch]) -> int:
        """Stores statuses in bulk: ``sent=[...], error=[...], failed=[...], pending=[...]``
        (upstream's keys). Each row gets the status, ``time_dispatched`` (now) and one more
        ``retry_count``, and loses its lease; error and pending rows are due at the next sweep.
        Returns the number of rows updated.

        Raises ValueError for an unknown key, before anything is written."""
        unknown = set(statuses) - set(_STATUS_KEYS)
        if unknown:
            raise ValueError(
                f"unknown dispatch status key(s) {sorted(unknown)}; expected {list(_STATUS_KEYS)}"
            )
        now, updated = timezone.now(), 0
        with transaction.atomic():
            for key, dispatches in statuses.items():
                status = _STATUS_KEYS[key]
                updated += cls.objects.filter(pk__in=[d.pk for d in dispatches]).update(
                    dispatch_status=status,
                    time_dispatched=now,
                    retry_count=models.F("retry_count") + 1,
                    lease_owner="",
                    lease_expires_at=None,
                    next_attempt_at=None,
                    **({"sent_at": now} if status == cls.Status.SENT else {}),
                )
        return updated


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
        return f"Dispatch ID {self.dispatch_id} error entry"

    @classmethod
    def expired(
        cls, dispatch_id: int, attempt: int, expires_at: datetime, now: datetime
    ) -> DispatchError:
        """The (unsaved) entry of a dispatch failed unsent because its ``expires_at`` passed;
        the claim and the sweep both write it, so an operator sees one reason either way."""
        return cls(
            dispatch_id=dispatch_id,
            attempt=attempt,
            exc_type=EXPIRED,
            error_log=f"expired: not sent by its expires_at, {expires_at.isoformat()}",
            time_created=now,
        )


#: exc_type of the entry of a dispatch that expired unsent.
EXPIRED = "Expired"


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
        constraints = [
            # django-sitemessage had none: a doubled row sent a subscriber every message twice.
            models.UniqueConstraint(
                fields=["message_cls", "messenger_cls", "recipient"],
                condition=models.Q(recipient__isnull=False),
                name="sm_subscription_unique_user",
            ),
            models.UniqueConstraint(
                fields=["message_cls", "messenger_cls", "address"],
                condition=models.Q(recipient__isnull=True),
                name="sm_subscription_unique_address",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.recipient_id or self.address} [{self.message_cls} - {self.messenger_cls}]"

    @classmethod
    def get_for_user(cls, user: Any) -> QuerySet[Subscription]:
        """Returns a user's subscriptions (none for an unsaved user)."""
        if user.pk is None:
            return cls.objects.none()
        return cls.objects.filter(recipient_id=user.pk)

    @classmethod
    def get_for_message_cls(cls, message_cls: str) -> QuerySet[Subscription]:
        """Returns the subscriptions to a message type alias, with their users."""
        return cls.objects.select_related("recipient").filter(message_cls=message_cls)

    @classmethod
    def replace_for_user(cls, user: Any, prefs: Iterable[tuple[Any, Any]]) -> bool:
        """Replaces a user's subscriptions with ``prefs``, pairs of (message type or alias,
        messenger or alias); a pair given twice is stored once. Returns False (and changes
        nothing) for an unsaved user.

        Raises ScheduleError (UnknownMessengerError) for a bad pair, before anything is
        written."""
        if user.pk is None:
            return False
        rows = {tuple(cls._base_kwargs(user, *pref).items()): None for pref in prefs}
        with transaction.atomic():
            cls.objects.filter(recipient_id=user.pk).delete()
            Subscription.objects.bulk_create([Subscription(**dict(row)) for row in rows])
        return True

    @classmethod
    def create(cls, uid_or_address: Any, message_cls: Any, messenger_cls: Any) -> Subscription:
        """Subscribes a user (object or id) or an address to a message type (or alias) through
        a messenger (or alias); an existing identical subscription is returned, not doubled.

        Subscribing again undoes an earlier unsubscribe (the recipient's OptOut).

        Raises ScheduleError (UnknownMessengerError) for a bad argument, before writing."""
        kwargs = cls._base_kwargs(uid_or_address, message_cls, messenger_cls)
        with transaction.atomic():
            OptOut.forget(kwargs)
            existing = cls.objects.filter(**kwargs).order_by("pk").first()
            return existing or cls.objects.create(**kwargs)

    @classmethod
    def cancel(cls, uid_or_address: Any, message_cls: Any, messenger_cls: Any) -> int:
        """Removes a recipient's subscriptions to a message type through a messenger; returns
        how many there were.

        Raises ScheduleError for a bad argument."""
        kwargs = cls._base_kwargs(uid_or_address, message_cls, messenger_cls, registered=False)
        return cls.objects.filter(**kwargs).delete()[0]

    @staticmethod
    def _base_kwargs(
        recipient: Any, message_cls: Any, messenger_cls: Any, registered: bool = True
    ) -> dict[str, Any]:
        """The columns naming a subscription. A messenger must be registered unless
        ``registered`` is False (cancelling one that is gone must work).

        Raises ScheduleError for a bad recipient, type or messenger."""
        if registered:
            get_registered_messenger_object(messenger_cls)
        message_alias = message_cls if isinstance(message_cls, str) else message_cls.get_alias()
        kwargs: dict[str, Any] = {
            "message_cls": _check_text(message_alias, "message type"),
            "messenger_cls": _check_text(alias_of(messenger_cls), "messenger"),
        }
        if isinstance(recipient, str):
            kwargs["address"] = _check_text(recipient, "address")
        elif isinstance(recipient, int) and not isinstance(recipient, bool) and recipient > 0:
            kwargs["recipient_id"] = recipient
        else:
            check_user(recipient, "subscriber")
            kwargs["recipient_id"] = recipient.pk
        return kwargs


class OptOut(models.Model):
    """A recipient who unsubscribed from a message type through a messenger: nothing of that
    type is sent to them through it any more, even when addressed explicitly (the dispatch
    fails with reason "unsubscribed"). Holds a digest of the address, not the address."""

    id = models.BigAutoField(primary_key=True)
    time_created = models.DateTimeField(default=timezone.now)
    message_cls = models.CharField("message type", max_length=250)
    messenger_cls = models.CharField("messenger", max_length=250)
    #: links.address_digest() of the address the unsubscribe link was sent to.
    address_digest = models.CharField(max_length=64)
    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )

    class Meta:
        verbose_name = "opt-out"
        constraints = [
            models.UniqueConstraint(
                fields=["message_cls", "messenger_cls", "address_digest"],
                name="sm_optout_unique_address",
            ),
        ]
        indexes = [
            models.Index(
                fields=["message_cls", "messenger_cls", "recipient"], name="sm_optout_user"
            )
        ]

    def __str__(self) -> str:
        return f"opt-out [{self.message_cls} - {self.messenger_cls}]"

    @classmethod
    def record(cls, link: Link) -> None:
        """Unsubscribes the recipient of a valid unsubscribe link: removes their subscriptions
        to the link's message type through its messenger and records the opt-out (once)."""
        pair = {"message_cls": link.message_type, "messenger_cls": link.messenger}
        with transaction.atomic():
            subscriptions = Subscription.objects.filter(**pair)
            if link.recipient_id is not None:
                subscriptions.filter(recipient_id=link.recipient_id).delete()
            by_address = subscriptions.filter(recipient__isnull=True, address__isnull=False)
            doomed = [
                pk
                for pk, address in by_address.values_list("pk", "address").iterator()
                if address_digest(address or "") == link.address_digest
            ]
            Subscription.objects.filter(pk__in=doomed).delete()
            cls.objects.update_or_create(
                message_cls=link.message_type,
                messenger_cls=link.messenger,
                address_digest=link.address_digest,
                defaults={"recipient_id": link.recipient_id},
            )

    @classmethod
    def forget(cls, subscription: dict[str, Any]) -> int:
        """Removes the opt-outs a new subscription (its columns) undoes; returns how many."""
        pair = {k: subscription[k] for k in ("message_cls", "messenger_cls")}
        if subscription.get("recipient_id") is not None:
            doomed = cls.objects.filter(**pair, recipient_id=subscription["recipient_id"])
        else:
            doomed = cls.objects.filter(
                **pair, address_digest=address_digest(subscription["address"])
            )
        return doomed.delete()[0]

    @classmethod
    def opted_out(cls, dispatches: list[Dispatch]) -> set[int]:
        """The ids of those dispatches whose recipient unsubscribed from their message type
        through their messenger (one query)."""
        if not dispatches:
            return set()
        users = {d.recipient_id for d in dispatches if d.recipient_id is not None}
        digests = {d.pk: address_digest(d.address) for d in dispatches}
        rows = cls.objects.filter(
            message_cls__in={d.message.cls for d in dispatches},
            messenger_cls__in={d.messenger for d in dispatches},
        ).filter(
            models.Q(address_digest__in=set(digests.values())) | models.Q(recipient_id__in=users)
        )
        keys = set()
        for message_cls, messenger_cls, recipient_id, digest in rows.values_list(
            "message_cls", "messenger_cls", "recipient_id", "address_digest"
        ):
            keys.add((message_cls, messenger_cls, digest))
            if recipient_id is not None:
                keys.add((message_cls, messenger_cls, recipient_id))
        return {
            d.pk
            for d in dispatches
            if (d.message.cls, d.messenger, digests[d.pk]) in keys
            or (d.message.cls, d.messenger, d.recipient_id) in keys
        }


#: A dispatch never tried: pending, and never claimed (a claim counts an attempt).
_UNTRIED = models.Q(dispatch_status=Dispatch.Status.PENDING, retry_count=0)

_STATUS_KEYS = {
    "sent": Dispatch.Status.SENT,
    "error": Dispatch.Status.ERROR,
    "failed": Dispatch.Status.FAILED,
    "pending": Dispatch.Status.PENDING,
}


def _check_text(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or not (value or allow_empty):
        raise ScheduleError(f"{what} must be a non-empty string, got {value!r:.100}")
    return value
