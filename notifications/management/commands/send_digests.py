"""``manage.py send_digests``: send every due digest once (``notifications.digests``), from a timer.

Prints one line of counts; exits 1 when the digest of any user failed (it is tried again at the
next run), else 0. Safe to run twice at once and after a crash (docs/deployment.md).
"""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from notifications import digests


class Command(BaseCommand):
    help = "Send the due digest emails once (run it hourly from a timer). Exit status 1 if any user's digest failed."

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="List the users whose digest is due; send nothing.")

    def handle(self, *args, dry_run: bool = False, **options):
        if dry_run:
            ids = digests.due_users()
            User = get_user_model()
            names = User.objects.in_bulk(ids)
            for user_id in ids:
                user = names.get(user_id)
                if user is not None:
                    self.stdout.write(f"{user_id} {user.get_username()} {user.email or '(no email address)'}")
            self.stdout.write(f"Digests due: {len(ids)} user{'' if len(ids) == 1 else 's'} (dry run: nothing sent).")
            return
        report = digests.send_digests()
        self.stdout.write(str(report))
        if report.failed:
            raise SystemExit(1)
