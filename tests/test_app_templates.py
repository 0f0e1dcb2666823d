"""The app as a guest on its host: it renders from its own templates, links its admin pages from the
admin index, and leaves the host's User admin alone unless asked (NOTIFICATIONS["USER_ADMIN_ACTIONS"])."""

from pathlib import Path

import django.forms
import pytest
from django.conf import settings as django_settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import Permission
from django.template.utils import get_app_template_dirs
from django.test import Client, override_settings

import notifications
from notifications.admin import NotifyingUserAdmin, SendForm, register_user_admin, user_admin_actions_enabled
from notifications.models import ApiToken

SEND_URL = "/admin/notifications/notification/send/"
ONLINE_URL = "/admin/notifications/notification/online/"
SEND_LINK = f'<a href="{SEND_URL}">Send notification</a>'
ONLINE_LINK = f'<a href="{ONLINE_URL}">Who is online</a>'
APP_TEMPLATES = Path(notifications.__file__).parent / "templates"

# The host's settings, minus any project template directory: only the apps' templates/.
APP_DIRS_ONLY = [{**django_settings.TEMPLATES[0], "DIRS": [], "APP_DIRS": True}]


@pytest.fixture
def app_templates_only():
    with override_settings(TEMPLATES=APP_DIRS_ONLY):
        yield


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def template_names(response) -> list[str]:
    return [t.name for t in response.templates]


def assert_from_apps_only(response):
    """Every template of the response was loaded from an installed app's templates/ directory
    (or, for widgets, from the form renderer's own, django/forms/templates/)."""
    app_dirs = [*get_app_template_dirs("templates"), Path(django.forms.__file__).parent / "templates"]
    for template in response.templates:
        origin = Path(template.origin.name)
        assert any(origin == Path(d) / template.name for d in app_dirs), origin


# Templates: the app's own, with no project template directory


def test_the_project_has_no_template_directory():
    assert django_settings.TEMPLATES[0]["DIRS"] == []
    assert not (Path(django_settings.BASE_DIR) / "templates").exists()


@pytest.mark.django_db
def test_notifications_page_renders_from_the_app(app_templates_only, alice):
    response = client_for(alice).get("/")
    assert response.status_code == 200
    assert template_names(response)[0] == "notifications/index.html"
    assert (APP_TEMPLATES / "notifications" / "index.html") == Path(response.templates[0].origin.name)
    assert b'id="notifications-config"' in response.content
    assert_from_apps_only(response)


@pytest.mark.django_db
def test_login_page_renders_from_the_app(app_templates_only, client):
    response = client.get("/accounts/login/?next=/")
    assert response.status_code == 200
    assert template_names(response)[0] == "notifications/login.html"
    assert b'<h1 id="signin-heading">Sign in</h1>' in response.content
    assert_from_apps_only(response)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "template"),
    [
        ("/admin/", "admin/index.html"),
        ("/admin/notifications/", "admin/notifications/app_index.html"),
        ("/admin/notifications/notification/", "admin/notifications/notification/change_list.html"),
        (SEND_URL, "notifications/admin/send.html"),
        (ONLINE_URL, "notifications/admin/online.html"),
    ],
)
def test_admin_pages_render_from_the_app(app_templates_only, admin_client, url, template):
    response = admin_client.get(url)
    assert response.status_code == 200
    assert template_names(response)[0] == template
    assert_from_apps_only(response)


@pytest.mark.django_db
def test_token_created_page_renders_from_the_app(app_templates_only, admin_client, alice):
    response = admin_client.post(
        "/admin/notifications/apitoken/add/", {"user": alice.pk, "name": "ci", "expires_at_0": "", "expires_at_1": ""}
    )
    assert response.status_code == 200
    assert template_names(response)[:2] == ["notifications/admin/token_created.html", "notifications/admin/page.html"]
    assert response.context["raw"].startswith(f"ntf_{ApiToken.objects.get().prefix}_")
    assert_from_apps_only(response)


# The admin index links the app's own pages


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/admin/", "/admin/notifications/"])
def test_admin_index_and_app_index_link_send_and_online(admin_client, url):
    page = admin_client.get(url).content.decode()
    assert page.count(SEND_LINK) == 1
    assert page.count(ONLINE_LINK) == 1


@pytest.mark.django_db
def test_other_app_indexes_do_not_link_the_pages(admin_client):
    page = admin_client.get("/admin/auth/").content.decode()
    assert SEND_URL not in page and ONLINE_URL not in page


@pytest.mark.django_db
def test_index_links_only_the_pages_the_user_may_open(make_user):
    sender = make_user("sender", staff=True)  # add_notification only: may send, may not view
    page = client_for(sender).get("/admin/").content.decode()
    assert SEND_LINK in page and ONLINE_URL not in page

    viewer = make_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_notification"))
    page = client_for(viewer).get("/admin/").content.decode()
    assert ONLINE_LINK in page and SEND_URL not in page

    other = make_user("other", is_staff=True)
    other.user_permissions.add(Permission.objects.get(codename="view_topic"))
    page = client_for(other).get("/admin/").content.decode()
    assert SEND_URL not in page and ONLINE_URL not in page and 'id="notifications-pages"' not in page


# The send form's users box says what to type


def test_send_form_users_field_tells_what_to_type():
    assert SendForm().fields["users"].help_text == (
        "Start typing a username (or a name or email address) and pick a user; pick again to add more."
    )


@pytest.mark.django_db
def test_send_page_shows_the_users_hint_tied_to_the_box(admin_client):
    page = admin_client.get(SEND_URL).content.decode()
    assert '<div class="help" id="id_users_helptext">Start typing a username' in page
    assert 'aria-describedby="id_users_helptext"' in page


# The host's User admin: changed only when USER_ADMIN_ACTIONS is true


def site_with_djangos_user_admin() -> admin.AdminSite:
    site = admin.AdminSite(name="host")
    site.register(get_user_model(), UserAdmin)
    return site


def test_user_admin_actions_are_off_unless_the_host_asks(settings):
    settings.NOTIFICATIONS = {k: v for k, v in settings.NOTIFICATIONS.items() if k != "USER_ADMIN_ACTIONS"}
    assert user_admin_actions_enabled() is False
    del settings.NOTIFICATIONS
    assert user_admin_actions_enabled() is False
    settings.NOTIFICATIONS = {"USER_ADMIN_ACTIONS": True}
    assert user_admin_actions_enabled() is True


def test_without_user_admin_actions_the_user_admin_stays_djangos(settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "USER_ADMIN_ACTIONS": False}
    site = site_with_djangos_user_admin()
    register_user_admin(site)
    assert type(site.get_model_admin(get_user_model())) is UserAdmin


def test_without_user_admin_actions_an_unregistered_user_admin_stays_unregistered(settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "USER_ADMIN_ACTIONS": False}
    site = admin.AdminSite(name="bare")
    register_user_admin(site)
    assert not site.is_registered(get_user_model())


@pytest.mark.django_db
def test_with_user_admin_actions_the_user_admin_gains_the_two_actions(settings, rf, admin_user):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "USER_ADMIN_ACTIONS": True}
    site = site_with_djangos_user_admin()
    register_user_admin(site)
    user_admin = site.get_model_admin(get_user_model())
    assert type(user_admin) is NotifyingUserAdmin
    request = rf.get("/admin/auth/user/")
    request.user = admin_user
    assert {"send_notification", "disconnect", "delete_selected"} <= set(user_admin.get_actions(request))


def test_this_project_asks_for_the_user_admin_actions():
    assert django_settings.NOTIFICATIONS["USER_ADMIN_ACTIONS"] is True
    assert type(admin.site.get_model_admin(get_user_model())) is NotifyingUserAdmin
