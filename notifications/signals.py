"""Model changes made anywhere (the admin, a shell, a data migration) that open connections must follow.

A topic or a user can be changed outside this app's services, and a live socket that was not told
would keep routing, or keep serving, what it may no longer have. These receivers only notice the
change and hand it to the service that decides (``services``); no decision is made here.

- a topic renamed or deleted: ``services.topic_renamed`` / ``topic_deleted`` (sockets route topics
  by id, and hear ``unsubscribed``/``subscribed``);
- a topic made private, or a member removed: ``services.topic_members_changed`` after commit
  (by then the admin has saved the new member list too);
- a user's password changed, or a session logged out: ``services.user_sessions_changed`` closes
  the user's session-authenticated sockets (4010: reconnect; a session that is no longer valid is
  then refused with 4001);
- a user deactivated: ``services.user_deactivated`` closes every socket of the user (4003).
"""

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save
from django.dispatch import receiver

from . import services
from .models import Topic


@receiver(pre_save, sender=Topic, dispatch_uid="notifications.topic_before_save")
def _remember_topic(sender, instance: Topic, raw=False, **kwargs):
    saved = None
    if not raw and instance.pk is not None:
        saved = Topic.objects.filter(pk=instance.pk).values("slug", "private").first()
    instance._saved_state = saved  # type: ignore[attr-defined]


@receiver(post_save, sender=Topic, dispatch_uid="notifications.topic_saved")
def _topic_saved(sender, instance: Topic, created=False, raw=False, **kwargs):
    before = getattr(instance, "_saved_state", None)
    if raw or created or before is None:
        return
    if before["slug"] != instance.slug:
        services.topic_renamed(topic=instance, old_slug=before["slug"])
    if instance.private and not before["private"]:
        transaction.on_commit(lambda: services.topic_members_changed(topic=instance))


@receiver(m2m_changed, sender=Topic.members.through, dispatch_uid="notifications.topic_members")
def _topic_members_changed(sender, instance, action, reverse=False, **kwargs):
    if action not in ("post_remove", "post_clear"):
        return
    topics = [instance] if not reverse else list(Topic.objects.filter(pk__in=kwargs.get("pk_set") or ()))
    if reverse and action == "post_clear":  # user.member_topics.clear(): which topics is not known
        topics = list(Topic.objects.filter(private=True))
    for topic in topics:
        transaction.on_commit(lambda topic=topic: services.topic_members_changed(topic=topic))


@receiver(post_delete, sender=Topic, dispatch_uid="notifications.topic_deleted")
def _topic_deleted(sender, instance: Topic, **kwargs):
    services.topic_deleted(topic_id=instance.pk, slug=instance.slug)


@receiver(pre_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="notifications.user_before_save")
def _user_before_save(sender, instance, raw=False, update_fields=None, **kwargs):
    instance._was_active = None
    if raw or instance.pk is None or (update_fields is not None and not {"password", "is_active"} & set(update_fields)):
        return
    stored = sender._default_manager.filter(pk=instance.pk).values_list("password", "is_active").first()
    if stored is None:
        return
    password, instance._was_active = stored
    if (update_fields is None or "password" in update_fields) and password != instance.password:
        services.user_sessions_changed(user_id=instance.pk, reason="password changed")


@receiver(post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="notifications.user_saved")
def _user_saved(sender, instance, created=False, raw=False, **kwargs):
    """Deactivated anywhere (the admin, a shell, the host's own views): every live connection of
    the user closes after commit (``services.user_deactivated``). ``QuerySet.update`` sends no
    signal: call ``services.user_deactivated`` after one (docs/security.md)."""
    if not raw and not created and getattr(instance, "_was_active", None) and not instance.is_active:
        services.user_deactivated(user=instance)


@receiver(user_logged_out, dispatch_uid="notifications.logged_out")
def _logged_out(sender, request, user, **kwargs):
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if user is not None and session_key:
        services.user_sessions_changed(user_id=user.pk, reason="logged out", session_key=session_key)
