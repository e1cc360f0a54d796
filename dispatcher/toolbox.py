"""The producer API: ``schedule_messages()`` (and its ``.delay()``), ``recipients()``,
``send_test_message()``, and the per-app message type overrides
(``get_message_type_for_app()`` / ``override_message_type_for_app()``).

Everything is validated before anything is written: a call either stores the messages and all
their dispatches, or raises a ScheduleError and leaves no row behind. Delivery tasks are
published after commit through ``workers.broker``. ``.delay()`` is a transactional outbox: it
stores the validated call as one ScheduleRequest row in the caller's transaction and publishes
only that row's id after commit, for ``dispatcher.tasks.schedule_messages`` to expand in a worker.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from messengers.exceptions import ScheduleError
from messengers.registry import get_registered_messenger_object
from workers import broker

from . import conf, storing
from .messages import (
    MessageBase,
    PlainTextMessage,
    get_registered_message_type,
    get_registered_message_types,
)
from .models import Dispatch, Message, MessageTuple, ScheduleRequest
from .validation import (
    Recipient,
    check_priority,
    check_supported,
    check_user,
    checked_context,
    checked_recipients,
    recipients,  # the public name is toolbox.recipients()
    user_pk,
)

__all__ = [
    "_ALIAS_SEP",
    "_PREF_POST_KEY",
    "Recipient",
    "get_message_type_for_app",
    "override_message_type_for_app",
    "prepare_dispatches",
    "recipients",
    "schedule_messages",
    "send_test_message",
]

logger = logging.getLogger(__name__)

#: Separates the message type and messenger aliases of a subscription preference
#: ("<message type>|<messenger>"), as django-sitemessage does.
_ALIAS_SEP = "|"
#: Name of the POST field holding subscription preferences (django-sitemessage's).
_PREF_POST_KEY = "sm_user_pref"

#: app name -> {message type alias the app asks for: alias the project wants instead}.
_message_types_for_apps: dict[str, dict[str, str]] = defaultdict(dict)


def schedule(
    messages: Any,
    recipients: Iterable[Recipient] | None = None,
    sender: Any = None,
    priority: int | None = None,
    *,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
    publish: bool = True,
    expired_ok: bool = False,
) -> list[MessageTuple]:
    """Stores messages and one dispatch per recipient, then (after commit) enqueues one
    delivery task per messenger batch, unless ``publish`` is False (the caller delivers them
    itself; the sweep publishes them if it does not). Returns a MessageTuple (message,
    dispatches) per message; an empty recipient list stores nothing. Duplicate (messenger,
    address) pairs are sent once. Messages of at least SITEMESSAGE_URGENT_PRIORITY go to their
    messengers' urgent lanes.

    ``send_at``: not delivered before; a later one is not published now but by the first sweep
    after it. ``expires_at``: never delivered after; a dispatch still unsent then ends FAILED
    ("expired"). One already past is refused (see check_window), unless ``expired_ok`` (a
    .delay() call expanded late: its dispatches are stored, and fail as expired).

    Without recipients (None), each message is stored waiting for its dispatches, which
    prepare_dispatches() makes from its type's subscribers. A type with a ``group_mark`` goes
    through Message.create(), which merges it into an unsent message of its group to the same
    recipients."""
    message_objs, recipient_list, contexts = checked_call(messages, recipients, sender, priority)
    check_window(message_objs, recipients, send_at, expires_at, expired_ok=expired_ok)
    if recipients is not None and not recipient_list:
        return []

    check_publishing()
    created: list[MessageTuple] = []
    now = timezone.now()
    later = send_at is not None and send_at > now
    # A later dispatch waits for the sweep, which publishes what is due by next_attempt_at.
    next_attempt_at = send_at if later else now + republish_after()
    to_publish: list[tuple[int, str, int]] = []
    # One message to recipients is one atomic statement on PostgreSQL: no BEGIN, no COMMIT.
    alone = (
        recipients is not None
        and len(message_objs) == 1
        and not message_objs[0].group_mark
        and storing.atomic_alone()
    )
    with nullcontext() if alone else transaction.atomic():
        for message, context in zip(message_objs, contexts, strict=True):
            if recipients is None or message.group_mark:
                message.context = context
                message_model, dispatches = message.schedule(
                    None if recipients is None else recipient_list, sender, priority
                )
                created.append(MessageTuple(message_model, dispatches))
                to_publish += [(d.pk, d.messenger, message_model.priority) for d in dispatches]
                # Published below: the sweep need not publish them again at its next run.
                Dispatch.objects.filter(
                    pk__in=[d.pk for d in dispatches], next_attempt_at__isnull=True
                ).update(next_attempt_at=next_attempt_at)
                continue
            message_model = Message(
                cls=message.get_alias(),
                context=context,
                sender=sender,
                priority=message.priority if priority is None else priority,
                dispatches_ready=True,
            )
            dispatches = Dispatch.build(
                message_model,
                recipient_list,
                next_attempt_at,
                send_at=send_at,
                expires_at=expires_at,
            )
            storing.store(message_model, dispatches)
            if not later:
                to_publish += [(d.pk, d.messenger, message_model.priority) for d in dispatches]
            created.append(MessageTuple(message_model, dispatches))
        if publish and to_publish:
            transaction.on_commit(lambda: publish_dispatches(to_publish, doorbell=True))
    return created


def check_window(
    messages: Sequence[MessageBase],
    recipients: Iterable[Recipient] | None,
    send_at: Any,
    expires_at: Any,
    *,
    expired_ok: bool = False,
) -> None:
    """Raises ScheduleError naming the argument unless ``send_at`` and ``expires_at`` are None
    or datetimes Django can store (aware when USE_TZ is on, naive when it is off), and
    ``expires_at`` comes after ``send_at`` and (unless ``expired_ok``) after now: a message
    that may never be delivered is a mistake to report, not to store. The window belongs to
    dispatches, so it needs recipients now and a type without ``group_mark`` (a grouped
    message is merged into one whose dispatches have their own)."""
    if send_at is None and expires_at is None:
        return
    aware = settings.USE_TZ
    for name, value in (("send_at", send_at), ("expires_at", expires_at)):
        if value is None:
            continue
        if not isinstance(value, datetime):
            raise ScheduleError(f"{name} must be a datetime or None, got {type(value).__name__}")
        if timezone.is_aware(value) != aware:
            raise ScheduleError(
                f"{name} must be {'an aware' if aware else 'a naive'} datetime (USE_TZ is "
                f"{'on' if aware else 'off'}), got {value.isoformat()}"
                + (", e.g. timezone.now() + timedelta(hours=1)" if aware else "")
            )
    if send_at is not None and expires_at is not None and expires_at <= send_at:
        raise ScheduleError(
            f"expires_at ({expires_at.isoformat()}) must come after send_at ({send_at.isoformat()})"
        )
    if expires_at is not None and not expired_ok and expires_at <= timezone.now():
        raise ScheduleError(
            f"expires_at ({expires_at.isoformat()}) has passed: nothing would be delivered"
        )
    if recipients is None:
        raise ScheduleError("send_at and expires_at need recipients (not subscribers, later)")
    grouped = [m.get_alias() for m in messages if m.group_mark]
    if grouped:
        raise ScheduleError(
            f"send_at and expires_at cannot be given for message type {grouped[0]!r}, which "
            "has a group_mark (its messages are merged into one already scheduled)"
        )


class ScheduleMessages:
    """``schedule_messages(messages, recipients, sender=None, priority=None)`` schedules in
    this process and returns the (message, dispatches) pairs; ``.delay()`` (or
    ``.apply_async(args, kwargs, **options)``) validates the call, stores it in the caller's
    transaction and returns the AsyncResult of the task that a worker of the default queue
    runs after commit (nothing is published if the transaction rolls back)."""

    def __call__(
        self,
        messages: Any,
        recipients: Iterable[Recipient] | None = None,
        sender: Any = None,
        priority: int | None = None,
        *,
        send_at: datetime | None = None,
        expires_at: datetime | None = None,
    ) -> list[MessageTuple]:
        return schedule(
            messages, recipients, sender, priority, send_at=send_at, expires_at=expires_at
        )

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Any = (), kwargs: Any = None, **options: Any) -> Any:
        request = ScheduleRequest.objects.create(payload=encode_call(*args, **(kwargs or {})))
        task_id = str(options.pop("task_id", None) or uuid.uuid4())
        transaction.on_commit(lambda: publish_schedule_request(request.pk, task_id, options))
        return broker.result_of(task_id)


schedule_messages = ScheduleMessages()


def encode_call(
    messages: Any,
    recipients: Any = None,
    sender: Any = None,
    priority: int | None = None,
    *,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    """Validates and flattens a schedule_messages() call; raises before anything is published.
    The window travels as ISO 8601 text (with its UTC offset when aware)."""
    message_objs, recipient_list, _ = checked_call(messages, recipients, sender, priority)
    check_window(message_objs, recipients, send_at, expires_at)
    return {
        "messages": [m.to_wire() for m in message_objs],
        "recipients": None if recipients is None else [r.to_wire() for r in recipient_list],
        "sender": user_pk(sender),
        "priority": priority,
        "send_at": None if send_at is None else send_at.isoformat(),
        "expires_at": None if expires_at is None else expires_at.isoformat(),
    }


def publish_schedule_request(pk: int, task_id: str, options: dict[str, Any]) -> bool:
    """Publishes the id of a stored schedule request; an unreachable broker is logged, not
    raised (the caller's transaction has committed): the sweep expands the request later."""
    try:
        broker.publish_schedule_request(pk, task_id=task_id, **options)
    except broker.BROKER_ERRORS:
        logger.exception("could not publish schedule request %s; the sweep will expand it", pk)
        return False
    return True


def expand_schedule_request(pk: int) -> list[MessageTuple]:
    """Turns a stored schedule request into its messages and dispatches, and deletes it, in one
    transaction: a request is expanded once, however often its task arrives (deleting is the
    claim: a concurrent expansion deletes nothing and stops). A request that cannot be
    expanded (its message type is no longer registered, a messenger is gone) keeps its row
    with the reason, and the error is raised."""
    with transaction.atomic():
        request = ScheduleRequest.objects.filter(pk=pk, error="").first()
        if request is None or not ScheduleRequest.objects.filter(pk=pk, error="").delete()[0]:
            logger.info("schedule request %s: already expanded", pk)
            return []
        try:
            with transaction.atomic():
                return schedule_encoded(request.payload)
        except (ScheduleError, LookupError) as exc:
            request.error = f"{type(exc).__name__}: {exc}"
            request.save(force_insert=True)
            # The reason may name an address: it stays in the row, out of logs and results.
            reason = type(exc).__name__
    logger.error("schedule request %s cannot be expanded (%s); see its row", pk, reason)
    raise ScheduleError(f"schedule request {pk} cannot be expanded ({reason}); see its row")


def schedule_encoded(payload: dict[str, Any]) -> list[MessageTuple]:
    """Runs a call that encode_call() flattened (in the worker that received it)."""
    user_model = get_user_model()
    # None: to the subscribers (prepare_dispatches()).
    wired = payload["recipients"]
    pks = {r["user"] for r in wired or [] if r["user"] is not None}
    if payload["sender"] is not None:
        pks.add(payload["sender"])
    users = user_model._default_manager.in_bulk(list(pks))
    recipient_list = []
    for r in wired or []:
        if r["user"] is not None and r["user"] not in users:
            # Deleted since .delay(): the others still get the message.
            logger.warning(
                "%s recipient skipped: user %s no longer exists", r["messenger"], r["user"]
            )
            continue
        recipient_list.append(Recipient(r["messenger"], users.get(r["user"]), r["address"]))
    sender = users.get(payload["sender"])
    if payload["sender"] is not None and sender is None:
        logger.warning("scheduled without a sender: user %s no longer exists", payload["sender"])
    messages = [MessageBase.from_wire(m) for m in payload["messages"]]
    # Requests stored before send_at and expires_at existed have neither key.
    send_at, expires_at = (
        None if payload.get(key) is None else datetime.fromisoformat(payload[key])
        for key in ("send_at", "expires_at")
    )
    return schedule(
        messages,
        None if wired is None else recipient_list,
        sender,
        payload["priority"],
        send_at=send_at,
        expires_at=expires_at,
        expired_ok=True,  # the caller's transaction committed long ago: record the expiry
    )


def checked_call(
    messages: Any, recipients: Iterable[Recipient] | None, sender: Any, priority: Any
) -> tuple[list[MessageBase], list[Recipient], list[dict[str, Any]]]:
    """Validates a schedule_messages() call, for schedule() and for .delay() before it publishes;
    returns the messages, the deduplicated recipients and the messages' JSON contexts."""
    message_objs = as_messages(messages)
    recipient_list = checked_recipients(recipients)
    if sender is not None:
        check_user(sender, "sender")
    if priority is not None:
        check_priority(priority, "priority")
    for message in message_objs:
        check_priority(message.priority, f"priority of message type {message.get_alias()!r}")
        check_supported(type(message), recipient_list)
    return message_objs, recipient_list, [checked_context(m.context, type(m)) for m in message_objs]


def prepare_dispatches(limit: int | None = None, priority: int | None = None) -> list[Dispatch]:
    """Makes the dispatches of the messages scheduled without recipients, to their type's
    subscribers (MessageBase.prepare_dispatches()); returns them. The sweep runs it, then
    publishes them with the other due dispatches; cron may run it too (django-sitemessage's
    name and meaning).

    Each message is claimed by flipping its ``dispatches_ready`` in its own transaction, so two
    processes running this at once never make a message's dispatches twice, and a message with
    no subscribers is marked ready rather than scanned again on every run. A subscriber whose
    address its messenger refuses is left out (logged by id), not the whole message; a message
    whose type is not registered here is not scanned: it waits for a process that knows it.
    ``priority``: only messages of that priority (``sitemessage_send_scheduled --priority``)."""
    types = get_registered_message_types()
    # Only types known here: waiting messages of other types must not fill every run's limit.
    waiting = Message.objects.filter(dispatches_ready=False, cls__in=list(types)).order_by("pk")
    if priority is not None:
        waiting = waiting.filter(priority=priority)
    pks = list(waiting.values_list("pk", flat=True)[:limit])
    subscribers: dict[str, list[Recipient]] = {}
    created: list[Dispatch] = []
    for pk in pks:
        with transaction.atomic():
            message = Message.objects.select_for_update().filter(pk=pk, dispatches_ready=False)
            message_model = message.first()
            if message_model is None:  # another process took it
                continue
            message_type = types[message_model.cls]
            if message_model.cls not in subscribers:
                subscribers[message_model.cls] = _deliverable(message_type)
            dispatches = message_type.prepare_dispatches(
                message_model, subscribers[message_model.cls]
            )
            message.update(dispatches_ready=True)
            created.extend(dispatches)
    return created


def _deliverable(message_type: type[MessageBase]) -> list[Recipient]:
    """The subscribers of a type that its messengers accept."""
    result = []
    for recipient in message_type.get_subscribers():
        try:
            check_supported(message_type, [recipient])
            checked_recipients(recipient)
        except ScheduleError as exc:
            user = user_pk(recipient.user)
            logger.warning(
                "%s subscriber left out (user %s): %s",
                message_type.get_alias(),
                user,
                type(exc).__name__,
            )
            continue
        result.append(recipient)
    return result


def send_test_message(messenger: str, to: str | None = None) -> Any:
    """Sends a test message through a registered messenger, in this process; raises on failure."""
    messenger_obj = get_registered_messenger_object(messenger)
    return messenger_obj.send_test_message(to, "Test message from sitemessage.")  # type: ignore[arg-type]


def override_message_type_for_app(
    app_name: str, app_message_type_alias: str, new_message_type_alias: str
) -> None:
    """Makes ``get_message_type_for_app(app_name, app_message_type_alias)`` return the message
    type registered as ``new_message_type_alias``: how a project replaces the message type a
    reusable app sends. The new type is looked up when the app asks for it, so it may be
    registered later; raises TypeError for an argument that is not a non-empty string."""
    for name, value in (
        ("app_name", app_name),
        ("app_message_type_alias", app_message_type_alias),
        ("new_message_type_alias", new_message_type_alias),
    ):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string, got {value!r}")
    _message_types_for_apps[app_name][app_message_type_alias] = new_message_type_alias


def get_message_type_for_app(app_name: str, default_message_type_alias: str) -> type[MessageBase]:
    """Returns the message type an app should use for ``default_message_type_alias``: the one
    a project set with override_message_type_for_app(), else the default itself. Raises
    UnknownMessageTypeError when the resulting alias is not registered."""
    alias = _message_types_for_apps.get(app_name, {}).get(
        default_message_type_alias, default_message_type_alias
    )
    return get_registered_message_type(alias)


def publish_dispatches(
    rows: Iterable[tuple[int, str] | tuple[int, str, int]], doorbell: bool = False
) -> list[int]:
    """Publishes stored (dispatch id, messenger alias[, message priority]) rows, in batches per
    messenger and lane: the urgent lane for a priority of at least SITEMESSAGE_URGENT_PRIORITY
    (published first), else the normal one, also for a row without a priority. Returns the ids
    it could not publish (the broker is down: they stay pending for the sweep).

    ``doorbell`` (newly scheduled rows of the normal lane): publish nothing for a messenger
    whose doorbell is pending (SITEMESSAGE_DOORBELL_SECONDS, see workers.broker). An urgent row
    always gets its task: a worker claims waiting rows oldest first, so one left to a doorbell
    would wait behind a backlog of the normal lane. The sweep and the admin publish rows whose
    task may be lost, so they always publish."""
    urgent: dict[str, list[int]] = defaultdict(list)
    normal: dict[str, list[int]] = defaultdict(list)
    for pk, alias, *priority in rows:
        (urgent if priority and is_urgent(priority[0]) else normal)[alias].append(pk)
    batch_size = conf.BATCH_SIZE.get()
    seconds = conf.DOORBELL_SECONDS.get() if doorbell else 0
    unpublished = []
    if urgent:
        unpublished += broker.enqueue(urgent, batch_size, urgent=True)
    if normal:
        unpublished += broker.enqueue(normal, batch_size, doorbell=seconds)
    return unpublished


def check_publishing() -> None:
    """Reads the settings publish_dispatches() uses after commit, so that a bad one raises
    before anything is written rather than leaving stored dispatches unpublished."""
    conf.BATCH_SIZE.get()
    conf.URGENT_PRIORITY.get()


def is_urgent(priority: int) -> bool:
    """Whether messages of this priority take their messenger's urgent lane."""
    threshold = conf.URGENT_PRIORITY.get()
    return threshold is not None and priority >= threshold


def republish_after() -> timedelta:
    """How long a published dispatch may wait in its queue before the sweep publishes it again."""
    return timedelta(seconds=conf.REPUBLISH_AFTER.get())


def as_messages(messages: Any) -> list[MessageBase]:
    items = messages if isinstance(messages, list | tuple) else [messages]
    if not items:
        raise ScheduleError("no message given")
    result = []
    for item in items:
        if isinstance(item, str):
            item = PlainTextMessage(item)
        if not isinstance(item, MessageBase):
            raise ScheduleError(
                f"a message must be a str or a MessageBase instance, got {type(item).__name__}"
            )
        registered = get_registered_message_type(item.get_alias())
        if not isinstance(item, registered):
            raise ScheduleError(
                f"message type {item.get_alias()!r} is registered for {registered.__name__}, "
                f"not {type(item).__name__}"
            )
        result.append(item)
    return result
