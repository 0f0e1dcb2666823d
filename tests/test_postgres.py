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
        [Notification(audience=Audience.USER, recipient=bob, title=f"n{i}", offset=i + 1) for i in range(2000)]
        + [Notification(audience=Audience.TOPIC, topic=topic, title=f"t{i}", offset=i + 1) for i in range(200)]
        + [Notification(audience=Audience.BROADCAST, title=f"b{i}", offset=i + 1) for i in range(200)]
    )
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


def test_replay_query_reads_each_stream_by_its_offset_index(alice, populated):
    require_postgres()
    ranges = {f"u.{alice.pk}": (0, None), f"t.{populated.pk}": (150, None), "b": (190, None)}
    parts = selectors._visible_parts(alice, per_part=selectors._range_parts(alice, ranges))
    sql, params = selectors._union_ids(parts).order_by("id")[:501].query.sql_with_params()
    plan = _plan(sql, params)
    assert "Seq Scan on notifications_notification" not in plan, plan
    assert len(selectors.replay_for(alice, ranges=ranges, limit=501)) == 50 + 10


@pytest.mark.django_db(transaction=True)
def test_a_send_in_a_transaction_that_stays_open_does_not_hold_up_an_unrelated_send(alice, bob):
    """Sends to different users never wait for each other (a stream per audience, no lock shared by
    every send): while one transaction that sent to alice stays open for 2 s, a send to bob on
    another connection (as from another process) commits at once."""
    import threading
    import time

    from django.db import connections, transaction

    from notifications import services

    require_postgres()
    sent_in_open_transaction, may_commit, committed = threading.Event(), threading.Event(), threading.Event()

    def slow_sender():
        try:
            with transaction.atomic():
                services.notification_send(users=[alice], title="in a long transaction")
                sent_in_open_transaction.set()
                may_commit.wait(2)
            committed.set()
        finally:
            connections.close_all()

    slow = threading.Thread(target=slow_sender)
    slow.start()
    try:
        assert sent_in_open_transaction.wait(5)
        started = time.perf_counter()
        (fast,) = services.notification_send(users=[bob], title="unrelated")
        elapsed = time.perf_counter() - started
        assert not committed.is_set(), "the unrelated send waited for the open transaction to commit"
        assert Notification.objects.filter(pk=fast.pk).exists()
        assert elapsed < 1.0, elapsed  # it did not wait for the 2 s transaction (typically a few ms)
    finally:
        may_commit.set()
        slow.join(10)
    assert committed.is_set()
