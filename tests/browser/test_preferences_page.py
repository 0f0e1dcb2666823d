"""The delivery settings dialog of the notifications page (docs/delivery.md, "Preferences") in a real
browser (Debian's Chromium) against a real daphne process: what a person ticks is what
``GET /api/preferences/`` reports, bad input shows next to its field and stores nothing, and the
Web Push toggle and service worker work as far as headless Chromium allows.

Fixtures are in ``tests/browser/conftest.py``.
"""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import CLIENT_OPTIONS, DESKTOP, run_in_thread
from tests.conftest import token_for
from tests.server import http_request
from tests.support import session_cookie

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.django_db(transaction=True)]

SERVICE_WORKER = Path(__file__).resolve().parents[2] / "notifications" / "static" / "notifications" / "sw.js"
BROWSER_TIMEZONE = "Europe/Paris"
OFF = {"email": False, "digest": False, "push": False}


@pytest.fixture
def open_paris_page(browser, live) -> Iterator[Callable[..., Page]]:
    """Like ``open_page``, in a browser whose time zone is Europe/Paris (the one the dialog suggests)."""
    contexts = []

    def open_(user, *, permissions: list[str] | None = None) -> Page:
        context = browser.new_context(base_url=live.url, viewport=DESKTOP, timezone_id=BROWSER_TIMEZONE)
        contexts.append(context)
        context.set_default_timeout(5_000)
        context.add_init_script(CLIENT_OPTIONS)
        context.add_cookies([{"name": "sessionid", "value": session_cookie(user), "url": live.url}])
        if permissions:
            context.grant_permissions(permissions, origin=live.url)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto("/")
        expect(page.locator("#connection-status")).to_have_attribute("data-status", "connected")
        return page

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def topics(alice) -> dict[str, Any]:
    """Two topics alice follows: ``deploys`` (no default) and ``releases`` (staff default: email)."""
    from notifications import services
    from notifications.models import Topic

    deploys = Topic.objects.create(slug="deploys", title="Deploys")
    releases = Topic.objects.create(slug="releases", title="Releases")
    Topic.objects.create(slug="random", title="Random")  # not followed: no row
    for topic in (deploys, releases):
        run_in_thread(services.topic_follow, user=alice, topic=topic)
    services.topic_default_set(topic=releases, email=True, digest=False, push=False)
    return {"deploys": deploys, "releases": releases}


def open_settings(page: Page) -> None:
    page.get_by_role("button", name="Delivery settings").click()
    expect(page.get_by_role("dialog", name="Delivery settings")).to_be_visible()
    expect(page.locator("#settings .dialog-body")).to_have_attribute("aria-busy", "false")


def box(page: Page, row: str, channel: str):
    return page.get_by_role("checkbox", name=f"{row}: {channel}", exact=True)


def row(page: Page, scope: str, key: str = ""):
    return page.locator(f"#settings tr.rule-row[data-scope='{scope}'][data-key='{key}']")


def save(page: Page) -> None:
    page.get_by_role("button", name="Save").click()


def preferences_of(live, user) -> dict:
    response = http_request(live, "GET", "/api/preferences/", token=token_for(user))
    assert response.status == 200, response.text
    return response.json()


def stored(user) -> tuple[list[tuple], bool]:
    """The user's rules as (scope, key, email, digest, push), and whether they have settings."""
    from notifications import preferences
    from notifications.models import DeliverySettings

    rules = [(r.scope, r.key, r.email, r.digest, r.push) for r in preferences.rules_of(user)]
    return rules, DeliverySettings.objects.filter(user=user).exists()


def test_what_is_ticked_and_saved_is_what_the_api_reports_and_shows_after_a_reload(
    open_paris_page, live, alice, topics
):
    page = open_paris_page(alice)
    open_settings(page)
    dialog = page.get_by_role("dialog", name="Delivery settings")
    expect(dialog).to_contain_text("inbox and the live bell always get every notification")
    expect(dialog).to_contain_text("unfollow it")
    # One row each: sent to me, broadcasts, the two followed topics, four levels.
    expect(page.locator("#settings tr.rule-row")).to_have_count(8)
    expect(row(page, "topic", "random")).to_have_count(0)
    # Without a rule, a topic shows its default, with a note; "releases" has staff's email default.
    expect(row(page, "topic", "deploys").locator(".tag-default")).to_be_visible()
    expect(row(page, "topic", "releases").locator(".tag-default")).to_be_visible()
    expect(box(page, "Releases", "Email")).to_be_checked()
    expect(box(page, "Deploys", "Email")).not_to_be_checked()
    expect(row(page, "level", "error").locator(".tag-default")).to_have_count(0)
    expect(page.get_by_label("Time zone", exact=True)).to_have_value("UTC")

    box(page, "Deploys", "Email").check()
    expect(row(page, "topic", "deploys").locator(".tag-default")).to_be_hidden()  # now a rule of its own
    box(page, "Error", "Email").check()
    # Ticked and unticked again: back at the default, so no rule.
    box(page, "Broadcasts", "Push").check()
    box(page, "Broadcasts", "Push").uncheck()
    page.get_by_role("button", name=f"Use {BROWSER_TIMEZONE}").click()
    expect(page.get_by_label("Time zone", exact=True)).to_have_value(BROWSER_TIMEZONE)
    page.get_by_label("From", exact=True).fill("22:00")
    page.get_by_label("to", exact=True).fill("07:00")
    page.get_by_label("Digest email").select_option("hourly")
    save(page)
    expect(page.locator("#settings-status")).to_have_text("Saved")

    body = preferences_of(live, alice)
    assert body["rules"] == [
        {"scope": "level", "key": "error", "email": True, "digest": False, "push": False},
        {"scope": "topic", "key": "deploys", "email": True, "digest": False, "push": False},
    ]
    assert body["settings"] == {"timezone": BROWSER_TIMEZONE, "quiet_start": "22:00", "quiet_end": "07:00",
                                "digest": "hourly", "push_only_offline": True}

    page.reload()
    expect(page.locator("#connection-status")).to_have_attribute("data-status", "connected")
    open_settings(page)
    expect(box(page, "Deploys", "Email")).to_be_checked()
    expect(box(page, "Error", "Email")).to_be_checked()
    expect(box(page, "Releases", "Email")).to_be_checked()  # still the default
    expect(row(page, "topic", "releases").locator(".tag-default")).to_be_visible()
    expect(row(page, "topic", "deploys").locator(".tag-default")).to_be_hidden()
    for channel in ("Digest", "Push"):
        expect(box(page, "Deploys", channel)).not_to_be_checked()
    expect(page.get_by_label("Time zone", exact=True)).to_have_value(BROWSER_TIMEZONE)
    expect(page.get_by_label("From", exact=True)).to_have_value("22:00")
    expect(page.get_by_label("to", exact=True)).to_have_value("07:00")
    expect(page.get_by_label("Digest email")).to_have_value("hourly")
    expect(page.get_by_label("Push only when no tab of this site is open")).to_be_checked()

    # "Use default" drops the topic's rule; a level row with nothing ticked keeps none either.
    row(page, "topic", "deploys").get_by_role("button", name="Deploys: use the default").click()
    box(page, "Error", "Email").uncheck()
    page.get_by_role("button", name="Clear").click()
    save(page)
    expect(page.locator("#settings-status")).to_have_text("Saved")
    body = preferences_of(live, alice)
    assert body["rules"] == []
    assert (body["settings"]["quiet_start"], body["settings"]["quiet_end"]) == (None, None)
    assert page.errors == []


def test_a_bad_time_zone_or_quiet_hours_without_an_end_show_the_field_error_and_store_nothing(
    open_paris_page, alice, topics
):
    page = open_paris_page(alice)
    open_settings(page)
    box(page, "Sent to me", "Email").check()
    timezone = page.get_by_label("Time zone", exact=True)
    timezone.fill("Mars/Olympus_Mons")
    save(page)
    error = page.locator("#error-settings-timezone")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Mars/Olympus_Mons")
    expect(timezone).to_have_attribute("aria-invalid", "true")
    expect(timezone).to_be_focused()
    expect(page.locator("#settings-status")).to_contain_text("Not saved")
    assert stored(alice) == ([], False)

    timezone.fill("UTC")
    page.get_by_label("From", exact=True).fill("22:00")
    save(page)
    expect(page.locator("#settings-status")).to_contain_text("Not saved")
    expect(page.locator("#error-settings-timezone")).to_be_hidden()  # the earlier error is gone
    expect(page.locator("#error-settings-quiet_end")).to_have_text(
        "Give quiet_start and quiet_end together (or neither)."
    )
    expect(page.get_by_label("to", exact=True)).to_have_attribute("aria-invalid", "true")
    assert stored(alice) == ([], False)

    # A rule error lands in its row: a topic deleted while the dialog is open.
    page.get_by_label("From", exact=True).fill("")
    run_in_thread(topics["deploys"].delete)
    box(page, "Deploys", "Push").check()
    save(page)
    row_error = row(page, "topic", "deploys").locator(".field-error")
    expect(row_error).to_contain_text("Unknown topic 'deploys'")
    expect(row(page, "topic", "deploys")).to_have_class("rule-row invalid")
    assert stored(alice) == ([], False)

    # Fixed, it saves; the row the user ticked is a rule, the others are not.
    page.get_by_role("button", name="Close", exact=True).last.click()
    open_settings(page)
    expect(row(page, "topic", "deploys")).to_have_count(0)
    box(page, "Sent to me", "Email").check()
    save(page)
    expect(page.locator("#settings-status")).to_have_text("Saved")
    assert stored(alice) == ([("own", "", True, False, False)], True)
    assert page.errors == []


def test_the_dialog_works_from_the_keyboard(open_paris_page, alice, topics):
    page = open_paris_page(alice)
    button = page.get_by_role("button", name="Delivery settings")
    button.focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name="Delivery settings")
    expect(dialog).to_be_visible()
    expect(page.locator("#settings .dialog-body")).to_have_attribute("aria-busy", "false")
    box(page, "Deploys", "Digest").focus()
    page.keyboard.press("Space")
    expect(box(page, "Deploys", "Digest")).to_be_checked()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(button).to_be_focused()


# The worker's registration once it is active (not navigator.serviceWorker.ready: a worker under
# /static/ does not control the page at /, so `ready` never resolves there).
ACTIVATED = """
  async function activated(url) {
    const registration = await navigator.serviceWorker.register(url);
    const worker = registration.active || registration.installing || registration.waiting;
    if (worker.state !== "activated") {
      await new Promise((resolve, reject) => worker.addEventListener("statechange", () => {
        if (worker.state === "activated") resolve();
        if (worker.state === "redundant") reject(new Error("the service worker failed to install"));
      }));
    }
    return registration;
  }
"""


def test_the_service_worker_registers_and_becomes_active(open_paris_page, alice):
    if not SERVICE_WORKER.exists():
        pytest.skip("notifications/static/notifications/sw.js is not there yet")
    from django.templatetags.static import static

    page = open_paris_page(alice)
    url = static("notifications/sw.js")
    state = page.evaluate(f"async (url) => {{ {ACTIVATED} return (await activated(url)).active.state; }}", url)
    assert state == "activated"
    assert page.errors == []


# Headless Chromium here has no push service (no Google Cloud Messaging), so subscribe() rejects
# even with the permission granted ("AbortError: Registration failed - permission denied").
TRY_SUBSCRIBE = """async ({url, key}) => {""" + ACTIVATED + """
  const registration = await activated(url);
  try {
    const subscription = await registration.pushManager.subscribe({userVisibleOnly: true, applicationServerKey: key});
    await subscription.unsubscribe();
    return "subscribed";
  } catch (error) {
    return `${error.name}: ${error.message}`;
  }
}"""


@pytest.fixture
def vapid_live(live) -> Iterator[str]:
    """The live server restarted with a VAPID key (Web Push on), so ``enablePush()`` gets as far as
    ``pushManager.subscribe()``; its public key."""
    from notifications import webpush

    private, public = webpush.generate_keys()
    saved = dict(live.env)  # the package's server: put back for the next test
    live.stop()
    live.env.update(VAPID_PRIVATE_KEY=private, VAPID_SUBJECT="mailto:admin@example.test", SITE_URL=live.url)
    live.start()
    try:
        yield public
    finally:
        live.stop()
        live.env.clear()
        live.env.update(saved)


def open_push_toggle(page: Page):
    """The dialog open, and the toggle as it is before any click: off, and usable."""
    open_settings(page)
    if not page.evaluate("() => typeof window.notificationClient.enablePush === 'function'"):
        # client.js without Web Push: the page says so and offers nothing.
        expect(page.locator("#push-state")).to_have_text("Not available on this site yet")
        expect(page.get_by_role("switch", name="Turn on")).to_be_disabled()
        pytest.skip("client.js has no enablePush() yet")
    toggle = page.get_by_role("switch", name="Turn on")
    expect(page.locator("#push-state")).to_have_text("Off in this browser")
    expect(toggle).to_be_enabled()
    expect(toggle).to_have_attribute("aria-checked", "false")
    return toggle


def test_turning_browser_notifications_on_shows_the_state_or_the_push_services_error(
    vapid_live, open_paris_page, alice
):
    page = open_paris_page(alice, permissions=["notifications"])
    toggle = open_push_toggle(page)
    tried = page.evaluate(TRY_SUBSCRIBE, {"url": "/static/notifications/sw.js", "key": vapid_live})
    state = page.locator("#push-state")
    toggle.click()
    if tried == "subscribed":  # a browser with a push service
        expect(state).to_have_text("On in this browser")
        page.get_by_role("switch", name="Turn off").click()
        expect(state).to_have_text("Off in this browser")
    else:  # headless Chromium: subscribe() rejects; the page says so, in words, and goes on working
        assert tried == "AbortError: Registration failed - permission denied"
        error = page.locator("#push-error")
        expect(error).to_have_text(
            "Browser notifications could not be turned on: Registration failed - permission denied (AbortError)."
        )
        expect(state).to_have_text("Off in this browser")
        expect(page.get_by_role("switch", name="Turn on")).to_be_enabled()
        box(page, "Sent to me", "Push").check()
        save(page)
        expect(page.locator("#settings-status")).to_have_text("Saved")
    assert page.errors == []


def test_without_vapid_keys_turning_browser_notifications_on_says_the_site_sends_none(open_paris_page, alice):
    page = open_paris_page(alice, permissions=["notifications"])
    open_push_toggle(page).click()
    expect(page.locator("#push-error")).to_contain_text("This site sends no Web Push (push_disabled)")
    expect(page.locator("#push-state")).to_have_text("Off in this browser")
    assert page.errors == []
