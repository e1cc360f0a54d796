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
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db import models, transaction
from django.utils import timezone

from messengers.base import MessengerBase, alias_of
from messengers.exceptions import InvalidAddressError, ScheduleError
from messengers.registry import get_registered_messenger_object
from workers import broker

from . import conf
from .messages import MessageBase, PlainTextMessage, get_registered_message_type
from .models import Dispatch, Message, ScheduleRequest
from .validation import (
    Recipient,
    check_priority,
    check_user,
    checked_context,
    checked_recipients,
    user_pk,
)

logger = logging.getLogger(__name__)

#: Separates the message type and messenger aliases of a subscription preference
#: ("<message type>|<messenger>"), as django-sitemessage does.
_ALIAS_SEP = "|"
#: Name of the POST field holding subscription preferences (django-sitemessage's).
_PREF_POST_KEY = "sm_user_pref"

#: app name -> {message type alias the app asks for: alias the project wants instead}.
_message_types_for_apps: dict[str, dict[str, str]] = defaultdict(dict)


def recipients(
    messenger: str | type[MessengerBase] | MessengerBase, addresses_or_users: Any
) -> list[Recipient]:
    """Builds the recipient list of one messenger from addresses and user objects.
    Lists from several calls can be added together."""
    messenger_obj = get_registered_messenger_object(messenger)
    alias = alias_of(messenger_obj)
    if isinstance(addresses_or_users, str | models.Model) or not isinstance(
        addresses_or_users, Iterable
    ):
        addresses_or_users = [addresses_or_users]
    result = []
    for item in addresses_or_users:
        user = item if isinstance(item, models.Model) else None
        if user is not None:
            check_user(user, "recipient")
        address = messenger_obj.get_address(item)
        if not isinstance(address, str) or (user is not None and not address):
            what = f"user {user!r} (pk {user.pk})" if user is not None else repr(item)[:100]
            raise InvalidAddressError(f"messenger {alias!r}: {what} has no address for it")
        result.append(Recipient(alias, user, address))
    for recipient in result:
        messenger_obj.validate_address(recipient.address)
    return result


def schedule(
    messages: Any,
    recipients: Iterable[Recipient] | None = None,
    sender: Any = None,
    priority: int | None = None,
    *,
    publish: bool = True,
) -> list[tuple[Message, list[Dispatch]]]:
    """Stores messages and one dispatch per recipient, then (after commit) enqueues one
    delivery task per messenger batch, unless ``publish`` is False (the caller delivers them
    itself; the sweep publishes them if it does not). Returns the (message, dispatches) pairs;
    an empty recipient list stores nothing. Duplicate (messenger, address) pairs are sent once."""
    message_objs, recipient_list, contexts = checked_call(messages, recipients, sender, priority)
    if not recipient_list:
        return []

    created = []
    batch_size = conf.BATCH_SIZE.get()
    next_attempt_at = timezone.now() + republish_after()
    ids_by_messenger: dict[str, list[int]] = defaultdict(list)
    with transaction.atomic():
        for message, context in zip(message_objs, contexts, strict=True):
            message_model = Message.objects.create(
                cls=message.get_alias(),
                context=context,
                sender=sender,
                priority=message.priority if priority is None else priority,
                dispatches_ready=True,
            )
            dispatches = Dispatch.store(message_model, recipient_list, next_attempt_at)
            for dispatch in dispatches:
                ids_by_messenger[dispatch.messenger].append(dispatch.pk)
            created.append((message_model, dispatches))
        if publish:
            transaction.on_commit(lambda: broker.enqueue(ids_by_messenger, batch_size))
    return created


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
    ) -> list[tuple[Message, list[Dispatch]]]:
        return schedule(messages, recipients, sender, priority)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Any = (), kwargs: Any = None, **options: Any) -> Any:
        request = ScheduleRequest.objects.create(payload=encode_call(*args, **(kwargs or {})))
        task_id = str(options.pop("task_id", None) or uuid.uuid4())
        transaction.on_commit(lambda: publish_schedule_request(request.pk, task_id, options))
        return broker.result_of(task_id)


schedule_messages = ScheduleMessages()


def encode_call(
    messages: Any, recipients: Any = None, sender: Any = None, priority: int | None = None
) -> dict[str, Any]:
    """Validates and flattens a schedule_messages() call; raises before anything is published."""
    message_objs, recipient_list, _ = checked_call(messages, recipients, sender, priority)
    return {
        "messages": [m.to_wire() for m in message_objs],
        "recipients": [r.to_wire() for r in recipient_list],
        "sender": user_pk(sender),
        "priority": priority,
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


def expand_schedule_request(pk: int) -> list[tuple[Message, list[Dispatch]]]:
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


def schedule_encoded(payload: dict[str, Any]) -> list[tuple[Message, list[Dispatch]]]:
    """Runs a call that encode_call() flattened (in the worker that received it)."""
    user_model = get_user_model()
    pks = {r["user"] for r in payload["recipients"] if r["user"] is not None}
    if payload["sender"] is not None:
        pks.add(payload["sender"])
    users = user_model._default_manager.in_bulk(list(pks))
    recipient_list = []
    for r in payload["recipients"]:
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
    return schedule(messages, recipient_list, sender, payload["priority"])


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
    return message_objs, recipient_list, [checked_context(m.context, type(m)) for m in message_objs]


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


def publish_dispatches(rows: Iterable[tuple[int, str]]) -> list[int]:
    """Publishes stored (dispatch id, messenger alias) pairs again, in batches; returns the ids
    it could not publish (the broker is down: they stay pending for the sweep)."""
    ids_by_messenger: dict[str, list[int]] = defaultdict(list)
    for pk, alias in rows:
        ids_by_messenger[alias].append(pk)
    return broker.enqueue(ids_by_messenger, conf.BATCH_SIZE.get())


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
