"""django-sitemessage 1.4's schema, step 4 of 4: the group mark (see 0001_initial)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("sitemessage", "0003_auto_20210314_1053")]

    operations = [
        migrations.AddField(
            model_name="message",
            name="group_mark",
            field=models.CharField(max_length=128, db_index=True, db_column="gmark", default=""),
            preserve_default=False,
        ),
    ]
