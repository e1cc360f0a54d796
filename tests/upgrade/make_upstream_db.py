# ruff: noqa: I001 -- "sitemessage" here is django-sitemessage 1.4, not our facade
"""Creates a database with the real django-sitemessage 1.4 (run by tests/test_upgrade.py in a
virtualenv of its own, where only django-sitemessage is installed, not this project).

    python make_upstream_db.py DATABASE_URL [--read]

Migrates, schedules one e-mail to six addresses (two of them users) through django-sitemessage's
own API, puts the dispatches in every status with error rows, adds subscriptions (one of them
doubled) and a message waiting for its subscribers' dispatches, and prints
the rows as JSON for the test to compare after our migrations ran. With --read it only prints
the rows (of a database migrated back to django-sitemessage's schema).
"""

import json
import sys

import dj_database_url
import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=[
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "sitemessage",
    ],
    DATABASES={"default": dj_database_url.parse(sys.argv[1])},
    USE_TZ=True,
    SECRET_KEY="upstream-db-maker",
    DEFAULT_AUTO_FIELD="django.db.models.AutoField",
)
django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from sitemessage.messages.email import EmailTextMessage  # noqa: E402
from sitemessage.messengers.smtp import SMTPMessenger  # noqa: E402
from sitemessage.models import Dispatch, DispatchError, Message, Subscription  # noqa: E402
from sitemessage.toolbox import recipients, schedule_messages  # noqa: E402
from sitemessage.utils import register_messenger_objects  # noqa: E402

READ_ONLY = "--read" in sys.argv
if not READ_ONLY:
    call_command("migrate", verbosity=0)
register_messenger_objects(SMTPMessenger())


def schedule() -> None:
    """Messages, dispatches in every status, errors and subscriptions, by django-sitemessage."""
    ann = User.objects.create(username="ann", email="ann@example.com")
    bob = User.objects.create(username="bob", email="bob@example.com")
    addresses = [
        "sent@example.com",
        "error@example.com",
        "failed@example.com",
        "processing@example.com",
    ]
    [(message, _)] = schedule_messages(
        EmailTextMessage("Upgrade", "Written by django-sitemessage 1.4."),
        recipients("smtp", [*addresses, ann, bob]),
        sender=ann,
    )
    by_address = {d.address: d for d in Dispatch.objects.filter(message=message)}
    updates = {
        "sent@example.com": (Dispatch.DISPATCH_STATUS_SENT, 1),
        "error@example.com": (Dispatch.DISPATCH_STATUS_ERROR, 2),
        "failed@example.com": (Dispatch.DISPATCH_STATUS_FAILED, 3),
        "processing@example.com": (Dispatch.DISPATCH_STATUS_PROCESSING, 1),
    }
    for address, (status, retries) in updates.items():
        Dispatch.objects.filter(pk=by_address[address].pk).update(
            dispatch_status=status, retry_count=retries
        )
    for address in ("error@example.com", "failed@example.com"):
        DispatchError.objects.create(dispatch=by_address[address], error_log=f"refused {address}")
    Subscription.objects.create(message_cls="email_plain", messenger_cls="smtp", recipient=bob)
    Subscription.objects.create(
        message_cls="email_plain", messenger_cls="smtp", address="x@example.com"
    )
    # django-sitemessage let a subscription be doubled, and then sent bob everything twice.
    Subscription.objects.create(message_cls="email_plain", messenger_cls="smtp", recipient=bob)
    # Scheduled without recipients: its dispatches are to be made from the subscribers.
    EmailTextMessage("Digest", "For the subscribers.").schedule()


if not READ_ONLY:
    schedule()
print(
    json.dumps(
        {
            "messages": list(Message.objects.values("id", "cls", "context", "priority")),
            "dispatches": list(
                Dispatch.objects.values(
                    "id", "message_id", "address", "dispatch_status", "retry_count", "recipient_id"
                ).order_by("id")
            ),
            "errors": list(DispatchError.objects.values("dispatch_id", "error_log").order_by("id")),
            "subscriptions": list(
                Subscription.objects.values(
                    "message_cls", "messenger_cls", "recipient_id", "address"
                ).order_by("id")
            ),
        },
        default=str,
    )
)
