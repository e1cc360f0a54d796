"""``manage.py sitemessage_probe <alias> --to <address>``: is this messenger able to deliver?

Sends one test message through the named messenger right now, in this process (connect, log
in, send, disconnect), prints what happened and exits non-zero when it failed.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from messengers.exceptions import SitemessageError
from messengers.registry import get_registered_messenger_object


class Command(BaseCommand):
    help = "Sends a test message through one messenger, in this process, and reports the outcome."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("alias", help="messenger alias, e.g. smtp")
        parser.add_argument("--to", required=True, help="address to send the test message to")
        parser.add_argument("--text", default="Test message from sitemessage.")

    def handle(self, *args: Any, alias: str, to: str, text: str, **options: Any) -> None:
        try:
            messenger = get_registered_messenger_object(alias)
            messenger.validate_address(to)
        except SitemessageError as exc:
            raise CommandError(str(exc)) from exc
        started = time.monotonic()
        try:
            result = messenger.send_test_message(to, text)
        except Exception as exc:
            raise CommandError(
                f"{alias}: test message to {to} failed after "
                f"{time.monotonic() - started:.1f}s: {type(exc).__name__}: {exc}"
            ) from exc
        detail = f" (provider id {result})" if result not in (None, "") else ""
        self.stdout.write(
            f"{alias}: test message to {to} sent in {time.monotonic() - started:.2f}s{detail}"
        )
