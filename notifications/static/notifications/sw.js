/**
 * The service worker of the notifications app's Web Push channel (docs/delivery.md).
 *
 * One file, no build step, no dependencies: served from this app
 * (`{% static "notifications/sw.js" %}`) and registered by `NotificationClient.enablePush()`
 * (client.js), or copied into your site. It does two things:
 *
 * - on `push`: reads the message the server sent (notifications/webpush.py, `payload`:
 *   `{"id", "title", "body", "level", "link", "tag", "created_at"}`) and shows it with
 *   `showNotification`. It always shows one (browsers require a visible notification for each
 *   push); a message that does not parse shows "New notification". The tag
 *   (`notification-<id>`) makes a repeat of the same notification replace the first;
 * - on `notificationclick`: closes it, then focuses a window already on its link, or opens
 *   the link in a new one.
 *
 * A service worker controls only URLs under its scope (by default the folder it is served from).
 * Showing and clicking need none: they work from any scope.
 */
"use strict";

const FALLBACK_TITLE = "New notification";

function readMessage(event) {
  if (!event.data) return null;
  try {
    const message = event.data.json();
    return message && typeof message === "object" ? message : null;
  } catch (error) {
    return null;
  }
}

self.addEventListener("push", (event) => {
  const message = readMessage(event) || {};
  const title = typeof message.title === "string" && message.title ? message.title : FALLBACK_TITLE;
  const options = {
    body: typeof message.body === "string" ? message.body : "",
    data: { link: message.link || self.registration.scope, id: message.id, level: message.level },
    timestamp: message.created_at ? Date.parse(message.created_at) || Date.now() : Date.now(),
  };
  if (message.tag) options.tag = String(message.tag);
  event.waitUntil(self.registration.showNotification(title, options));
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const link = new URL((event.notification.data && event.notification.data.link) || "/", self.location.href).href;
  event.waitUntil(
    (async () => {
      const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
      const same = windows.find((client) => client.url === link);
      if (same) return same.focus();
      return self.clients.openWindow(link);
    })()
  );
});
