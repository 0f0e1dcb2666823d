"""One stream per audience instead of one for everyone (docs/guarantees.md, "Cursors").

The single numbering row becomes the store's identity (``Store``: the epoch); each audience gets
its own ``Stream`` row (``u.<user id>``, ``t.<topic id>``, ``b``); every stored notification gets
its offset in its audience's stream, in id order; notification ids come from a sequence.
"""

from django.db import migrations, models


def stream_key(row) -> str:
    if row.audience == "user":
        return f"u.{row.recipient_id}"
    if row.audience == "topic":
        return f"t.{row.topic_id}"
    return "b"


def assign_offsets(apps, schema_editor):
    Notification = apps.get_model("notifications", "Notification")
    Stream = apps.get_model("notifications", "Stream")
    heads: dict[str, int] = {}
    batch = []
    for row in Notification.objects.order_by("id").only("id", "audience", "recipient_id", "topic_id").iterator():
        key = stream_key(row)
        heads[key] = row.offset = heads.get(key, 0) + 1
        batch.append(row)
        if len(batch) >= 1000:
            Notification.objects.bulk_update(batch, ["offset"])
            batch = []
    Notification.objects.bulk_update(batch, ["offset"])
    Stream.objects.bulk_create([Stream(key=key, head=head) for key, head in heads.items()])


def continue_the_id_sequence(apps, schema_editor):
    """Ids were given out by hand until now: the new sequence starts after the largest."""
    if schema_editor.connection.vendor != "postgresql":
        return  # SQLite's AUTOINCREMENT continues after the largest rowid by itself
    table = apps.get_model("notifications", "Notification")._meta.db_table
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            f"SELECT setval(pg_get_serial_sequence(%s, 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)",
            [table],
        )


class Migration(migrations.Migration):
    dependencies = [("notifications", "0004_follow_periods")]

    operations = [
        migrations.RenameModel("Stream", "Store"),
        migrations.RemoveField("store", "head"),
        migrations.CreateModel(
            name="Stream",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("key", models.CharField(max_length=40, unique=True)),
                ("head", models.BigIntegerField(default=0)),
            ],
        ),
        migrations.AddField("notification", "offset", models.BigIntegerField(null=True)),
        migrations.RunPython(assign_offsets, migrations.RunPython.noop),
        migrations.AlterField("notification", "offset", models.BigIntegerField()),
        migrations.AlterField("notification", "id", models.BigAutoField(primary_key=True, serialize=False)),
        migrations.RunPython(continue_the_id_sequence, migrations.RunPython.noop),
        migrations.AddConstraint(
            "notification",
            models.UniqueConstraint(condition=models.Q(("audience", "user")), fields=("recipient", "offset"),
                                    name="notif_user_stream_offset"),
        ),
        migrations.AddConstraint(
            "notification",
            models.UniqueConstraint(condition=models.Q(("audience", "topic")), fields=("topic", "offset"),
                                    name="notif_topic_stream_offset"),
        ),
        migrations.AddConstraint(
            "notification",
            models.UniqueConstraint(condition=models.Q(("audience", "broadcast")), fields=("offset",),
                                    name="notif_broadcast_stream_offset"),
        ),
    ]
