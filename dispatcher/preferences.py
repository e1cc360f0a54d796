"""Users' subscription preferences for a web page: the table that ``{% sitemessage_prefs_table %}``
renders (``get_user_preferences_for_ui``) and the form post that stores what the user ticked
(``set_user_preferences_from_request``), with django-sitemessage's names and return shapes.

A preference is ``"<message type alias>|<messenger alias>"`` (``toolbox._ALIAS_SEP``), posted as
``sm_user_pref`` (``toolbox._PREF_POST_KEY``). Only pairs a user may choose are offered and
accepted: both sides allow user subscription and the type supports the messenger. A post with
any other value is refused whole (``BadRequest``: Django answers 400) before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.core.exceptions import BadRequest
from django.db import transaction
from django.http import HttpRequest

from messengers.base import MessengerBase
from messengers.registry import get_registered_messenger_objects

from .messages import MessageBase, get_registered_message_types
from .models import OptOut, Subscription
from .toolbox import _ALIAS_SEP, _PREF_POST_KEY

#: One cell of the table: (preference alias or "", the pair is offered, the user is subscribed).
PrefCell = tuple[str, bool, bool]
#: (messenger titles, one per column; message type title -> its row of cells, one per column).
UserPrefs = tuple[list[str], dict[str, list[PrefCell]]]


def get_user_preferences_for_ui(
    user: Any,
    message_filter: Callable[[type[MessageBase]], bool] | None = None,
    messenger_filter: Callable[[MessengerBase], bool] | None = None,
    new_messengers_titles: dict[str, str] | None = None,
) -> UserPrefs:
    """The subscription table of ``user``: columns are messengers (sorted by title; a title
    from ``new_messengers_titles``, alias -> title, replaces a messenger's own), rows are
    message type titles (sorted), and a cell is offered where the type supports the messenger.
    Types sharing a title share a row; a cell of such a row stands for the type the user is
    subscribed to through that messenger, else the first by alias. ``message_filter`` (called
    with a message type class) and ``messenger_filter`` (with a messenger object) leave out
    what they return false for; so do ``allow_user_subscription = False`` on either side. A
    messenger no row can use gets no column, a type no column can use gets no row."""
    titles = new_messengers_titles or {}
    types = [
        message_type
        for message_type in get_registered_message_types().values()
        if message_type.allow_user_subscription
        and (message_filter is None or message_filter(message_type))
    ]
    columns = sorted(
        (str(titles.get(alias) or messenger.title or alias), alias)
        for alias, messenger in get_registered_messenger_objects().items()
        if messenger.allow_user_subscription
        and (messenger_filter is None or messenger_filter(messenger))
        and any(supports(t, alias) for t in types)
    )
    rows: dict[str, list[type[MessageBase]]] = {}
    for message_type in sorted(types, key=lambda t: t.get_alias()):
        if any(supports(message_type, alias) for _, alias in columns):
            rows.setdefault(type_title(message_type), []).append(message_type)
    subscribed = {
        f"{message_cls}{_ALIAS_SEP}{messenger_cls}"
        for message_cls, messenger_cls in Subscription.get_for_user(user).values_list(
            "message_cls", "messenger_cls"
        )
    }
    table = {
        title: [cell(rows[title], alias, subscribed) for _, alias in columns]
        for title in sorted(rows)
    }
    return [title for title, _ in columns], table


def cell(row: list[type[MessageBase]], messenger: str, subscribed: set[str]) -> PrefCell:
    """The cell of one row (its types, sorted by alias) and column. Picking the subscribed type
    first means that posting the table back unchanged keeps every subscription as it was."""
    prefs = [f"{t.get_alias()}{_ALIAS_SEP}{messenger}" for t in row if supports(t, messenger)]
    if not prefs:
        return "", False, False
    pref = next((p for p in prefs if p in subscribed), prefs[0])
    return pref, True, pref in subscribed


def set_user_preferences_from_request(request: HttpRequest) -> bool:
    """Replaces the logged-in user's subscriptions with the preferences posted as
    ``sm_user_pref`` (the form around ``{% sitemessage_prefs_table %}``) and lifts the user's
    opt-outs (unsubscribe links) from the pairs they chose again, in one transaction. Returns
    whether any preference was posted (none posted: every subscription is removed). A request
    that is not a POST changes nothing and returns False, so a view may call this on every
    request (django-sitemessage replaced the subscriptions with nothing on a GET).

    Raises BadRequest (Django answers 400), before anything is written, for an anonymous user
    and for a value that is malformed, names an unknown message type or messenger, one that
    does not allow user subscription, or a pair the type does not support."""
    if request.method != "POST":
        return False
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        raise BadRequest("subscription preferences can only be set by a logged-in user")
    prefs = list(dict.fromkeys(parse_pref(value) for value in request.POST.getlist(_PREF_POST_KEY)))
    with transaction.atomic():
        Subscription.replace_for_user(user, prefs)
        lift_opt_outs(user, prefs)
    return bool(prefs)


def parse_pref(value: str) -> tuple[str, str]:
    """(message type alias, messenger alias) of a posted preference a user may choose.

    Raises BadRequest naming the value otherwise."""
    message_alias, sep, messenger_alias = value.partition(_ALIAS_SEP)
    if not (sep and message_alias and messenger_alias) or _ALIAS_SEP in messenger_alias:
        raise BadRequest(
            f"subscription preference {value!r:.120} is not '<message type>{_ALIAS_SEP}<messenger>'"
        )
    problem = pref_problem(message_alias, messenger_alias)
    if problem:
        raise BadRequest(f"subscription preference {value!r:.120} {problem}")
    return message_alias, messenger_alias


def pref_problem(message_alias: str, messenger_alias: str) -> str:
    """Why a user may not choose this pair ("" if they may)."""
    message_type = get_registered_message_types().get(message_alias)
    messenger = get_registered_messenger_objects().get(messenger_alias)
    if message_type is None:
        return "names an unknown message type"
    if messenger is None:
        return "names an unknown messenger"
    if not message_type.allow_user_subscription:
        return "names a message type users cannot subscribe to"
    if not messenger.allow_user_subscription:
        return "names a messenger users cannot subscribe through"
    if not supports(message_type, messenger_alias):
        return "names a message type that is not sent through that messenger"
    return ""


def lift_opt_outs(user: Any, prefs: Iterable[tuple[str, str]]) -> None:
    """Deletes the user's opt-outs from the chosen pairs: ticking a box again must mean the
    messages arrive again, not that they keep being suppressed."""
    for message_alias, messenger_alias in prefs:
        OptOut.objects.filter(
            recipient_id=user.pk, message_cls=message_alias, messenger_cls=messenger_alias
        ).delete()


def supports(message_type: type[MessageBase], messenger: str) -> bool:
    """Whether a message type may be sent through a messenger (no list: through any)."""
    return not message_type.supported_messengers or messenger in message_type.supported_messengers


def type_title(message_type: type[MessageBase]) -> str:
    """The row title of a message type: its title, else its alias."""
    return str(message_type.title or message_type.get_alias())
