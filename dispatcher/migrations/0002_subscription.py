"""django-sitemessage 1.4's schema, step 2 of 4: subscriptions (see 0001_initial)."""

from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("sitemessage", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="Subscription",
            fields=[
                ("id", models.AutoField(auto_created=True, primary_key=True, serialize=False)),
                ("time_created", models.DateTimeField(auto_now_add=True)),
                ("message_cls", models.CharField(max_length=250, db_index=True)),
                ("messenger_cls", models.CharField(max_length=250, db_index=True)),
                ("address", models.CharField(max_length=250, null=True)),
                (
                    "recipient",
                    models.ForeignKey(
                        null=True,
                        blank=True,
                        on_delete=models.CASCADE,
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
        ),
    ]
