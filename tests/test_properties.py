"""Property-based tests of recipients() and schedule_messages() with random and hostile input:
huge strings, control characters, lone surrogates, values JSON cannot hold, nested lists,
unknown aliases, users without an address.

The strategies label every value they draw valid or invalid from a small specification written
here (independent of the code under test). A call on valid input must store exactly what was
asked and publish exactly those ids; a call on invalid input must raise a ScheduleError (the
documented error of both functions) and leave no row behind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from dispatcher.messages import EmailTextMessage, MessageBase, PlainTextMessage
from dispatcher.models import Dispatch, Message
from dispatcher.validation import MAX_PRIORITY, Recipient
from messengers.exceptions import ScheduleError
from sitemessage.toolbox import recipients, schedule_messages

pytestmark = pytest.mark.django_db

PROPERTY = hsettings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CONTROL = "".join(map(chr, [*range(32), 127]))


# The specification


def storable_text(text: str) -> bool:
    """Text every supported database stores: no NUL, encodable as UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def valid_address(messenger: str, address: Any) -> bool:
    if not isinstance(address, str) or not address.strip() or len(address) > 255:
        return False
    if any(c in CONTROL for c in address) or not storable_text(address):
        return False
    if messenger == "smtp":
        try:
            validate_email(address)
        except ValidationError:
            return False
    return True


def json_storable(value: Any) -> bool:
    """What a JSON column holds: null, booleans, integers, finite floats, text, lists and
    objects (keys: text or numbers, which JSON turns into text)."""
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, list | tuple):
        return all(json_storable(v) for v in value)
    if isinstance(value, dict):
        return all(
            json_storable(k) and not isinstance(k, list | tuple | dict) for k in value
        ) and all(json_storable(v) for v in value.values())
    return False


# The strategies


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``common`` three times in four (st.one_of would give each branch the same chance)."""
    return st.integers(0, 3).flatmap(lambda n: rare if n == 0 else common)


hostile_chars = st.one_of(st.characters(), st.sampled_from(CONTROL))
#: Known troublemakers, so that 200 examples meet them often.
nasty_text = st.sampled_from(
    [
        "\x00",
        "a\x00b@example.com",
        "ann@example.com\r\nBcc: eve@example.com",
        "\u202eann@example.com",
        "ann@exämple.com",
        "ann@[127.0.0.1]",
        "\t",
        "\x7f",
        "\ufeff",
        "💌" * 70,
        "\ud800",
        "x\udfff@example.com",
        "\\u0000",
    ]
)
hostile_text = mostly(
    nasty_text,
    st.one_of(
        st.text(hostile_chars, max_size=40),
        st.builds(
            lambda s, n: s * n,
            st.text(hostile_chars, min_size=1, max_size=3),
            st.integers(1, 20000),
        ),
    ),
)
emails = st.emails().filter(lambda a: valid_address("smtp", a))
long_email = st.builds(lambda n: "a" * n + "@example.com", st.integers(238, 248))  # 250-260


@dataclass(frozen=True)
class UserRef:
    """Stands for a user the test makes: hypothesis draws the reference, not the row."""

    kind: str  # "with_email", "without_email", "unsaved"


users = st.sampled_from([UserRef("with_email"), UserRef("without_email"), UserRef("unsaved")])
address_like = st.one_of(
    emails, long_email, hostile_text, st.sampled_from(["", " ", "a@b", "x\n@example.com"])
)
item = mostly(
    address_like,
    st.one_of(
        users,
        st.integers(),
        st.none(),
        st.floats(),
        st.binary(max_size=4),
        st.lists(address_like, max_size=3),  # nested
    ),
)
addresses_or_users = st.one_of(item, st.lists(item, max_size=6), st.tuples(item, item))
messenger_alias = mostly(
    st.sampled_from(["smtp", "recorder"]),
    st.one_of(st.text(hostile_chars, max_size=20), st.none(), st.integers()),
)


class Unregistered(MessageBase):
    alias = "never_registered"


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),  # nan and infinities included
        hostile_text,
    ),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(hostile_text, st.integers()), inner, max_size=4)
    ),
    max_leaves=12,
)
context_values = st.one_of(
    json_values,
    st.sets(st.integers(), max_size=2),
    st.binary(max_size=4),
    st.builds(object),
    st.decimals(allow_nan=False),
    st.lists(st.builds(Decimal, st.integers()), max_size=2),
)
message_objects = st.one_of(
    hostile_text,
    st.builds(PlainTextMessage, hostile_text),
    st.builds(EmailTextMessage, hostile_text, hostile_text),
    st.builds(
        EmailTextMessage, hostile_text, st.dictionaries(hostile_text, context_values, max_size=4)
    ),
    st.builds(Unregistered),
    st.integers(),
    st.none(),
)
messages = st.one_of(message_objects, st.lists(message_objects, max_size=3))
priorities = st.one_of(
    st.none(), st.integers(-5, MAX_PRIORITY + 5), st.booleans(), st.floats(), st.text(max_size=3)
)


def valid_message(message: Any) -> bool:
    if isinstance(message, str):
        return storable_text(message)
    if isinstance(message, EmailTextMessage):  # its subject goes into a header: one line
        subject = message.context.get("subject")
        one_line = isinstance(subject, str) and "\r" not in subject and "\n" not in subject
        return one_line and json_storable(message.context)
    if isinstance(message, PlainTextMessage):
        return json_storable(message.context)
    return False


def valid_messages(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(valid_message(m) for m in items)


def supported(value: Any, parts: list[Any]) -> bool:
    """Whether every message may go through every recipient's messenger: the e-mail types
    support only 'smtp' (a list that is not all recipients is refused for another reason)."""
    items = value if isinstance(value, list) else [value]
    messengers = {getattr(part, "messenger", None) for part in parts}
    return all(
        not isinstance(item, EmailTextMessage) or messengers <= {"smtp", None} for item in items
    )


def valid_priority(priority: Any) -> bool:
    return priority is None or (type(priority) is int and 0 <= priority <= MAX_PRIORITY)


# The tests


@pytest.fixture
def people(django_user_model) -> dict[str, Any]:
    return {
        "with_email": django_user_model.objects.create(username="ann", email="ann@example.com"),
        "without_email": django_user_model.objects.create(username="bob", email=""),
        "unsaved": django_user_model(username="eve", email="eve@example.com"),
    }


@pytest.fixture
def published(no_publish) -> list[dict[str, list[int]]]:
    return no_publish


def resolve(value: Any, people: dict[str, Any]) -> Any:
    if isinstance(value, UserRef):
        return people[value.kind]
    if isinstance(value, list):
        return [resolve(v, people) for v in value]
    if isinstance(value, tuple):
        return tuple(resolve(v, people) for v in value)
    return value


def expected_recipients(alias: Any, value: Any) -> list[tuple[Any, Any]] | None:
    """The (user, address) pairs recipients() must return, or None when it must raise."""
    if alias not in ("smtp", "recorder"):
        return None
    # Like recipients(): one string or user, or any iterable of them (bytes iterate as ints).
    single = isinstance(value, str | get_user_model()) or not isinstance(value, Iterable)
    items = [value] if single else list(value)
    result = []
    for item in items:
        if isinstance(item, get_user_model()):
            if item.pk is None:
                return None
            address = item.email if alias == "smtp" else item
            user = item
        else:
            address, user = item, None
        if not valid_address(alias, address):
            return None
        result.append((user, address))
    return result


def row_counts() -> tuple[int, int]:
    return Message.objects.count(), Dispatch.objects.count()


@PROPERTY
@given(alias=messenger_alias, value=addresses_or_users)
def test_recipients_returns_exactly_the_valid_addresses_or_raises(people, alias, value):
    value = resolve(value, people)
    expected = expected_recipients(alias, value)
    try:
        result = recipients(alias, value)
    except ScheduleError:
        assert expected is None, f"refused valid input {value!r}"
        return
    assert expected is not None, f"accepted invalid input {value!r}"
    assert [(r.user, r.address) for r in result] == expected
    assert {r.messenger for r in result} <= {alias}


@st.composite
def recipient_lists(draw: st.DrawFn) -> tuple[list[Any], bool]:
    """A list of recipients and whether schedule_messages() must accept it."""
    parts: list[Any] = []
    valid = True
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["made", "forged", "foreign"]))
        if kind == "made":
            alias = draw(st.sampled_from(["smtp", "recorder"]))
            parts += recipients(alias, draw(st.lists(emails, max_size=4)))
        elif kind == "forged":  # built by hand, bypassing recipients()
            alias = draw(st.one_of(st.sampled_from(["smtp", "recorder"]), st.text(max_size=5)))
            address = draw(address_like)
            parts.append(Recipient(alias, None, address))
            valid = valid and alias in ("smtp", "recorder") and valid_address(alias, address)
        else:
            parts.append(draw(st.one_of(st.text(max_size=5), st.integers(), st.none())))
            valid = False
    return parts, valid


@PROPERTY
@given(
    message=messages,
    to=recipient_lists(),
    sender=st.one_of(st.none(), users, st.integers()),
    priority=priorities,
)
def test_schedule_messages_stores_everything_or_nothing(
    people, published, django_capture_on_commit_callbacks, message, to, sender, priority
):
    parts, valid_to = to
    sender = resolve(sender, people)
    valid = (
        valid_messages(message)
        and valid_to
        and supported(message, parts)
        and valid_priority(priority)
        and (sender is None or getattr(sender, "pk", None) is not None)
    )
    before = row_counts()
    published.clear()
    try:
        with django_capture_on_commit_callbacks(execute=True):
            created = schedule_messages(message, parts, sender=sender, priority=priority)
    except ScheduleError:
        assert row_counts() == before, "a refused call left rows behind"
        assert published == []
        assert not valid, f"refused valid input {message!r} {parts!r} {priority!r}"
        return
    assert valid, f"accepted invalid input {message!r} {parts!r} {sender!r} {priority!r}"

    unique = {(r.messenger, r.address) for r in parts}
    items = message if isinstance(message, list) else [message]
    if not unique:
        assert created == [] and row_counts() == before and published == []
        return
    assert row_counts() == (before[0] + len(items), before[1] + len(items) * len(unique))
    ids: dict[str, list[int]] = {}
    for item, (message_model, dispatches) in zip(items, created, strict=True):
        stored = Message.objects.get(pk=message_model.pk)
        context = PlainTextMessage(item).context if isinstance(item, str) else item.context
        assert stored.context == roundtrip(context)
        assert stored.priority == (getattr(item, "priority", 0) if priority is None else priority)
        assert {(d.messenger, d.address) for d in dispatches} == unique
        for d in dispatches:
            ids.setdefault(d.messenger, []).append(d.pk)
    assert published == [ids]


def roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


# Cases the property tests once found: refused (or stored) as they should be.


def test_a_lone_surrogate_address_is_refused(published):
    with pytest.raises(ScheduleError, match="lone surrogate"):
        schedule_messages("hi", recipients("recorder", "x\ud800"))
    assert row_counts() == (0, 0)


def test_a_lone_surrogate_in_a_context_is_refused(published):
    with pytest.raises(ScheduleError, match="lone surrogate"):
        schedule_messages(
            EmailTextMessage("S", {"text": "\ud800"}), recipients("smtp", "a@example.com")
        )
    assert row_counts() == (0, 0)


def test_a_backslash_before_u0000_is_not_a_nul(published):
    schedule_messages(EmailTextMessage("S", "C:\\u0000dir"), recipients("smtp", "a@example.com"))
    assert Message.objects.get().context["stext_"] == "C:\\u0000dir"
