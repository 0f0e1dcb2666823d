"""The notifications page in a real browser (Debian's Chromium) against a real daphne process.

Each test asserts what a person sees: the toast, the badge, the list, the status.
Fixtures are in ``tests/browser/conftest.py``.
"""

import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import APP_HOST, PHONE, run_in_thread
from tests.support import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.django_db(transaction=True)]

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
UNREAD = re.compile(r"\bunread\b")


def status(page: Page):
    return page.locator("#connection-status")


def badge(page: Page):
    return page.locator("#unread-badge")


def toast(page: Page, title: str):
    return page.locator("#toasts .toast", has_text=title)


def item(page: Page, notification_id: int):
    return page.locator(f"#notification-list .item[data-id='{notification_id}']")


def sign_in(page: Page, username: str, password: str = PASSWORD) -> None:
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def expect_connected(page: Page) -> None:
    """Connected, and the inbox page read (so what the page shows is settled)."""
    expect(status(page)).to_have_attribute("data-status", "connected")
    expect(status(page).locator(".status-text")).to_have_text("Connected")
    expect(page.locator("#notification-list")).to_have_attribute("aria-busy", "false")


def open_panel(page: Page) -> None:
    if page.locator("#panel").is_hidden():
        page.locator("#bell").click()
    expect(page.locator("#panel")).to_be_visible()


def cursor(page: Page) -> dict[str, int]:
    return page.evaluate("() => window.notificationClient.cursor")


def stream_of(notification_id: int) -> tuple[str, int]:
    """``(stream, offset)`` of a stored notification: where it sits in the cursor."""
    from notifications import streams
    from notifications.models import Notification

    stored = Notification.objects.get(pk=notification_id)
    return streams.stream_of(stored), stored.offset


# Before any script of the page: every socket URL the page opens and every frame its client handles.
RECORD_SOCKETS = """
window.socketUrls = [];
window.clientFrames = [];
window.WebSocket = class extends window.WebSocket {
  constructor(url, protocols) { window.socketUrls.push(String(url)); super(url, protocols); }
};
window.notificationClientOptions = Object.assign(window.notificationClientOptions || {}, {
  onFrame: (frame) => window.clientFrames.push(frame),
});
"""


# Signing in and out


def test_without_a_session_the_page_is_the_login_page(open_page, alice):
    page = open_page(None, "/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.locator("#bell")).to_have_count(0)

    sign_in(page, "alice", "not-the-password")
    expect(page.get_by_role("alert")).to_contain_text("enter a correct username and password")
    expect(page.get_by_label("Username")).to_have_value("alice")


def test_sign_in_then_a_notification_sent_from_the_admin_form_arrives_within_2_s(open_page, alice, django_user_model):
    root = django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    page = open_page(None, "/")
    sign_in(page, "alice")
    expect(page).to_have_url(re.compile(r"^http://[^/]+/$"))
    expect_connected(page)
    expect(page.locator(".username")).to_have_text("alice")
    expect(badge(page)).to_be_hidden()

    # The admin, in another browser, fills the "Send notification" form.
    admin = open_page(root, "/admin/notifications/notification/send/")
    expect(admin.get_by_role("heading", name="Send notification")).to_be_visible()
    admin.get_by_label("Title").fill("Your order shipped")
    admin.get_by_label("Body").fill("It arrives on Tuesday.")
    admin.get_by_label("Level").select_option("success")
    admin.get_by_label("Link").fill("/orders/42/")
    admin.get_by_label("Data").fill('{"order": 42}')
    admin.get_by_label("Selected users").check()
    admin.locator(".field-users .select2-selection").click()
    admin.locator(".select2-search__field").fill("ali")
    admin.locator(".select2-results__option", has_text="alice").click()
    sent_at = time.monotonic()
    admin.get_by_role("button", name="Send", exact=True).click()

    shown = toast(page, "Your order shipped")
    expect(shown).to_be_visible(timeout=2_000)
    assert time.monotonic() - sent_at < 2.0
    expect(shown).to_contain_text("It arrives on Tuesday.")
    expect(shown).to_have_class(re.compile(r"\blevel-success\b"))
    expect(badge(page)).to_have_text("1")
    expect(admin.locator(".messagelist")).to_contain_text("Your order shipped")

    open_panel(page)
    row = page.locator("#notification-list .item", has_text="Your order shipped")
    expect(row).to_have_class(UNREAD)
    expect(row.locator(".item-meta")).to_contain_text("from root")
    expect(row.locator("a.item-link")).to_have_attribute("href", "/orders/42/")

    # Signing out (a POST form) leads back to the login page.
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_signing_out_in_another_tab_takes_this_tab_offline_as_signed_out(open_page, alice):
    first = open_page(alice, "/")
    expect_connected(first)
    second = open_page(context=first.context)
    expect_connected(second)
    second.get_by_role("button", name="Sign out").click()
    expect(second).to_have_url(re.compile(r"/accounts/login/"))
    # The server closed the first tab's socket (4010: the session changed); its reconnect has no
    # valid session any more (4001), so it stops and says so.
    expect(status(first)).to_have_attribute("data-status", "offline")
    expect(status(first).locator(".status-text")).to_have_text("Signed out")


# Live delivery


def test_two_tabs_both_show_it_and_both_badges_drop_when_it_is_read_in_one(open_page, api_send, alice):
    first = open_page(alice)
    second = open_page(context=first.context)  # another tab of the same browser
    for tab in (first, second):
        expect_connected(tab)

    sent = api_send(title="Build 7 failed", body="3 tests failed.", level="error", users=["alice"])
    for tab in (first, second):
        expect(toast(tab, "Build 7 failed")).to_be_visible(timeout=2_000)
        expect(badge(tab)).to_have_text("1")
        expect(item(tab, sent["id"])).to_have_class(UNREAD)

    open_panel(first)
    item(first, sent["id"]).locator(".item-main").click()
    for tab in (first, second):
        expect(badge(tab)).to_be_hidden()
        expect(badge(tab)).to_have_attribute("data-count", "0")
        expect(item(tab, sent["id"])).not_to_have_class(UNREAD)
    expect(first).to_have_title("Notifications")

    # Each tab shows the notification once: no duplicate toast or row.
    for tab in (first, second):
        expect(tab.locator("#toasts .toast")).to_have_count(1)
        expect(tab.locator("#notification-list .item")).to_have_count(1)


def test_a_topic_notification_reaches_only_followers(open_page, api_send, alice, bob):
    from notifications.models import Topic

    Topic.objects.create(slug="deploys", title="Deploys")
    follower = open_page(alice)
    other = open_page(bob)
    for page in (follower, other):
        expect_connected(page)
        expect(page.locator("[data-topic='deploys'] .follow-button")).to_have_text("Follow")

    follow = follower.locator("[data-topic='deploys'] .follow-button")
    before = cursor(follower)
    assert before == {f"u.{alice.pk}": 0, "b": 0}  # hello's cursor: the user's stream and broadcasts
    follow.click()
    expect(follow).to_have_text("Following")
    expect(follow).to_have_attribute("aria-pressed", "true")
    deploys = Topic.objects.get(slug="deploys")
    assert cursor(follower) == before | {f"t.{deploys.pk}": 0}  # `subscribed` added the topic's stream

    sent = api_send(title="v2 is live", topic="deploys", level="success")
    expect(toast(follower, "v2 is live")).to_be_visible(timeout=2_000)
    expect(badge(follower)).to_have_text("1")
    assert stream_of(sent["id"]) == (f"t.{deploys.pk}", 1)
    assert cursor(follower) == before | {f"t.{deploys.pk}": 1}
    open_panel(follower)
    expect(follower.locator("#notification-list .item", has_text="v2 is live")).to_contain_text("#deploys")

    # Bob's next notification arrives, and the topic one never did.
    api_send(title="Only for Bob", users=["bob"])
    expect(toast(other, "Only for Bob")).to_be_visible(timeout=2_000)
    expect(other.locator("#toasts .toast")).to_have_count(1)
    expect(badge(other)).to_have_text("1")
    open_panel(other)
    expect(other.locator("#notification-list .item")).to_have_count(1)


def test_after_a_server_restart_the_page_resumes_from_its_cursor_and_shows_what_was_sent_meanwhile(
    open_page, api_send, live, alice, settings
):
    """The resume is the one of the protocol (``?since=`` from the cursor of every stream the page
    reads, a replay of exactly what was missed, ``resumed``), not the inbox re-fetch."""
    from notifications import protocol, services
    from notifications.models import Notification, Topic

    deploys = Topic.objects.create(slug="deploys", title="Deploys")
    run_in_thread(services.topic_follow, user=alice, topic=deploys)
    page = open_page(alice, goto=False)
    page.add_init_script(RECORD_SOCKETS)
    page.goto("/")
    expect_connected(page)
    [hello] = page.evaluate("() => window.clientFrames.filter((f) => f.type === 'hello')")
    assert hello["cursor"] == {f"u.{alice.pk}": 0, "b": 0, f"t.{deploys.pk}": 0}
    seen = api_send(title="Seen before the restart", users=["alice"])
    expect(toast(page, "Seen before the restart")).to_be_visible(timeout=2_000)
    cursor_before = hello["cursor"] | dict([stream_of(seen["id"])])
    assert cursor(page) == cursor_before

    live.stop()
    expect(status(page)).to_have_attribute("data-status", "reconnecting")
    # "Reconnecting in 0.4 s" while a retry waits, "Reconnecting…" while it runs; and why (Daphne
    # drops sockets on SIGTERM without a close frame: 1006).
    expect(status(page).locator(".status-text")).to_have_text(re.compile(r"^Reconnecting( in \d+\.\d s|…)$"))
    expect(page.locator("#connection-reason")).to_be_visible()
    expect(page.locator("#connection-reason")).to_contain_text("(close 1006).")

    # Sent while the server is down, one to each stream the page reads: stored, pushed to nobody.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    missed = [
        run_in_thread(services.notification_send, **audience, title=title, level="warning")[0]
        for audience, title in [
            ({"users": [alice]}, "Sent while you were away"),
            ({"topic": deploys}, "Deployed while you were away"),
            ({"broadcast": True}, "Announced while you were away"),
        ]
    ]
    page.wait_for_timeout(300)  # a few failed reconnect attempts
    expect(status(page)).to_have_attribute("data-status", "reconnecting")
    page.evaluate("() => { window.clientFrames = []; }")

    live.start()  # the same port
    expect(status(page)).to_have_attribute("data-status", "connected", timeout=10_000)
    expect(page.locator("#connection-reason")).to_be_hidden()
    for n in missed:
        expect(toast(page, n.title)).to_be_visible()
    expect(badge(page)).to_have_text("4")
    open_panel(page)
    for n in missed:
        expect(item(page, n.id)).to_have_class(UNREAD)
    expect(page.locator("#notification-list .item")).to_have_count(4)  # nothing lost, nothing twice

    # The reconnect named the cursor of every stream and the epoch.
    url = page.evaluate("() => window.socketUrls.at(-1)")
    query = parse_qs(urlsplit(url).query)
    since = dict(pair.split(":") for pair in query["since"][0].split(","))
    assert {key: int(offset) for key, offset in since.items()} == cursor_before
    assert query["epoch"] == [hello["epoch"]]
    # The server replayed exactly the three (not the one seen before), then `resumed`.
    page.wait_for_function("() => window.clientFrames.some((f) => f.type === 'unread_count')")
    frames = page.evaluate("() => window.clientFrames")
    assert [f["type"] for f in frames] == ["hello", "notification", "notification", "notification",
                                           "resumed", "unread_count"]
    stored = Notification.objects.filter(pk__in=[n.id for n in missed]).order_by("id")
    assert frames[1:4] == [protocol.notification_frame(n) for n in stored]  # oldest first, unread
    cursor_after = cursor_before | dict(stream_of(n.id) for n in missed)
    assert frames[4] == {"type": "resumed", "recovered": True, "count": 3, "cursor": cursor_after}
    assert frames[5] == {"type": "unread_count", "count": 4}
    assert cursor(page) == cursor_after


# The cookie is not for other sites

OPEN_SOCKET = """
(url) => new Promise((resolve) => {
  const frames = [];
  const ws = new WebSocket(url, ["notifications.v2"]);
  ws.onmessage = (event) => {
    frames.push(JSON.parse(event.data));
    if (frames[0].type === "hello") { resolve({code: "open", frames}); ws.close(); }
  };
  ws.onclose = (event) => resolve({code: event.code, frames});
  setTimeout(() => { resolve({code: "no answer", frames}); ws.close(); }, 4000);
})
"""


@pytest.fixture
def foreign_site():
    """A tiny page served from another port of this machine (a site that is not ours); yields its port."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = b"<!doctype html><title>Not the notification site</title><p>Hello"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_a_page_from_a_foreign_origin_cannot_open_a_socket_with_the_users_cookie(open_page, live, alice, foreign_site):
    site = f"http://{APP_HOST}:{live.port}"
    page = open_page(None, f"{site}/")
    sign_in(page, "alice")
    expect_connected(page)  # the cookie works from the site itself

    foreign_pages = {
        # the same site (example.test), another host: the browser sends the cookie, the server refuses the Origin
        "sibling host": f"http://evil.example.test:{foreign_site}/",
        # another site: the browser does not even send the (SameSite=Lax) session cookie
        "other site": f"http://localhost:{foreign_site}/",
    }
    results = {}
    for name, url in foreign_pages.items():
        foreign = page.context.new_page()  # the same browser, so the same cookie jar
        foreign.goto(url)
        results[name] = foreign.evaluate(OPEN_SOCKET, f"ws://{APP_HOST}:{live.port}/ws/notifications/")
    assert results == {
        "sibling host": {
            "code": 4003,
            "frames": [{"type": "error", "code": "origin_not_allowed",
                        "message": "Cookie authentication needs an allowed Origin."}],
        },
        "other site": {
            "code": 4001,
            "frames": [{"type": "error", "code": "unauthenticated",
                        "message": "Authentication required: a Bearer token, a ticket or a session."}],
        },
    }
    expect_connected(page)  # the site's own page is unaffected


def test_a_page_from_another_port_of_the_same_host_cannot_open_a_socket_with_the_users_cookie(
    open_page, live, alice, foreign_site
):
    page = open_page(alice)
    expect_connected(page)
    foreign = page.context.new_page()
    foreign.goto(f"http://127.0.0.1:{foreign_site}/")
    result = foreign.evaluate(OPEN_SOCKET, f"ws://127.0.0.1:{live.port}/ws/notifications/")
    assert result == {
        "code": 4003,
        "frames": [{"type": "error", "code": "origin_not_allowed",
                    "message": "Cookie authentication needs an allowed Origin."}],
    }


def test_client_js_connects_with_a_ticket_when_asked_to(open_page, api_send, alice):
    """The cross-origin mode (POST ticketUrl, then ?ticket=), run here on the same origin."""
    page = open_page(alice)
    expect_connected(page)
    page.evaluate("""() => {
      window.ticketEvents = [];
      window.ticketClient = new NotificationClient({
        ticketUrl: "/api/ws-ticket/",
        broadcastChannel: false,
        onStatus: (status) => window.ticketEvents.push(status),
        onNotification: (n, source) => window.ticketEvents.push(`${source}: ${n.title}`),
      }).start();
    }""")
    # Functions, not expressions: Playwright evaluates an expression with eval(), which the page's CSP refuses.
    page.wait_for_function("() => window.ticketClient.status === 'connected'", timeout=5_000)
    api_send(title="Over the ticket socket", users=["alice"])
    page.wait_for_function("() => window.ticketEvents.includes('live: Over the ticket socket')", timeout=2_000)
    assert page.evaluate("window.ticketEvents") == ["connecting", "connected", "live: Over the ticket socket"]
    assert page.evaluate("window.ticketClient.unreadCount") == 1
    expect(toast(page, "Over the ticket socket")).to_be_visible()  # the page's own client got it too


# How it looks


def seed_inbox(alice) -> None:
    """A few notifications of each level, some read, and topics to follow (for the screenshots)."""
    from notifications import services
    from notifications.models import Topic

    Topic.objects.create(slug="announcements", title="Announcements")
    deploys = Topic.objects.create(slug="deploys", title="Deploys")
    security = Topic.objects.create(slug="security", title="Security", private=True)
    security.members.add(alice)
    run_in_thread(services.topic_follow, user=alice, topic=deploys)
    sent = [
        run_in_thread(services.notification_send, users=[alice], **fields)[0]
        for fields in [
            {"title": "Welcome to Notify", "body": "Notifications sent to you appear here, live."},
            {"title": "Invoice #1042 paid", "body": "€120.00 received from ACME GmbH.", "level": "success",
             "link": "/invoices/1042/"},
            {"title": "Disk usage at 85 %", "body": "db-2 will be full in about 6 days.", "level": "warning"},
        ]
    ]
    run_in_thread(services.notification_send, topic="deploys", level="error", title="Deploy of v2.3.1 failed",
                  body="2 tests failed in the payment service; v2.3.0 is still live.")
    run_in_thread(services.notification_mark_read, user=alice, ids=[sent[0].id])


def no_horizontal_scroll(page: Page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_page_at_desktop_and_phone_widths(open_page, api_send, alice, tmp_path):
    """Screenshots for the README (written to docs/screenshots/ with UPDATE_SCREENSHOTS=1); toasts are
    overlays that move nothing, and nothing scrolls sideways at 375 px."""
    seed_inbox(alice)
    folder = SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)

    desktop = open_page(alice)
    expect_connected(desktop)
    expect(badge(desktop)).to_have_text("3")
    expect(desktop.locator("[data-topic='deploys'] .follow-button")).to_have_text("Following")
    expect(desktop.locator("[data-topic='security']")).to_contain_text("private")
    open_panel(desktop)
    expect(desktop.locator("#notification-list .item")).to_have_count(4)
    expect(desktop.locator("#notification-list .item.unread")).to_have_count(3)
    layout_before = desktop.locator("main").bounding_box()
    api_send(title="Build #128 passed", body="All 412 tests green in 3 min 12 s.", level="success",
             users=["alice"])
    expect(toast(desktop, "Build #128 passed")).to_be_visible(timeout=2_000)
    expect(badge(desktop)).to_have_text("4")
    assert desktop.locator("main").bounding_box() == layout_before
    assert desktop.locator("#toasts").evaluate("e => getComputedStyle(e).position") == "fixed"
    desktop.screenshot(path=folder / "desktop.png", animations="disabled")

    phone = open_page(alice, viewport=PHONE)
    expect_connected(phone)
    expect(badge(phone)).to_have_text("4")
    expect(phone.locator("[data-topic='deploys'] .follow-button")).to_have_text("Following")  # topics laid out
    layout_before = phone.locator("main").bounding_box()
    api_send(title="Ana mentioned you", body="“Can you review the rollout plan before 3 pm?”", users=["alice"])
    expect(toast(phone, "Ana mentioned you")).to_be_visible(timeout=2_000)
    assert phone.locator("main").bounding_box() == layout_before
    assert no_horizontal_scroll(phone)
    phone.screenshot(path=folder / "phone.png", animations="disabled")
    open_panel(phone)
    expect(phone.locator("#notification-list .item")).to_have_count(6)
    assert no_horizontal_scroll(phone)
    phone.screenshot(path=folder / "phone-inbox.png", animations="disabled")


def test_the_delivery_settings_at_desktop_and_phone_widths(open_page, alice, tmp_path):
    """Screenshots of the delivery settings dialog (docs/screenshots/preferences.png and
    phone-preferences.png with UPDATE_SCREENSHOTS=1), a few rules ticked; nothing scrolls sideways at 375 px."""
    from notifications import services
    from notifications.models import Topic

    seed_inbox(alice)
    security = Topic.objects.get(slug="security")
    run_in_thread(services.topic_follow, user=alice, topic=security)
    services.topic_default_set(topic=security, email=True, digest=False, push=True)
    services.preferences_set(user=alice, rules=[
        {"scope": "own", "email": True, "push": True},
        {"scope": "topic", "key": "deploys", "digest": True},
        {"scope": "level", "key": "error", "email": True, "push": True},
        {"scope": "level", "key": "warning", "digest": True},
    ], settings={"timezone": "Europe/Paris", "quiet_start": "22:00", "quiet_end": "07:00", "digest": "daily"})
    folder = SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)

    # Desktop: tall enough for the whole dialog.
    for viewport, name in [({"width": 1280, "height": 1180}, "preferences.png"), (PHONE, "phone-preferences.png")]:
        page = open_page(alice, viewport=viewport)
        expect_connected(page)
        page.get_by_role("button", name="Delivery settings").click()
        dialog = page.get_by_role("dialog", name="Delivery settings")
        expect(dialog).to_be_visible()
        expect(dialog.locator(".dialog-body")).to_have_attribute("aria-busy", "false")
        expect(page.get_by_role("checkbox", name="Deploys: Digest")).to_be_checked()
        expect(page.get_by_role("checkbox", name="Security: Email")).to_be_checked()  # staff's default
        expect(page.locator("#push-state")).not_to_have_text("Checking…")
        assert no_horizontal_scroll(page)
        page.screenshot(path=folder / name, animations="disabled")
