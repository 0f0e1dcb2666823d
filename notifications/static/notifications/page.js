/**
 * The notifications page (templates/index.html): renders what NotificationClient knows.
 *
 * Bell and badge, the dropdown list (click an item to mark it read, dismiss, mark all
 * read), toasts for new notifications, the topic list and the connection status, with the
 * reason the server gave when it refused or closed the socket (its `error` frame and the close
 * code, docs/protocol.md). A site may tune the client by setting
 * `window.notificationClientOptions` (for example `{maxDelay: 10000}`) before this script runs.
 */
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("notifications-config").textContent);
  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("connection-status"),
    reason: $("connection-reason"),
    statusText: document.querySelector("#connection-status .status-text"),
    statusAction: document.querySelector("#connection-status .status-action"),
    bell: $("bell"),
    badge: $("unread-badge"),
    panel: $("panel"),
    list: $("notification-list"),
    empty: $("empty-inbox"),
    markAll: $("mark-all-read"),
    topics: $("topic-list"),
    noTopics: $("no-topics"),
    toasts: $("toasts"),
    factStatus: $("fact-status"),
    factUnread: $("fact-unread"),
  };
  const STATUS_TEXT = {
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Reconnecting…",
    offline: "Offline",
  };
  const OFFLINE_TEXT = {
    signed_out: "Signed out",
    forbidden: "Offline: not allowed",
    bad_url: "Offline: bad socket URL",
    unsupported_protocol: "Offline: reload the page", // the server was updated; this page's client.js is old
    stopped: "Offline",
  };
  // What a close code means, for the site's developer (docs/protocol.md, "Close codes"); used
  // when no `error` frame came before the close.
  const CLOSE_TEXT = {
    1000: "The server closed the connection",
    1001: "The server is going away",
    1006: "The connection was lost: the server stopped or the network dropped",
    1011: "The server failed (its log says why)",
    1012: "The server is restarting",
    4008: "The server dropped this page for falling behind",
    4012: "The notification store was replaced",
  };
  // 1006 before any frame: the browser never had a WebSocket (it reports every refusal so).
  const NOT_OPENED =
    "The socket could not be opened: the server is not answering, refused the handshake " +
    "(a wrong WebSocket path), or a proxy in front of it does not forward WebSocket upgrades";
  // A hint after the reason, by the error frame's code: what to change.
  const HINTS = {
    origin_not_allowed: originHint,
    unsupported_protocol: () => "Reload the page: the server was updated and speaks a newer protocol.",
    too_many_failures: () => "Too many failed sign-ins from this address: wait a minute.",
  };
  const TOAST_MS = 6000;
  const MAX_TOASTS = 3;
  const rows = new Map(); // notification id -> <li>
  const toasted = new Set(); // ids that already had a toast
  let topics = []; // [{slug, title, private}] from the REST API
  let renderQueued = false;

  const tuning = window.notificationClientOptions || {};
  const client = new NotificationClient(
    Object.assign(
      {
        url: config.url,
        apiUrl: config.apiUrl,
        onStatus: showStatus,
        onNotification: (n, source) => source !== "inbox" && toast(n),
        onChange: queueRender,
        onError: (error) => console.warn("notifications:", error.code || "", error.message),
      },
      tuning,
      {
        // The page needs the frames (for the reason of a close); a site's own onFrame still runs.
        onFrame: (frame) => {
          watchFrame(frame);
          if (tuning.onFrame) tuning.onFrame(frame);
        },
      },
    ),
  );
  window.notificationClient = client; // for the console (and the browser tests)

  // Connection status, and why the server closed the socket

  let socketFrames = { greeted: false, error: null }; // of the socket being opened or open now

  function watchFrame(frame) {
    if (frame.type === "hello") socketFrames.greeted = true;
    // An error without a request id is the server's reason for the close that follows.
    else if (frame.type === "error" && frame.id === undefined) socketFrames.error = frame;
  }

  function showStatus(status, detail) {
    let text = STATUS_TEXT[status] || status;
    let reason = el.reason.textContent; // kept while reconnecting attempts run
    if (status === "offline") {
      text = OFFLINE_TEXT[detail.reason] || text;
      reason = detail.reason === "stopped" ? "" : closeReason(detail);
    } else if (status === "reconnecting" && detail.delay !== undefined) {
      text = `Reconnecting in ${seconds(detail.delay)} s`; // a close (or a failed ticket request): a retry is scheduled
      reason = closeReason(detail) || reason;
    } else if (status !== "reconnecting") {
      reason = ""; // connecting, connected
    }
    if (status === "connecting" || (status === "reconnecting" && detail.delay === undefined)) {
      socketFrames = { greeted: false, error: null }; // a new socket is being opened
    }
    el.status.dataset.status = status;
    el.statusText.textContent = text;
    el.statusAction.hidden = !(status === "offline" && detail.reason === "signed_out");
    el.factStatus.textContent = text;
    el.reason.dataset.status = status;
    el.reason.textContent = reason;
    el.reason.hidden = !reason;
    if (status === "connected") loadTopics();
  }

  function seconds(ms) {
    return ms < 10000 ? Math.max(0.1, Math.ceil(ms / 100) / 10).toFixed(1) : String(Math.round(ms / 1000));
  }

  /** The close code of the socket that just closed, as client.js reports it (null: none, or an HTTP status). */
  function closeCode(detail) {
    return typeof detail.code === "number" && detail.code >= 1000 ? detail.code : null;
  }

  /** The reason for a close, in words for the site's developer: the server's `error` frame and the close code. */
  function closeReason(detail) {
    const code = closeCode(detail);
    const error = socketFrames.error;
    const greeted = socketFrames.greeted;
    let sentence;
    if (error) {
      const codes = [error.code, code !== null && `close ${code}`].filter(Boolean).join(", ");
      const message = String(error.message || "").replace(/[.\s]+$/, "");
      sentence = `${greeted ? "Closed" : "Refused"} by the server: ${message} (${codes}).`;
    } else if (code !== null) {
      const words = (code === 1006 && !greeted ? NOT_OPENED : CLOSE_TEXT[code]) ||
        `The server ${greeted ? "closed" : "refused"} the connection`;
      sentence = `${words} (close ${code}).`;
    } else if (typeof detail.code === "number") {
      sentence = `The WebSocket ticket request was refused (HTTP ${detail.code}).`;
    } else {
      return "";
    }
    const hint = HINTS[error && error.code];
    return hint ? `${sentence} ${hint()}` : sentence;
  }

  /**
   * What lets this page's Origin use the session cookie on the socket (docs/protocol.md,
   * "Authentication"): its host in ALLOWED_HOSTS and a Host header equal to the page's (a proxy
   * that drops the port, as nginx's `$host` does, breaks that), or the origin listed.
   */
  function originHint() {
    const tls = location.protocol === "https:" ? " and X-Forwarded-Proto (from an address the server trusts)" : "";
    return (
      `Add "${location.hostname}" to ALLOWED_HOSTS, or "${location.origin}" to ` +
      `NOTIFICATIONS["WS_ALLOWED_ORIGINS"]; behind a proxy, pass the Host header on with its port ` +
      `(nginx: proxy_set_header Host $http_host)${tls}. See docs/install.md.`
    );
  }

  // Rendering (batched into one frame)

  function queueRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(render);
  }

  function render() {
    renderQueued = false;
    const count = client.unreadCount;
    el.badge.textContent = count > 99 ? "99+" : String(count);
    el.badge.dataset.count = String(count);
    el.badge.hidden = count === 0;
    el.bell.setAttribute("aria-label", `Notifications, ${count} unread`);
    el.factUnread.textContent = String(count);
    document.title = count ? `(${count}) Notifications` : "Notifications";

    const items = client.notifications;
    const present = new Set(items.map((n) => n.id));
    for (const [id, row] of rows) {
      if (!present.has(id)) {
        row.remove();
        rows.delete(id);
      }
    }
    let previous = null;
    for (const n of items) {
      let row = rows.get(n.id);
      if (!row) rows.set(n.id, (row = itemRow(n)));
      updateRow(row, n);
      const expected = previous ? previous.nextSibling : el.list.firstChild;
      if (row !== expected) el.list.insertBefore(row, expected);
      previous = row;
    }
    el.list.setAttribute("aria-busy", String(!client.inboxLoaded));
    el.empty.hidden = items.length > 0 || !client.inboxLoaded;
    el.markAll.disabled = count === 0 && !items.some((n) => !n.read);
    renderTopics();
  }

  function node(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined) element.textContent = text;
    return element;
  }

  function safeLink(link) {
    // No backslash, space or control character anywhere: browsers read "/\\x" and "/\t/x" as "//x".
    return typeof link === "string" && /^(https?:\/\/|\/(?!\/))/i.test(link) && !/[\\\x00-\x20\x7f]/.test(link)
      ? link : null;
  }

  function metaText(n) {
    const parts = [];
    if (n.topic) parts.push(`#${n.topic}`);
    if (n.audience === "broadcast") parts.push("everyone");
    if (n.actor) parts.push(`from ${n.actor}`);
    return parts.join(" · ");
  }

  function itemRow(n) {
    const row = node("li", `item level-${n.level}`);
    row.dataset.id = String(n.id);
    const main = node("button", "item-main");
    main.type = "button";
    const state = node("span", "visually-hidden item-state");
    const title = node("span", "item-title", n.title);
    main.append(node("span", "item-dot"), state, title);
    if (n.body) main.append(node("span", "item-body", n.body));
    const meta = node("span", "item-meta");
    const time = node("time", "item-time");
    time.dateTime = n.created_at;
    meta.append(node("span", "item-source", metaText(n)), time);
    main.append(meta);
    main.addEventListener("click", () => client.markRead([n.id]));
    row.append(main);
    const link = safeLink(n.link);
    if (link) {
      const open = node("a", "item-link icon-button", "↗");
      open.href = link;
      open.setAttribute("aria-label", `Open: ${n.title}`);
      open.addEventListener("click", () => client.markRead([n.id]));
      row.append(open);
    }
    const dismiss = node("button", "item-dismiss icon-button", "×");
    dismiss.type = "button";
    dismiss.setAttribute("aria-label", `Dismiss: ${n.title}`);
    dismiss.addEventListener("click", () => client.dismiss(n.id));
    row.append(dismiss);
    return row;
  }

  function updateRow(row, n) {
    row.classList.toggle("unread", !n.read);
    row.querySelector(".item-state").textContent = n.read ? "" : "Unread: ";
    const time = row.querySelector(".item-time");
    const ago = relativeTime(n.created_at);
    if (time.textContent !== ago) time.textContent = ago;
  }

  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  function relativeTime(iso) {
    const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
    if (Math.abs(seconds) < 45) return "just now";
    for (const [unit, size] of [["day", 86400], ["hour", 3600], ["minute", 60]]) {
      if (Math.abs(seconds) >= size) return relative.format(Math.round(seconds / size), unit);
    }
    return relative.format(Math.round(seconds), "second");
  }
  setInterval(queueRender, 30000); // keep "5 minutes ago" current

  // The dropdown

  function setPanel(open) {
    el.panel.hidden = !open;
    el.bell.setAttribute("aria-expanded", String(open));
  }
  el.bell.addEventListener("click", () => setPanel(el.panel.hidden));
  el.markAll.addEventListener("click", () => client.markAllRead());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !el.panel.hidden) {
      setPanel(false);
      el.bell.focus();
    }
  });
  document.addEventListener("click", (event) => {
    if (!el.panel.hidden && !event.target.closest(".bell-wrap") && !event.target.closest(".toast")) setPanel(false);
  });

  // Toasts: fixed overlays in an aria-live region, one per notification, never twice

  function toast(n) {
    if (toasted.has(n.id)) return;
    toasted.add(n.id);
    while (el.toasts.children.length >= MAX_TOASTS) el.toasts.firstElementChild.remove();
    const box = node("div", `toast level-${n.level}`);
    box.dataset.id = String(n.id);
    const text = node("div", "toast-text");
    text.append(node("p", "toast-level", n.level), node("p", "toast-title", n.title));
    if (n.body) text.append(node("p", "toast-body", n.body));
    text.addEventListener("click", () => setPanel(true));
    const close = node("button", "toast-close icon-button", "×");
    close.type = "button";
    close.setAttribute("aria-label", "Close");
    close.addEventListener("click", () => box.remove());
    box.append(node("span", "toast-icon"), text, close);
    el.toasts.append(box);
    let timer = setTimeout(() => box.remove(), TOAST_MS);
    box.addEventListener("mouseenter", () => clearTimeout(timer));
    box.addEventListener("mouseleave", () => (timer = setTimeout(() => box.remove(), TOAST_MS / 2)));
  }

  // Topics

  async function loadTopics() {
    try {
      topics = await client.fetchTopics();
    } catch (error) {
      console.warn("notifications: topics:", error.message);
    }
    el.topics.removeAttribute("aria-busy");
    queueRender();
  }

  function renderTopics() {
    el.noTopics.hidden = topics.length > 0 || el.topics.hasAttribute("aria-busy");
    const known = new Map(Array.from(el.topics.children, (li) => [li.dataset.topic, li]));
    for (const topic of topics) {
      let li = known.get(topic.slug);
      if (!li) {
        li = node("li", "topic");
        li.dataset.topic = topic.slug;
        const text = node("div", "topic-text");
        text.append(node("span", "topic-title", topic.title), node("span", "topic-slug", `#${topic.slug}`));
        if (topic.private) text.append(node("span", "tag", "private"));
        const button = node("button", "button follow-button");
        button.type = "button";
        button.addEventListener("click", async () => {
          button.disabled = true;
          const following = client.topics.has(topic.slug);
          await (following ? client.unfollow(topic.slug) : client.follow(topic.slug));
          button.disabled = false;
          queueRender();
        });
        li.append(text, button);
        el.topics.append(li);
      }
      known.delete(topic.slug);
      const following = client.topics.has(topic.slug);
      const button = li.querySelector(".follow-button");
      button.textContent = following ? "Following" : "Follow";
      button.setAttribute("aria-pressed", String(following));
      button.title = `${following ? "Unfollow" : "Follow"} ${topic.title}`;
    }
    for (const stale of known.values()) stale.remove();
  }

  client.start();
})();
