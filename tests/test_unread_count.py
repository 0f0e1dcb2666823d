"""The unread count is one written-out SQL statement (``selectors.unread_count_for``, asked at every
handshake and resume); it must count exactly what the ORM form built from the visibility rules
counts (``selectors.unread_count_orm``), in every case those rules distinguish."""

import random
from datetime import timedelta

import pytest
from django.utils import timezone

from notifications import selectors, services, streams
from notifications.models import Follow, InboxState, Notification, Receipt, Topic

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def world(make_user):
    """Two users, three topics (one followed and unfollowed again, one never followed), personal,
    topic and broadcast notifications, read and dismissed receipts, and a read watermark."""
    alice, bob = make_user("alice"), make_user("bob")
    deploys, news, quiet = (Topic.objects.create(slug=slug, title=slug) for slug in ("deploys", "news", "quiet"))
    services.topic_follow(user=alice, topic=deploys)
    services.topic_follow(user=alice, topic=news)
    sent = []
    for i in range(6):
        sent += services.notification_send(title=f"mine {i}", users=[alice, bob])
        sent += services.notification_send(title=f"deploy {i}", topic=deploys)
        sent += services.notification_send(title=f"news {i}", topic="news")
        sent += services.notification_send(title=f"quiet {i}", topic=quiet)
        sent += services.notification_send(title=f"all {i}", broadcast=True)
        if i == 2:
            services.topic_unfollow(user=alice, topic=news)  # later news is not hers
    by_title = {(n.title, n.recipient_id): n for n in sent}
    Receipt.objects.create(user=alice, notification=by_title[("mine 5", alice.pk)], read_at=timezone.now())
    Receipt.objects.create(user=alice, notification=by_title[("deploy 5", None)], dismissed_at=timezone.now())
    Receipt.objects.create(user=alice, notification=by_title[("all 4", None)], dismissed_at=timezone.now())
    Receipt.objects.create(user=bob, notification=by_title[("all 5", None)], read_at=timezone.now())  # bob's only
    InboxState.objects.create(user=alice, read_watermark=by_title[("mine 1", alice.pk)].id)
    # The follow of news ended exactly when "news 2" was created: that one is no longer hers
    # (a follow covers created_at >= its start and < its end).
    Follow.objects.filter(user=alice, topic=news).update(ended_at=by_title[("news 2", None)].created_at)
    return alice, bob, {"deploys": deploys, "news": news, "quiet": quiet}


def heads(keys):
    return streams.heads(keys)


def test_the_statement_counts_what_the_visibility_rules_count(world):
    alice, bob, topics = world
    user_stream, broadcast = streams.user_stream(alice.pk), streams.BROADCAST
    topic_streams = {slug: streams.topic_stream(t.pk) for slug, t in topics.items()}
    now = heads([user_stream, broadcast, *topic_streams.values()])
    rng = random.Random(7)
    cases = [None, {}, dict(now), {user_stream: 0}, {broadcast: 2}, {topic_streams["deploys"]: 3},
             {topic_streams["news"]: 1, topic_streams["quiet"]: 5}, {streams.user_stream(bob.pk): 1},
             {"not-a-stream": 3, user_stream: 4}]
    for _ in range(30):
        cases.append({key: rng.randint(0, head + 1) for key, head in now.items() if rng.random() < 0.6})
    for user in (alice, bob):
        for through in cases:
            assert selectors.unread_count_for(user, through=through) == selectors.unread_count_orm(
                user, through=through), (user.username, through)
    # 6 of her own + 6 deploys + news 0-1 + 6 broadcasts, less the watermark (her first 2 and
    # what came with them), one read and two dismissed.
    assert selectors.unread_count_for(alice) == selectors.unread_count_orm(alice) > 0


def test_a_user_who_joined_later_does_not_count_earlier_broadcasts(world, make_user):
    late = make_user("late")
    type(late).objects.filter(pk=late.pk).update(date_joined=timezone.now() + timedelta(seconds=1))
    late.refresh_from_db()
    assert selectors.unread_count_for(late) == selectors.unread_count_orm(late) == 0
    assert Notification.objects.filter(audience="broadcast").exists()
    assert Follow.objects.exists()
