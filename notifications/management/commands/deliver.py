"""``manage.py deliver``: the delivery worker (email and Web Push) on its own, for sites that run
it beside the server processes (``NOTIFICATIONS["DELIVERY_WORKER"] = False``) or from a timer."""

import signal

from django.core.management.base import BaseCommand

from notifications import delivery


class Command(BaseCommand):
    help = ("Plan and send due email and Web Push deliveries. Runs until stopped (SIGTERM, Ctrl-C); with "
            "--once, until nothing is due. Any number may run at once, beside the server processes' workers.")

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Stop when nothing is due.")

    def handle(self, *args, once: bool = False, **options):
        if once:
            done = delivery.run_until_idle(max_rounds=100_000)
            self.stdout.write(f"deliver: {done} jobs and deliveries handled")
            return
        worker = delivery.Worker()
        def stop(*_) -> None:
            worker.stopping.set()
            worker.woken.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write("deliver: running (SIGTERM or Ctrl-C stops it after the message it is sending)")
        worker.run()
        self.stdout.write("deliver: stopped")
