"""Revoke API tokens by prefix or by user, and close the live connections opened with them.

    manage.py revoke_api_token 3f9a0c1b2d4e             # the prefix the admin shows as ntf_3f9a0c1b2d4e_…
    manage.py revoke_api_token --user alice --user bob   # every active token of these users

Prints how many tokens were revoked. The connections are closed (error ``disconnected``, then
4003) on every server process through the channel layer, so run it with the servers' REDIS_URL.
"""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db.models import Q

from notifications.auth import TOKEN_PREFIX, token_revoke
from notifications.models import ApiToken


def _prefix(value: str) -> str:
    """``3f9a0c1b2d4e``, ``ntf_3f9a0c1b2d4e``, ``ntf_3f9a0c1b2d4e_…`` or a whole token: its prefix."""
    parts = value.strip().split("_")
    return parts[1] if parts[0] == TOKEN_PREFIX and len(parts) > 1 else value.strip()


class Command(BaseCommand):
    help = "Revoke API tokens by PREFIX (shown as ntf_<prefix>_…) or every token of --user; close their connections."

    def add_arguments(self, parser):
        parser.add_argument("prefixes", nargs="*", metavar="PREFIX", help="A token's prefix (ntf_<prefix>_…).")
        parser.add_argument("--user", action="append", default=[], dest="users", metavar="USERNAME",
                            help="Revoke every active token of this user (repeat for several users).")

    def handle(self, *args, prefixes, users, **options):
        if not prefixes and not users:
            raise CommandError("Name the tokens: PREFIX ... and/or --user USERNAME.")
        wanted = [_prefix(p) for p in prefixes]
        unknown = sorted(set(wanted) - set(ApiToken.objects.filter(prefix__in=wanted).values_list("prefix", flat=True)))
        if unknown:
            raise CommandError(f"No API token has the prefix {', '.join(unknown[:20])}; nothing was revoked.")
        User = get_user_model()
        field = User.USERNAME_FIELD
        known = set(User.objects.filter(**{f"{field}__in": users}).values_list(field, flat=True))
        missing = [u for u in users if u not in known]
        if missing:
            raise CommandError(f"Unknown users: {', '.join(missing[:20])}; nothing was revoked.")
        tokens = ApiToken.objects.filter(
            Q(prefix__in=wanted) | Q(**{f"user__{field}__in": users}), revoked_at__isnull=True
        ).select_related("user")
        count = 0
        for token in tokens:
            token_revoke(token)
            count += 1
        self.stdout.write(f"Revoked {count} API token{'' if count == 1 else 's'}.")
        if count and settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer":
            self.stderr.write("The in-memory channel layer reaches no server process: connections opened with "
                              "these tokens stay open until they reconnect. Set REDIS_URL as the servers do.")
