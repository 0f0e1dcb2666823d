"""The admin's delivery records in a real browser: the list of deliveries with their status and
reason, a notification's summary of its deliveries, and "Send again" (screenshot
docs/screenshots/admin-deliveries.png with UPDATE_SCREENSHOTS=1)."""

import os
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from tests.browser.conftest import run_in_thread
from tests.browser.test_notifications_page import SCREENSHOTS

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.django_db(transaction=True)]


def seed_deliveries(make_user):
    """A few deliveries of each channel and status, as the worker leaves them."""
    from notifications import services
    from notifications.models import Delivery

    people = [make_user(name, email=f"{name}@example.com") for name in ("ana", "ben", "chloe")]
    now = timezone.now()
    deploy = run_in_thread(services.notification_send, broadcast=True, level="error",
                           title="Deploy of v2.3.1 failed")[0]
    invoice = run_in_thread(services.notification_send, users=[people[0]], level="success",
                            title="Invoice #1042 paid")[0]
    rows = [
        (deploy, people[0], "email", "sent", 1, ""),
        (deploy, people[0], "push", "sent", 1, ""),
        (deploy, people[1], "email", "failed", 8, "SMTPRecipientsRefused: 550 5.1.1 <ben@example.com>: no such user"),
        (deploy, people[1], "push", "skipped", 1, "a socket of the user was open"),
        (deploy, people[2], "digest", "pending", 0, ""),
        (deploy, people[2], "email", "pending", 2, "SMTPServerDisconnected: Connection unexpectedly closed"),
        (invoice, people[0], "email", "sent", 1, ""),
    ]
    Delivery.objects.bulk_create([
        Delivery(notification=n, user=user, channel=channel, status=state, attempts=attempts, error=error,
                 due_at=now + timedelta(minutes=4) if state == "pending" else now,
                 sent_at=now if state == "sent" else None)
        for n, user, channel, state, attempts, error in rows
    ])
    return deploy


def test_the_admin_shows_each_delivery_and_sends_a_failed_one_again(open_page, make_user, tmp_path):
    deploy = seed_deliveries(make_user)
    root = make_user("root", staff=True)
    root.is_superuser = True
    root.save(update_fields=["is_superuser"])
    folder = SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)

    page = open_page(root, "/admin/notifications/delivery/")
    rows = page.locator("#result_list tbody tr")
    expect(rows).to_have_count(7)
    expect(page.locator("#result_list")).to_contain_text("no such user")
    expect(page.locator("#changelist-filter")).to_contain_text("By channel")
    page.set_viewport_size({"width": 1500, "height": 600})
    if page.locator("#nav-sidebar").is_visible():
        page.locator("#toggle-nav-sidebar").click()  # the whole table in view
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=folder / "admin-deliveries.png", animations="disabled")

    failed = rows.filter(has_text="no such user")
    failed.locator("input.action-select").check()
    page.select_option("select[name=action]", "send_again")
    page.get_by_role("button", name="Go").click()
    expect(page.locator(".messagelist")).to_contain_text("1 deliveries will be sent again.")

    page.goto(f"/admin/notifications/notification/{deploy.pk}/change/")
    # (Ben's email is pending again; a server with a worker might have sent it already.)
    expect(page.locator(".field-deliveries")).to_contain_text("digest pending: 1")
    expect(page.locator(".field-deliveries")).to_contain_text("push skipped: 1")
    expect(page.locator(".field-deliveries")).to_contain_text("live frame handed to the sockets of 0 user(s)")
