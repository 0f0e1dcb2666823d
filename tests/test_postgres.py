"""PostgreSQL-only checks: the inbox and unread-count queries can use the indexes."""

import pytest
from django.db import connection

from notifications import selectors
from notifications.models import Audience, Follow, Notification, Topic

from .conftest import require_postgres

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


def _plan(sql: str, params) -> str:
    """The plan when the planner may not scan whole tables or join them wholesale: on a
    small test table it would, which says nothing about whether the indexes can serve."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_hashjoin = off")
        cursor.execute("SET LOCAL enable_mergejoin = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        return "\n".join(row[0] for row in cursor.fetchall())


@pytest.fixture
def populated(alice, bob):
    topic = Topic.objects.create(slug="deploys", title="Deploys")
    Follow.objects.create(user=alice, topic=topic)
    rows = (
        [Notification(audience=Audience.USER, recipient=bob, title=f"n{i}") for i in range(2000)]
        + [Notification(audience=Audience.TOPIC, topic=topic, title=f"t{i}") for i in range(200)]
        + [Notification(audience=Audience.BROADCAST, title=f"b{i}") for i in range(200)]
    )
    for notification_id, row in enumerate(rows, start=1):
        row.id = notification_id
    Notification.objects.bulk_create(rows)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE notifications_notification")
    return topic


def test_unread_count_query_uses_an_index_for_every_audience(alice, populated):
    require_postgres()
    query = selectors._union_ids(selectors._visible_parts(alice)).query
    sql, params = query.sql_with_params()
    plan = _plan(f"SELECT COUNT(*) FROM ({sql}) t", params)  # noqa: S608 - the ORM's own SQL, parameters apart
    assert "Seq Scan on notifications_notification" not in plan, plan
    for index in ("notif_recipient_id", "notif_topic_id", "notif_broadcast_id"):
        assert index in plan, plan


def test_unread_count_matches_what_is_visible(alice, populated):
    require_postgres()
    # alice joined and followed before the rows: 200 topic + 200 broadcast; bob's 2000 are not hers.
    assert selectors.unread_count_for(alice) == 400
