"""django-sitemessage 1.4's schema, step 3 of 4: the processing status (see 0001_initial)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("sitemessage", "0002_subscription")]

    operations = [
        migrations.AlterField(
            model_name="dispatch",
            name="dispatch_status",
            field=models.PositiveIntegerField(
                default=1,
                choices=[
                    (1, "Pending"),
                    (5, "Processing"),
                    (2, "Sent"),
                    (3, "Error"),
                    (4, "Failed"),
                ],
            ),
        ),
    ]
