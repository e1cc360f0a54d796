"""``manage.py sitemessage_cleanup [--ago DAYS] [--dispatches-only]``: deletes sent dispatches.

Deletes SENT dispatches (with ``--ago``, only those sent at least that many days ago) and then
the messages left without any dispatch, unless ``--dispatches-only`` (or django-sitemessage's
spelling, ``--dispatches_only``). Options and the first and last output lines are
django-sitemessage's. Deletes in chunks, each in its own transaction, with a progress bar on a
terminal (plain progress lines on stderr otherwise). Exits 1 when ``--ago`` is negative or the
database fails; what was deleted before that stays deleted.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from dispatcher.management.progress import Progress
from dispatcher.operations import cleanup_sent_messages


class Command(BaseCommand):
    help = (
        "Deletes sent dispatches (all of them, or with --ago those sent at least that many days "
        "ago) and then the messages left without any dispatch, in chunks of one transaction "
        "each. Exits 1 when the database fails."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--ago",
            type=int,
            default=None,
            metavar="DAYS",
            help="only dispatches sent at least this many days ago (default: every sent one)",
        )
        # django-sitemessage declared this flag with store_false, so it could never be set.
        parser.add_argument(
            "--dispatches-only",
            "--dispatches_only",
            dest="dispatches_only",
            action="store_true",
            help="delete the dispatches only; keep the messages, even those left empty",
        )

    def handle(self, *args: Any, ago: int | None, dispatches_only: bool, **options: Any) -> None:
        suffix = [] if dispatches_only else ["and messages"]
        if ago:
            suffix.append(f"sent {ago} days ago")
        self.stdout.write(f"Cleaning up dispatches {' '.join(suffix)} ...".replace("  ", " "))
        try:
            with Progress(self.stderr, "deleting", "dispatches", options["verbosity"]) as progress:
                result = cleanup_sent_messages(
                    ago=ago, dispatches_only=dispatches_only, progress=progress
                )
        except (TypeError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            raise CommandError(f"cleanup failed on the database: {exc}") from exc
        self.stdout.write(f"Deleted {result.dispatches} dispatches and {result.messages} messages.")
        self.stdout.write("Cleanup done.")
