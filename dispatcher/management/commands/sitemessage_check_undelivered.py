"""``manage.py sitemessage_check_undelivered [--to ADDRESS ...]``: reports undelivered dispatches.

Undelivered: FAILED dispatches, and PROCESSING dispatches whose lease expired (their worker died
and no sweep has given them back yet). Prints ``Undelivered dispatches count: N.`` (the line
django-sitemessage prints), then counts per messenger and the most recent error of each. When
there are any, the report is e-mailed, in this process, through the registered ``smtp``
messenger to ``--to`` or, without it, to the ADMINS setting (as django-sitemessage does; nobody
when ADMINS is empty). It is stored as a message like any other, so the sweep retries it if
this fails.

Exits 0 when nothing is undelivered, 1 when something is or when the report cannot be sent.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from dispatcher.management.progress import Progress
from dispatcher.operations import report_recipients, send_report, undelivered_report
from messengers.exceptions import DeliveryError, SiteMessageError


class Command(BaseCommand):
    help = (
        "Reports undelivered dispatches (failed ones, and ones stuck past their lease because "
        "their worker died) per messenger with the most recent error of each, and e-mails the "
        "report through the smtp messenger to --to (default: ADMINS). Exits 0 when nothing is "
        "undelivered, 1 when something is or when the report cannot be read or sent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--to",
            nargs="+",
            action="extend",
            default=None,
            metavar="ADDRESS",
            help="e-mail the report to these addresses (through the smtp messenger); "
            "default: the ADMINS setting",
        )

    def handle(self, *args: Any, to: list[str] | None, **options: Any) -> None:
        try:
            with Progress(self.stderr, "reading", "messengers", options["verbosity"]) as progress:
                report = undelivered_report(progress=progress)
        except DatabaseError as exc:
            raise CommandError(f"cannot read the dispatches: {exc}") from exc
        self.stdout.write(report.text)
        if not report.total:
            return
        addresses = report_recipients(to)
        if addresses:
            try:
                send_report(addresses, report)
            except DeliveryError as exc:
                raise CommandError(str(exc)) from exc
            except SiteMessageError as exc:
                raise CommandError(f"cannot send the report: {exc}") from exc
            except DatabaseError as exc:
                raise CommandError(f"cannot store or deliver the report: {exc}") from exc
            self.stdout.write(f"Report e-mailed to {', '.join(addresses)}.")
        raise CommandError(f"{report.total} undelivered dispatches")
