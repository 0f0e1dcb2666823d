from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from . import checks, login, signals  # noqa: F401 - registers the system checks and the receivers
