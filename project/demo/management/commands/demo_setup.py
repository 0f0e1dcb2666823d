"""Create the demo users (alice, bob, staff admin), demo topics, and print fresh API tokens.

Idempotent: running it again keeps the users, resets their password, revokes the
previous demo tokens and prints new ones.
"""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from notifications.auth import token_create
from notifications.models import ApiToken, Topic

DEMO_PASSWORD = "notify-demo-pass"  # noqa: S105 - demo users only; refused with DEBUG=0 unless --force
TOKEN_NAME = "demo"  # noqa: S105 - a token's label, not a token
USERS = [("alice", False), ("bob", False), ("admin", True)]
TOPICS = [("announcements", "Announcements", False), ("deploys", "Deploys", False), ("security", "Security", True)]


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true", help="Run even when DEBUG is off.")

    def handle(self, *args, force, **options):
        if not settings.DEBUG and not force:
            raise CommandError("demo_setup creates users with a known password; run it with DEBUG=1 or --force.")
        User = get_user_model()
        lines = []
        for username, staff in USERS:
            user, _ = User.objects.get_or_create(username=username, defaults={"email": f"{username}@example.com"})
            user.is_staff = user.is_superuser = staff
            user.set_password(DEMO_PASSWORD)
            user.save()
            ApiToken.objects.filter(user=user, name=TOKEN_NAME, revoked_at__isnull=True).update(
                revoked_at=timezone.now()
            )
            _, raw = token_create(user=user, name=TOKEN_NAME)
            lines.append(f"  {username:<6} {'staff' if staff else 'user ':<5}  token: {raw}")
        for slug, title, private in TOPICS:
            topic, _ = Topic.objects.get_or_create(slug=slug, defaults={"title": title, "private": private})
            if private:
                topic.members.add(User.objects.get(username="admin"), User.objects.get(username="alice"))
        self.stdout.write(f"Demo users (password for all: {DEMO_PASSWORD}):")
        self.stdout.write("\n".join(lines))
        self.stdout.write("Topics: " + ", ".join(slug for slug, _, _ in TOPICS) + " (security is private)")
