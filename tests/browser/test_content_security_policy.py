"""The service's HTML pages under their Content-Security-Policy (notifications/http.py) in a real
browser: nothing a page needs is blocked, and nothing loads from another origin. /api/docs is
Swagger UI from this site's own static files. Fixtures are in ``tests/browser/conftest.py``."""

import re

import pytest
from playwright.sync_api import Page, expect

from notifications.http import CONTENT_SECURITY_POLICY
from tests.support import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.django_db(transaction=True)]

# Before any script of the page: every violation the browser reports, as one line each.
WATCH_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => window.cspViolations.push(
  `${e.effectiveDirective} blocked ${e.blockedURI || "inline"} at ${e.sourceFile}:${e.lineNumber}`));
"""


class Watched:
    """A page whose policy violations and requests are recorded from its first navigation on."""

    def __init__(self, open_page, live, user=None):
        self.origin = live.url
        self.page: Page = open_page(user, goto=False)
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.add_init_script(WATCH_VIOLATIONS)

    def goto(self, path: str) -> Page:
        response = self.page.goto(path)
        assert response is not None and response.status == 200, path
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        return self.page

    def assert_clean(self) -> None:
        """No violation on the current page, and no request so far to another origin."""
        assert self.page.evaluate("window.cspViolations") == [], self.page.url
        foreign = [url for url in self.requests if not url.startswith(f"{self.origin}/")]
        assert foreign == [], foreign


def test_api_docs_renders_swagger_ui_from_this_site_and_tries_a_request(open_page, live):
    watched = Watched(open_page, live)
    page = watched.goto("/api/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Notifications API")
    operation = page.locator(".opblock-get").filter(has=page.locator('[data-path="/api/notifications/"]')).first
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()  # a fetch() to this origin: connect-src
    expect(operation.locator(".live-responses-table tr.response .response-col_status")).to_have_text("401")
    watched.assert_clean()
    paths = {re.sub(r"^https?://[^/]+", "", url).split("?")[0] for url in watched.requests}
    assert {"/api/docs", "/static/ninja/swagger-ui-bundle.js", "/static/ninja/swagger-ui-init.js",
            "/static/ninja/swagger-ui.css", "/api/openapi.json", "/api/notifications/"} <= paths, paths


def test_login_page_and_the_notifications_page_work_under_the_policy(open_page, live, alice):
    watched = Watched(open_page, live)
    page = watched.goto("/accounts/login/")
    watched.assert_clean()
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()  # form-action 'self'
    expect(page).to_have_url(f"{live.url}/")
    status = page.locator("#connection-status")
    expect(status).to_have_attribute("data-status", "connected")  # the WebSocket: connect-src 'self'
    expect(page.locator("#notification-list")).to_have_attribute("aria-busy", "false")  # the REST API
    watched.assert_clean()


def test_the_admin_and_its_notification_pages_work_under_the_policy(open_page, live, alice, django_user_model):
    root = django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    watched = Watched(open_page, live, root)
    for path in ("/admin/", "/admin/notifications/notification/", "/admin/notifications/notification/online/"):
        watched.goto(path)
        watched.assert_clean()
    page = watched.goto("/admin/notifications/notification/send/")
    page.get_by_label("Selected users").check()
    page.locator(".field-users .select2-selection").click()  # Select2: the admin's autocomplete
    page.locator(".select2-search__field").fill("ali")
    page.locator(".select2-results__option", has_text="alice").click()
    expect(page.locator(".field-users .select2-selection__choice")).to_contain_text("alice")
    # The page's own rules come from a stylesheet (notifications/admin.css), not a <style> block.
    assert page.locator(".send-form textarea").first.evaluate("e => getComputedStyle(e).maxWidth") != "none"
    watched.assert_clean()
