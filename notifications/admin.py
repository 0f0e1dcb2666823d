"""Admin pages. Every send goes through ``services.notification_send`` (no second code path).

Besides the model pages: "Send notification" (a form with a frame preview) and
"Who is online" (presence across all server processes), linked from the admin index, the
app's index and the notification list; an action to resend notifications; and, only when
``NOTIFICATIONS["USER_ADMIN_ACTIONS"]`` is true, actions on the host's User admin to notify
or disconnect users.

How the two pages reach the admin index: the least invasive of Django's documented ways,
template overrides only, both including ``notifications/admin/index_links.html``.
``admin/notifications/app_index.html``, which the admin looks up by app label, puts them in the
right-hand column of /admin/notifications/. The admin has no per-app template for /admin/, so
``admin/index.html`` extends the admin's own and replaces only its content block (the app list)
with the same list followed by the links; it is found when "notifications" comes before
"django.contrib.admin" in INSTALLED_APPS, else /admin/ stays Django's. Not a custom
``AdminSite`` or ``get_app_list`` (the host's site is the host's), not ``index_template`` (one
per site, and the host may have set it), not proxy models (a table, permissions and content
types for two links).
"""

import json
from collections import Counter

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.widgets import AutocompleteSelectMultiple
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, Q
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html

from . import conf, protocol, selectors, services, socket_receipts
from .auth import token_create, token_revoke
from .models import (
    ApiToken,
    Audience,
    Delivery,
    DeliveryJob,
    DeliverySettings,
    Level,
    Notification,
    Preference,
    PreferenceScope,
    PushSubscription,
    SocketReceipt,
    Topic,
)
from .presence import get_presence

User = get_user_model()


class SendForm(forms.Form):
    """The "Send notification" form: content, then exactly one audience."""

    AUDIENCES = [("users", "Selected users"), ("topic", "Followers of a topic"), ("broadcast", "Everyone")]

    title = forms.CharField(max_length=services.TITLE_MAX)
    body = forms.CharField(required=False, max_length=services.BODY_MAX, widget=forms.Textarea(attrs={"rows": 3}))
    level = forms.ChoiceField(choices=Level.choices, initial=Level.INFO)
    link = forms.CharField(required=False, max_length=2000, help_text="An http(s) URL or a path starting with /.")
    data = forms.CharField(  # type: ignore[assignment]  # a form field: Django moves it off the class
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": '{"key": "value"}'}),
        help_text="A JSON object, delivered to clients unchanged.",
    )
    audience = forms.ChoiceField(choices=AUDIENCES, widget=forms.RadioSelect, initial="users")
    users = forms.ModelMultipleChoiceField(
        queryset=User.objects.filter(is_active=True),
        required=False,
        # Select2 searching the User admin's search_fields; no Ctrl/Cmd: each pick is added.
        widget=AutocompleteSelectMultiple(Notification._meta.get_field("recipient"), admin.site),
        help_text="Start typing a username (or a name or email address) and pick a user; pick again to add more.",
    )
    topic = forms.ModelChoiceField(queryset=Topic.objects.all(), required=False, to_field_name="slug")

    def clean_data(self):
        text = self.cleaned_data["data"].strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ValidationError(f"Not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValidationError("data must be a JSON object, like {\"key\": \"value\"}.")
        return value

    def clean(self):
        data = super().clean()
        audience = data.get("audience")
        if audience == "users" and not data.get("users") and "users" not in self.errors:
            self.add_error("users", "Choose at least one user, or another audience.")
        if audience == "topic" and not data.get("topic") and "topic" not in self.errors:
            self.add_error("topic", "Choose a topic, or another audience.")
        return data

    def audience_kwargs(self) -> dict:
        audience = self.cleaned_data["audience"]
        if audience == "users":
            return {"users": list(self.cleaned_data["users"])}
        if audience == "topic":
            return {"topic": self.cleaned_data["topic"]}
        return {"broadcast": True}

    def send_kwargs(self) -> dict:
        fields = ("title", "body", "level", "link", "data")
        return {name: self.cleaned_data[name] for name in fields} | self.audience_kwargs()


def _reach(kwargs: dict) -> tuple[int, int]:
    """How many users an audience has, and how many open connections it reaches now."""
    online = get_presence().online()
    if "users" in kwargs:
        ids = {u.pk for u in kwargs["users"]}
        return len(ids), sum(1 for c in online if c.user_id in ids)
    if "topic" in kwargs:
        slug = kwargs["topic"].slug
        followers = selectors.active_follows().filter(topic__slug=slug).count()
        return followers, sum(1 for c in online if slug in c.topics)
    return User.objects.filter(is_active=True).count(), len(online)


def _preview_frame(kwargs: dict, actor) -> dict:
    topic = kwargs.get("topic")
    audience = Audience.USER if "users" in kwargs else Audience.TOPIC if topic else Audience.BROADCAST
    sample = Notification(
        id=0,
        audience=audience,
        topic=topic,
        title=kwargs["title"],
        body=kwargs["body"],
        level=kwargs["level"],
        data=kwargs["data"],
        link=kwargs["link"],
        actor=actor,
        created_at=timezone.now(),
    )
    return protocol.notification_frame(sample)


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
        if not isinstance(data.get("data"), dict):
            self.add_error("data", "data must be a JSON object.")
        return data


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    form = NotificationAdminForm
    list_display = ["title", "audience_label", "level", "created_at", "read_by"]
    list_filter = ["level", "audience", "topic", "created_at"]
    search_fields = ["title", "body", "recipient__username", "topic__slug"]
    raw_id_fields = ["recipient"]
    list_select_related = ["recipient", "topic"]
    list_per_page = 50
    date_hierarchy = "created_at"
    fields = ["audience", "recipient", "topic", "title", "body", "level", "link", "data"]
    actions = ["resend"]
    change_list_template = "admin/notifications/notification/change_list.html"

    @admin.display(description="audience", ordering="audience")
    def audience_label(self, obj):
        if obj.audience == Audience.USER:
            return f"user {obj.recipient}"
        if obj.audience == Audience.TOPIC:
            return f"topic {obj.topic}"
        return "everyone"

    @admin.display(description="read by")
    def read_by(self, obj):
        return selectors.read_count(obj)

    @admin.display(description="deliveries")
    def deliveries(self, obj):
        sockets = socket_receipts.receipts_of(obj).count()
        live = f"live frame handed to the sockets of {sockets} user(s)"
        counts = Counter(obj.deliveries.values_list("channel", "status"))
        if not counts:
            return f"{live}; no email or push (no preference asked for one)"
        text = ", ".join(f"{channel} {status}: {n}" for (channel, status), n in sorted(counts.items()))
        url = reverse("admin:notifications_delivery_changelist") + f"?notification__id__exact={obj.pk}"
        return format_html('{}; {} (<a href="{}">see each</a>)', live, text, url)

    def get_readonly_fields(self, request, obj=None):
        # A sent notification is history: editing it would not re-push it. Use "Resend" instead.
        return [*self.fields, "read_by", "deliveries"] if obj is not None else []

    def get_fields(self, request, obj=None):
        return [*self.fields, "read_by", "deliveries"] if obj is not None else self.fields

    def save_model(self, request, obj, form, change):
        audience = {
            Audience.USER: {"users": [obj.recipient]},
            Audience.TOPIC: {"topic": obj.topic},
            Audience.BROADCAST: {"broadcast": True},
        }[obj.audience]
        (first, *_) = services.notification_send(
            title=obj.title, body=obj.body, level=obj.level, data=obj.data, link=obj.link,
            actor=request.user, **audience,
        )
        obj.pk, obj.created_at = first.pk, first.created_at

    @admin.action(description="Resend selected notifications", permissions=["add"])
    def resend(self, request, queryset):
        sent = [services.notification_resend(notification=n, actor=request.user) for n in queryset]
        self.message_user(request, f"Resent {len(sent)} notification(s).", messages.SUCCESS)

    def get_urls(self):
        own = [
            path("send/", self.admin_site.admin_view(self.send_view), name="notifications_send"),
            path("online/", self.admin_site.admin_view(self.online_view), name="notifications_online"),
        ]
        return own + super().get_urls()

    def send_view(self, request):
        if not self.has_add_permission(request):
            raise PermissionDenied
        initial = {}
        if request.method == "GET" and request.GET.get("users"):
            ids = [int(i) for i in request.GET["users"].split(",") if i.isdigit()]
            initial = {"audience": "users", "users": User.objects.filter(pk__in=ids)}
        form = SendForm(request.POST or None, initial=initial)
        preview = None
        if request.method == "POST" and form.is_valid():
            kwargs = form.send_kwargs()
            if "preview" in request.POST:
                preview = json.dumps(_preview_frame(kwargs, request.user), indent=2, ensure_ascii=False)
            else:
                try:
                    rows = services.notification_send(actor=request.user, **kwargs)
                except ValidationError as exc:
                    for field, errors in getattr(exc, "message_dict", {"__all__": exc.messages}).items():
                        form.add_error(field if field in form.fields else None, errors)
                else:
                    users, connections = _reach(kwargs)
                    self.message_user(
                        request,
                        f"Sent “{rows[0].title}” to {users} user(s); it reached {connections} open connection(s).",
                        messages.SUCCESS,
                    )
                    return redirect("admin:notifications_notification_changelist")
        context = {
            **self.admin_site.each_context(request),
            "title": "Send notification",
            "opts": self.model._meta,
            "form": form,
            "media": self.media + form.media,
            "preview": preview,
        }
        return TemplateResponse(request, "notifications/admin/send.html", context)

    def online_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        connections = get_presence().online()
        by_user: dict[int, dict] = {}
        for c in connections:
            entry = by_user.setdefault(c.user_id, {"username": c.username, "connections": []})
            entry["connections"].append(c)
        topics = Counter(slug for c in connections for slug in c.topics)
        now = timezone.now().timestamp()
        context = {
            **self.admin_site.each_context(request),
            "title": "Who is online",
            "opts": self.model._meta,
            "users": sorted(by_user.values(), key=lambda e: e["username"]),
            "connection_count": len(connections),
            "topics": sorted(topics.items()),
            "now": now,
            "presence_ttl": conf.settings.PRESENCE_TTL,
        }
        return TemplateResponse(request, "notifications/admin/online.html", context)


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "private", "followers", "created_at"]
    list_filter = ["private"]
    search_fields = ["slug", "title"]
    prepopulated_fields = {"slug": ["title"]}
    filter_horizontal = ["members"]

    def get_queryset(self, request):
        active = Q(follows__ended_at__isnull=True)
        return super().get_queryset(request).annotate(follower_count=Count("follows", filter=active, distinct=True))

    @admin.display(description="followers", ordering="follower_count")
    def followers(self, obj):
        return obj.follower_count

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        removed = services.topic_members_changed(topic=form.instance)
        if removed:
            self.message_user(request, f"{len(removed)} follower(s) who are not members no longer follow it.")


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
        obj.pk, obj.prefix, obj.created_at = token.pk, token.prefix, token.created_at
        request._raw_token = raw  # for response_add, this request only

    def response_add(self, request, obj, post_url_continue=None):
        """Show the raw token once, in this response: not in a message (Django keeps messages in a
        signed but readable cookie), not after a redirect, and not cacheable."""
        context = {**self.admin_site.each_context(request), "title": "API token created", "opts": self.opts,
                   "token": obj, "raw": request._raw_token}
        response = TemplateResponse(request, "notifications/admin/token_created.html", context)
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke selected tokens (closes their live connections)")
    def revoke(self, request, queryset):
        tokens = list(queryset.filter(revoked_at__isnull=True))
        for token in tokens:
            token_revoke(token)
        self.message_user(request, f"Revoked {len(tokens)} token(s).")


def user_admin_actions_enabled() -> bool:
    """Whether the host asked for the two actions on its User admin (NOTIFICATIONS["USER_ADMIN_ACTIONS"])."""
    return bool(conf.settings.USER_ADMIN_ACTIONS)


class NotifyingUserAdmin(UserAdmin):
    """Django's User admin with two actions (deactivation closes live connections with any User admin:
    ``notifications.signals``)."""

    actions = [*(UserAdmin.actions or []), "send_notification", "disconnect"]  # type: ignore[misc]

    def has_send_notification_permission(self, request):
        return request.user.has_perm("notifications.add_notification")

    @admin.action(description="Send a notification to selected users", permissions=["send_notification"])
    def send_notification(self, request, queryset):
        ids = ",".join(str(pk) for pk in queryset.values_list("pk", flat=True))
        return redirect(f"{reverse('admin:notifications_send')}?users={ids}")

    @admin.action(
        description="Disconnect selected users (close their live connections, code 4003)", permissions=["change"]
    )
    def disconnect(self, request, queryset):
        ids = list(queryset.values_list("pk", flat=True))
        services.users_disconnect(user_ids=ids)
        self.message_user(request, f"Disconnected every live connection of {len(ids)} user(s).")


def register_user_admin(site: admin.AdminSite = admin.site) -> None:
    """Replace the User admin with NotifyingUserAdmin when USER_ADMIN_ACTIONS is true; else leave it alone."""
    if not user_admin_actions_enabled():
        return
    if site.is_registered(User):
        site.unregister(User)
    site.register(User, NotifyingUserAdmin)


register_user_admin()


class PreferenceAdminForm(forms.ModelForm):
    class Meta:
        model = Preference
        fields = ["user", "scope", "key", "email", "digest", "push"]

    def clean(self):
        data = super().clean()
        scope, key, user = data.get("scope"), data.get("key") or "", data.get("user")
        if scope in (PreferenceScope.OWN, PreferenceScope.BROADCAST) and key:
            self.add_error("key", f"A rule of scope {scope!r} has no key: leave it empty.")
        elif scope == PreferenceScope.LEVEL and key not in Level.values:
            self.add_error("key", f"Give a level: {', '.join(Level.values)}.")
        elif scope == PreferenceScope.TOPIC and not Topic.objects.filter(slug=key).exists():
            self.add_error("key", "Give the slug of an existing topic.")
        if user is None and scope and scope != PreferenceScope.TOPIC:
            self.add_error("user", "Only a topic rule may be a staff default (no user).")
        return data


class RuleKindFilter(admin.SimpleListFilter):
    title = "kind"
    parameter_name = "kind"

    def lookups(self, request, model_admin):
        return [("user", "Users' rules"), ("staff", "Staff defaults (per topic)")]

    def queryset(self, request, queryset):
        if self.value() == "user":
            return queryset.filter(user__isnull=False)
        if self.value() == "staff":
            return queryset.filter(user__isnull=True)
        return queryset


@admin.register(Preference)
class PreferenceAdmin(admin.ModelAdmin):
    """Users' delivery rules and the staff defaults of topics (rows without a user)."""

    form = PreferenceAdminForm
    list_display = ["__str__", "user", "scope", "key", "email", "digest", "push", "updated_at"]
    list_filter = [RuleKindFilter, "scope", "email", "digest", "push"]
    search_fields = ["user__username", "key"]
    raw_id_fields = ["user"]
    list_select_related = ["user"]


@admin.register(DeliverySettings)
class DeliverySettingsAdmin(admin.ModelAdmin):
    list_display = ["user", "timezone", "quiet_start", "quiet_end", "digest", "push_only_offline", "last_digest_at"]
    list_filter = ["digest", "push_only_offline"]
    readonly_fields = ["last_digest_at", "digest_claim_until"]
    search_fields = ["user__username", "timezone"]
    raw_id_fields = ["user"]
    list_select_related = ["user"]


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    """What each notification did on each external channel for each user (written by the
    delivery worker and send_digests, never by hand); "Send again" puts failed ones back."""

    list_display = ["notification", "user", "channel", "status", "attempts", "due_at", "sent_at", "short_error"]
    list_filter = ["channel", "status", "sent_at"]
    search_fields = ["user__username", "user__email", "notification__title", "error"]
    list_select_related = ["notification", "user"]
    readonly_fields = ["notification", "user", "channel", "status", "attempts", "due_at", "created_at", "sent_at",
                       "error", "sent_to"]
    exclude = ["claim"]
    date_hierarchy = "created_at"
    actions = ["send_again"]

    @admin.display(description="error")
    def short_error(self, obj):
        return obj.error[:80] + ("…" if len(obj.error) > 80 else "")

    def has_add_permission(self, request):
        return False

    @admin.action(description="Send again (failed or skipped ones, now)", permissions=["change"])
    def send_again(self, request, queryset):
        count = services.deliveries_retry(ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} deliveries will be sent again.", messages.SUCCESS)


@admin.register(DeliveryJob)
class DeliveryJobAdmin(admin.ModelAdmin):
    """Sends whose deliveries the worker has not planned yet (normally empty within seconds)."""

    list_display = ["pk", "created_at", "due_at", "notification_count"]
    readonly_fields = ["notification_ids", "created_at", "due_at"]
    exclude = ["claim"]

    @admin.display(description="notifications")
    def notification_count(self, obj):
        return len(obj.notification_ids)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(PushSubscription)
class PushSubscriptionAdmin(admin.ModelAdmin):
    """Browsers registered for Web Push; deleting one stops pushes to that browser."""

    list_display = ["user", "push_service", "user_agent", "created_at", "last_success_at"]
    search_fields = ["user__username", "endpoint", "user_agent"]
    list_select_related = ["user"]
    readonly_fields = ["user", "endpoint", "p256dh", "auth", "user_agent", "created_at", "last_success_at"]

    @admin.display(description="push service")
    def push_service(self, obj):
        from urllib.parse import urlsplit

        return urlsplit(obj.endpoint).hostname

    def has_add_permission(self, request):
        return False


@admin.register(SocketReceipt)
class SocketReceiptAdmin(admin.ModelAdmin):
    """How far each user's sockets got in each stream (the live channel's delivery record)."""

    list_display = ["user", "stream", "offset", "at"]
    search_fields = ["user__username", "stream"]
    list_select_related = ["user"]
    readonly_fields = ["user", "stream", "offset", "at"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
