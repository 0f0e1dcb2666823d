"""Admin pages. Sending from the admin goes through ``services.notification_send``."""

from django import forms
from django.contrib import admin, messages
from django.utils import timezone

from . import services
from .auth import token_create
from .models import ApiToken, Audience, Notification, Topic


class NotificationAdminForm(forms.ModelForm):
    class Meta:
        model = Notification
        fields = ["audience", "recipient", "topic", "title", "body", "level", "link", "data"]

    def clean(self):
        data = super().clean()
        audience = data.get("audience")
        if audience == Audience.USER and not data.get("recipient"):
            self.add_error("recipient", "Choose the recipient of a user notification.")
        if audience == Audience.TOPIC and not data.get("topic"):
            self.add_error("topic", "Choose the topic of a topic notification.")
        if audience != Audience.USER:
            data["recipient"] = None
        if audience != Audience.TOPIC:
            data["topic"] = None
        if not isinstance(data.get("data"), dict):
            self.add_error("data", "data must be a JSON object.")
        return data


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    form = NotificationAdminForm
    list_display = ["title", "audience", "recipient", "topic", "level", "created_at"]
    list_filter = ["level", "audience", "topic", "created_at"]
    search_fields = ["title", "body"]
    raw_id_fields = ["recipient", "actor"]
    fields = ["audience", "recipient", "topic", "title", "body", "level", "link", "data"]

    def get_readonly_fields(self, request, obj=None):
        # A sent notification is history: editing it would not re-push, so it is read-only.
        return self.fields if obj is not None else []

    def save_model(self, request, obj, form, change):
        audience = {
            Audience.USER: {"users": [obj.recipient] if obj.recipient else []},
            Audience.TOPIC: {"topic": obj.topic},
            Audience.BROADCAST: {"broadcast": True},
        }[obj.audience]
        (first, *_) = services.notification_send(
            title=obj.title, body=obj.body, level=obj.level, data=obj.data, link=obj.link,
            actor=request.user, **audience,
        )
        obj.pk = first.pk
        obj.created_at = first.created_at


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "private", "created_at"]
    list_filter = ["private"]
    search_fields = ["slug", "title"]
    prepopulated_fields = {"slug": ["title"]}
    filter_horizontal = ["members"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["__str__", "user", "name", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["user__username", "name", "prefix"]
    fields = ["user", "name", "expires_at", "prefix", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    raw_id_fields = ["user"]
    actions = ["revoke"]

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        token, raw = token_create(user=obj.user, name=obj.name, expires_at=obj.expires_at)
        obj.pk = token.pk
        messages.warning(request, f"Copy the token now; it will not be shown again: {raw}")

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} token(s).")
