"""The contract every messenger passes, builtin or user-defined.

Subclass ``MessengerContract`` in a test module and provide these fixtures:

- ``messenger``: a configured messenger instance, not warmed up yet, that delivers to a live
  server on loopback;
- ``addresses``: three distinct addresses that server delivers to;
- ``delivered``: a callable returning the addresses the server accepted so far, one entry per
  accepted message;
- ``temporary_failure``: a callable ``(address) -> None`` after which delivery to that address
  fails for a reason that may go away (SMTP 451, HTTP 429/503, server down);
- ``permanent_failure``: a callable ``(address) -> address`` after which delivery to the
  returned address fails for good (SMTP 550, HTTP 400/403, ...).

The tests run the real pipeline (claim -> render -> send -> persist) in the test process on
real rows, so they check what the database says, not only what the messenger returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from dispatcher import pipeline, toolbox
from dispatcher.messages import PlainTextMessage
from dispatcher.models import Dispatch, DispatchError
from messengers.base import MessengerBase, alias_of, cool_down
from messengers.exceptions import MessengerConfigurationError
from messengers.registry import messenger_from_settings, register_messenger_objects

Status = Dispatch.Status
Deliver = Callable[[list[str]], dict[str, Dispatch]]


def deliver_now(alias: str, addresses: list[str], *texts: str) -> list[Dispatch]:
    """Schedules one plain-text message per text (default: one) to ``addresses`` and delivers
    them in this process, as a worker would; returns the rows in the order they were created.
    The caller keeps tasks from being published (the no_publish fixture)."""
    created = toolbox.schedule(
        [PlainTextMessage(text) for text in texts or ("Hello",)],
        toolbox.recipients(alias, addresses),
    )
    ids = [d.pk for _, dispatches in created for d in dispatches]
    pipeline.deliver(alias, ids, owner="test")
    return list(Dispatch.objects.filter(pk__in=ids).order_by("pk"))


def errors_of(row: Dispatch) -> list[str]:
    """The error log of one dispatch, oldest first."""
    return list(
        DispatchError.objects.filter(dispatch=row)
        .order_by("pk")
        .values_list("error_log", flat=True)
    )


@pytest.mark.django_db
class MessengerContract:
    @pytest.fixture
    def deliver(
        self, messenger: MessengerBase, registries: None, no_publish: list
    ) -> Iterator[Deliver]:
        """Schedules a message to the given addresses and delivers it as a worker would;
        returns the dispatch rows by address."""
        register_messenger_objects(messenger)
        alias = alias_of(messenger)

        def run(addresses: list[str]) -> dict[str, Dispatch]:
            return {d.address: d for d in deliver_now(alias, addresses)}

        try:
            yield run
        finally:
            cool_down(messenger)

    def test_sends_one(self, deliver: Deliver, addresses, delivered) -> None:
        rows = deliver(addresses[:1])
        assert rows[addresses[0]].dispatch_status == Status.SENT
        assert rows[addresses[0]].retry_count == 1
        assert delivered() == addresses[:1]

    def test_sends_a_batch(self, deliver: Deliver, addresses, delivered) -> None:
        rows = deliver(addresses)
        assert {row.dispatch_status for row in rows.values()} == {Status.SENT}
        assert sorted(delivered()) == sorted(addresses)

    def test_a_second_batch_reuses_the_messenger(self, deliver: Deliver, addresses, delivered):
        deliver(addresses[:1])
        rows = deliver(addresses[1:])
        assert {row.dispatch_status for row in rows.values()} == {Status.SENT}
        assert sorted(delivered()) == sorted(addresses)

    def test_before_send_twice_is_harmless(
        self, deliver: Deliver, messenger, addresses, delivered
    ) -> None:
        messenger.before_send()
        messenger.before_send()
        rows = deliver(addresses[:1])
        assert rows[addresses[0]].dispatch_status == Status.SENT
        assert delivered() == addresses[:1]

    def test_after_send_without_before_send_is_harmless(
        self, deliver: Deliver, messenger, addresses, delivered
    ) -> None:
        messenger.after_send()
        messenger.after_send()
        rows = deliver(addresses[:1])
        assert rows[addresses[0]].dispatch_status == Status.SENT
        assert delivered() == addresses[:1]

    def test_temporary_error_leaves_the_dispatch_for_retry(
        self, deliver: Deliver, addresses, delivered, temporary_failure
    ) -> None:
        temporary_failure(addresses[0])
        row = deliver(addresses[:1])[addresses[0]]
        assert row.dispatch_status == Status.ERROR
        assert row.next_attempt_at is not None and row.retry_count == 1
        assert DispatchError.objects.filter(dispatch=row).count() == 1
        assert addresses[0] not in delivered()

    def test_permanent_error_fails_only_that_dispatch(
        self, deliver: Deliver, addresses, delivered, permanent_failure
    ) -> None:
        bad = permanent_failure(addresses[0])
        rows = deliver([bad, addresses[1]])
        assert rows[bad].dispatch_status == Status.FAILED
        assert rows[bad].retry_count == 1 and rows[bad].next_attempt_at is None
        assert DispatchError.objects.filter(dispatch=rows[bad]).count() == 1
        assert rows[addresses[1]].dispatch_status == Status.SENT
        assert delivered() == [addresses[1]]

    def test_unknown_options_are_rejected_with_the_alias(self, messenger) -> None:
        alias = alias_of(messenger)
        with pytest.raises(MessengerConfigurationError) as info:
            messenger_from_settings(
                alias, {"class": type(messenger), "options": {"no_such_option": 1}}
            )
        assert repr(alias) in str(info.value) and "no_such_option" in str(info.value)
