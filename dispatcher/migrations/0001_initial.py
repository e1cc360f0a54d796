"""django-sitemessage 1.4's schema, step 1 of 4, under its migration names: a database that
django-sitemessage created has these four applied and continues with 0005 (our delivery
bookkeeping). Written to produce the same tables and columns; the message context is a text
column holding JSON (django-sitemessage's ContextField), which 0005 turns into a JSONField."""

from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = [migrations.swappable_dependency(settings.AUTH_USER_MODEL)]

    operations = [
        migrations.CreateModel(
            name="Dispatch",
            fields=[
                ("id", models.AutoField(auto_created=True, primary_key=True, serialize=False)),
                ("time_created", models.DateTimeField(auto_now_add=True)),
                ("time_dispatched", models.DateTimeField(null=True, blank=True, editable=False)),
                ("messenger", models.CharField(max_length=250, db_index=True)),
                ("address", models.CharField(max_length=250)),
                ("retry_count", models.PositiveIntegerField(default=0)),
                ("message_cache", models.TextField(null=True, editable=False)),
                (
                    "dispatch_status",
                    models.PositiveIntegerField(
                        default=1,
                        choices=[(1, "Pending"), (2, "Sent"), (3, "Error"), (4, "Failed")],
                    ),
                ),
                (
                    "read_status",
                    models.PositiveIntegerField(default=0, choices=[(0, "Unread"), (1, "Read")]),
                ),
            ],
        ),
        migrations.CreateModel(
            name="DispatchError",
            fields=[
                ("id", models.AutoField(auto_created=True, primary_key=True, serialize=False)),
                ("time_created", models.DateTimeField(auto_now_add=True)),
                ("error_log", models.TextField()),
                (
                    "dispatch",
                    models.ForeignKey(on_delete=models.CASCADE, to="sitemessage.dispatch"),
                ),
            ],
        ),
        migrations.CreateModel(
            name="Message",
            fields=[
                ("id", models.AutoField(auto_created=True, primary_key=True, serialize=False)),
                ("time_created", models.DateTimeField(auto_now_add=True)),
                ("cls", models.CharField(max_length=250, db_index=True)),
                ("context", models.TextField()),
                ("priority", models.PositiveIntegerField(default=0, db_index=True)),
                ("dispatches_ready", models.BooleanField(default=False, db_index=True)),
                (
                    "sender",
                    models.ForeignKey(
                        null=True,
                        blank=True,
                        on_delete=models.CASCADE,
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
        ),
        migrations.AddField(
            model_name="dispatch",
            name="message",
            field=models.ForeignKey(on_delete=models.CASCADE, to="sitemessage.message"),
        ),
        migrations.AddField(
            model_name="dispatch",
            name="recipient",
            field=models.ForeignKey(
                null=True, blank=True, on_delete=models.CASCADE, to=settings.AUTH_USER_MODEL
            ),
        ),
    ]
