"""``manage.py sitemessage_probe <alias> [--to <address>]``: is this messenger able to deliver?

Sends one test message through the named messenger right now, in this process (connect, log
in, send, disconnect), prints what happened and exits non-zero when it failed. Without
``--to`` the messenger sends where it can without an address (a tweet, a wall or Page post),
as django-sitemessage's probe does; a messenger that needs an address says so and exits 1.
The lines ``Probing function result: <result>.`` and ``Probing done.`` are django-sitemessage's.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from messengers.exceptions import InvalidAddressError, SiteMessageError
from messengers.registry import get_registered_messenger_object


class Command(BaseCommand):
    help = (
        "Sends one test message through a messenger now, in this process (connect, log in, "
        "send, disconnect), and reports what happened. Exits 1 when the messenger is unknown, "
        "needs --to, or fails to send."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("alias", help="alias of a registered messenger, e.g. smtp")
        parser.add_argument(
            "--to",
            default=None,
            metavar="ADDRESS",
            help="address to send the test message to (if the messenger needs one)",
        )
        parser.add_argument(
            "--text",
            default="Test message from sitemessage.",
            help="text of the test message (default: %(default)r)",
        )

    def handle(self, *args: Any, alias: str, to: str | None, text: str, **options: Any) -> None:
        try:
            messenger = get_registered_messenger_object(alias)
            messenger.validate_address(to or "")
        except InvalidAddressError as exc:
            if to is None:
                raise CommandError(f"{alias} needs an address: pass --to ({exc})") from exc
            raise CommandError(str(exc)) from exc
        except SiteMessageError as exc:
            raise CommandError(str(exc)) from exc
        where = f" to {to}" if to else ""
        self.stdout.write(f"Sending test message using {alias} ...")
        started = time.monotonic()
        try:
            result = messenger.send_test_message(to or "", text)
        except Exception as exc:
            raise CommandError(
                f"{alias}: test message{where} failed after "
                f"{time.monotonic() - started:.1f}s: {type(exc).__name__}: {exc}"
            ) from exc
        detail = f" (provider id {result})" if result not in (None, "") else ""
        self.stdout.write(
            f"{alias}: test message{where} sent in {time.monotonic() - started:.2f}s{detail}"
        )
        self.stdout.write(f"Probing function result: {result}.")
        self.stdout.write("Probing done.")
