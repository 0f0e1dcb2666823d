"""Print a new VAPID key pair for Web Push: the two NOTIFICATIONS lines to paste into settings
(``--format env``: VAPID_PRIVATE_KEY=... and VAPID_PUBLIC_KEY=... lines for the environment).
Nothing else on stdout; keep the private key secret."""

from django.core.management.base import BaseCommand, CommandError

from notifications import webpush


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("--format", choices=["settings", "env"], default="settings",
                            help="settings: lines of the NOTIFICATIONS dict (default); env: VAR=value lines.")

    def handle(self, *args, format, **options):
        try:
            private, public = webpush.generate_keys()
        except ImportError as exc:
            raise CommandError(f"{exc}: {webpush.INSTALL_HINT}") from None
        if format == "env":
            self.stdout.write(f"VAPID_PRIVATE_KEY={private}\nVAPID_PUBLIC_KEY={public}")
            self.stderr.write("Set VAPID_SUBJECT too (mailto:you@example.com or an https URL).")
        else:
            self.stdout.write(f'    "VAPID_PRIVATE_KEY": "{private}",\n    "VAPID_PUBLIC_KEY": "{public}",')
            self.stderr.write('Paste into NOTIFICATIONS = {...} in your settings, with "VAPID_SUBJECT": '
                              '"mailto:you@example.com" (or an https URL).')
