"""Print one new API token per username, one per line, in argument order; nothing else on stdout."""

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from notifications.auth import token_build
from notifications.models import ApiToken

SEND_PERMISSION = ("notifications", "add_notification")


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("usernames", nargs="+", metavar="USERNAME")
        parser.add_argument("--create-users", action="store_true", help="Create users that do not exist.")
        parser.add_argument(
            "--staff", action="store_true", help="Make the users staff with permission to send notifications."
        )
        parser.add_argument("--name", default="", help="A label for the tokens.")
        parser.add_argument("--expires-days", type=int, default=None, help="Expire the tokens after N days.")

    @transaction.atomic
    def handle(self, *args, usernames, create_users, staff, name, expires_days, **options):
        User = get_user_model()
        field = User.USERNAME_FIELD
        # Django's normalization (NFKC: "ａlice" is "alice"), as the admin and the signup forms apply it.
        usernames = [User.normalize_username(u) for u in usernames]
        wanted = list(dict.fromkeys(usernames))
        users = {getattr(u, field): u for u in User.objects.filter(**{f"{field}__in": wanted})}
        missing = [u for u in wanted if u not in users]
        if missing and not create_users:
            raise CommandError(f"Unknown users (use --create-users): {', '.join(missing[:20])}")
        if missing:
            self._check_new_usernames(User, missing)
            User.objects.bulk_create(
                [User(**{field: u}, password=make_password(None), is_staff=staff) for u in missing]
            )
            users = {getattr(u, field): u for u in User.objects.filter(**{f"{field}__in": wanted})}
        if staff:
            self._make_senders(list(users.values()))
        expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
        built = [token_build(user=users[u], name=name, expires_at=expires_at) for u in usernames]
        ApiToken.objects.bulk_create([token for token, _ in built])
        self.stdout.write("\n".join(raw for _, raw in built))

    @staticmethod
    def _check_new_usernames(User, names: list[str]) -> None:
        """Refuse a name the model's validators refuse ("alice " has a space), or one that differs
        from another user's, or another new one's, only by case ("Alice" beside "alice")."""
        field = User._meta.get_field(User.USERNAME_FIELD)
        problems = []
        for name in names:
            try:
                field.run_validators(name)
            except ValidationError as exc:
                problems.append(f"{name!r}: {' '.join(exc.messages)}")
        folded: dict[str, str] = {}
        for name in names:
            if name.casefold() in folded:
                problems.append(f"{name!r}: differs from {folded[name.casefold()]!r} only by case")
            folded.setdefault(name.casefold(), name)
        for name in names:
            existing = User.objects.filter(**{f"{User.USERNAME_FIELD}__iexact": name}).first()
            if existing is not None:
                problems.append(f"{name!r}: differs from the existing user {existing.get_username()!r} only by case")
        if problems:
            raise CommandError("Cannot create these users: " + "; ".join(problems[:20]))

    @staticmethod
    def _make_senders(users):
        User = get_user_model()
        User.objects.filter(pk__in=[u.pk for u in users]).update(is_staff=True)
        permission = Permission.objects.get(content_type__app_label=SEND_PERMISSION[0], codename=SEND_PERMISSION[1])
        Through = User.user_permissions.through
        Through.objects.bulk_create(
            [Through(user_id=u.pk, permission_id=permission.pk) for u in users], ignore_conflicts=True
        )
