import secrets

from django.db import migrations


def create_stream(apps, schema_editor):
    Stream = apps.get_model("notifications", "Stream")
    Notification = apps.get_model("notifications", "Notification")
    last = Notification.objects.order_by("-id").values_list("id", flat=True).first() or 0
    Stream.objects.get_or_create(pk=1, defaults={"head": last, "epoch": secrets.token_hex(8)})


class Migration(migrations.Migration):
    dependencies = [("notifications", "0001_initial")]

    operations = [migrations.RunPython(create_stream, migrations.RunPython.noop)]
