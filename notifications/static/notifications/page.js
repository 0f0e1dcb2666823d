/**
 * The notifications page (templates/index.html): renders what NotificationClient knows.
 *
 * Bell and badge, the dropdown list (click an item to mark it read, dismiss, mark all
 * read), toasts for new notifications, the topic list and the connection status, with the
 * reason the server gave when it refused or closed the socket (its `error` frame and the close
 * code, docs/protocol.md), and the delivery settings dialog (docs/delivery.md: the preferences
 * REST API, and this browser's Web Push). A site may tune the client by setting
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

  // Delivery settings (docs/delivery.md, "Preferences"): which notifications also go out by email,
  // in the digest or as Web Push. GET /api/preferences/ fills the dialog; Save PUTs all of it.

  const CHANNELS = ["email", "digest", "push"];
  const CHANNEL_NAMES = { email: "Email", digest: "Digest", push: "Push" };
  const LEVELS = ["info", "success", "warning", "error"];
  const NO_CHANNELS = { email: false, digest: false, push: false };
  const PUSH_TEXT = {
    loading: "Checking…",
    unavailable: "Not available on this site yet",
    unsupported: "Not supported by this browser",
    denied: "Blocked: allow notifications for this site in the browser’s site settings",
    off: "Off in this browser",
    on: "On in this browser",
  };
  const pref = {
    button: $("settings-button"),
    dialog: $("settings"),
    form: $("settings-form"),
    body: document.querySelector("#settings .dialog-body"),
    close: $("settings-close"),
    cancel: $("settings-cancel"),
    loadError: $("settings-load-error"),
    audience: $("rules-audience"),
    levels: $("rules-levels"),
    timezone: $("pref-timezone"),
    timezones: $("timezones"),
    timezoneHint: $("pref-timezone-hint"),
    useTimezone: $("use-browser-timezone"),
    digest: $("pref-digest"),
    quietStart: $("pref-quiet-start"),
    quietEnd: $("pref-quiet-end"),
    quietClear: $("quiet-clear"),
    pushOffline: $("pref-push-offline"),
    pushState: $("push-state"),
    pushToggle: $("push-toggle"),
    pushError: $("push-error"),
    status: $("settings-status"),
    save: $("settings-save"),
  };
  // The settings inputs, by the name an error's `fields` key gives them (`settings.<name>`).
  const SETTING_INPUTS = {
    timezone: pref.timezone,
    quiet_start: pref.quietStart,
    quiet_end: pref.quietEnd,
    digest: pref.digest,
    push_only_offline: pref.pushOffline,
  };
  const browserTimezone = (() => {
    try {
      return Intl.DateTimeFormat().resolvedOptions().timeZone || "";
    } catch (error) {
      return "";
    }
  })();
  // One per row of the table: {scope, key, label, defaults (null for levels), explicit, boxes, tr, note, reset, error}.
  let prefRows = [];
  let keptRules = []; // rules without a row here (a topic no longer followed): PUT back as they are
  let prefsLoading = 0; // which load is current (a second open supersedes the first)

  /**
   * GET or PUT /api/preferences/. Not client._api: its errors drop `error.fields`, which this
   * form shows next to the fields they name.
   */
  async function preferencesRequest(method, body) {
    const options = client.options;
    const headers = { Accept: "application/json" };
    if (method !== "GET") {
      const csrf = options.csrfToken && options.csrfToken();
      if (csrf) headers["X-CSRFToken"] = csrf;
      headers["Content-Type"] = "application/json";
    }
    const response = await fetch(`${options.apiUrl}preferences/`, {
      method,
      headers,
      credentials: options.credentials,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = data.error || {};
      throw Object.assign(new Error(error.message || `HTTP ${response.status}`), {
        status: response.status,
        code: error.code,
        fields: error.fields,
      });
    }
    return data;
  }

  function channelsOf(object) {
    return Object.fromEntries(CHANNELS.map((channel) => [channel, Boolean(object && object[channel])]));
  }

  function openSettings() {
    setPanel(false);
    if (!pref.dialog.open) pref.dialog.showModal();
    loadPreferences();
    renderPush();
  }

  function closeSettings() {
    if (pref.dialog.open) pref.dialog.close();
  }

  async function loadPreferences() {
    const load = ++prefsLoading;
    pref.body.setAttribute("aria-busy", "true");
    pref.save.disabled = true;
    pref.loadError.hidden = true;
    clearErrors();
    setSaveStatus("");
    let data, known;
    try {
      [data, known] = await Promise.all([
        preferencesRequest("GET"),
        topics.length ? topics : client.fetchTopics().catch(() => []), // for the topics' titles
      ]);
    } catch (error) {
      if (load !== prefsLoading) return;
      pref.loadError.textContent = `Your settings could not be loaded: ${error.message}. Close this and try again.`;
      pref.loadError.hidden = false;
      pref.body.removeAttribute("aria-busy");
      return;
    }
    if (load !== prefsLoading) return;
    fillPreferences(data, new Map(known.map((topic) => [topic.slug, topic.title])));
    pref.body.setAttribute("aria-busy", "false");
    pref.save.disabled = false;
  }

  function fillPreferences(data, titles) {
    const rules = new Map(data.rules.map((rule) => [`${rule.scope}:${rule.key}`, rule]));
    // Without a rule, "Sent to me" and "Broadcasts" get the app's default (DELIVERY_DEFAULTS).
    const appDefaults = data.app_defaults ? channelsOf(data.app_defaults) : NO_CHANNELS;
    const specs = [
      { scope: "own", key: "", label: "Sent to me", detail: "To you by name", defaults: appDefaults, source: "app" },
      { scope: "broadcast", key: "", label: "Broadcasts", detail: "To everyone", defaults: appDefaults, source: "app" },
      ...data.topic_defaults.map((d) => ({
        scope: "topic", key: d.topic, label: titles.get(d.topic) || d.topic, detail: `#${d.topic}`,
        defaults: channelsOf(d), source: d.source,
      })),
    ];
    const levels = LEVELS.map((level) => ({
      scope: "level", key: level, label: level[0].toUpperCase() + level.slice(1), detail: null, defaults: null,
    }));
    pref.audience.replaceChildren();
    for (const row of Array.from(pref.levels.querySelectorAll(".rule-row"))) row.remove();
    prefRows = [];
    for (const spec of [...specs, ...levels]) {
      const row = prefRow(spec, rules.get(`${spec.scope}:${spec.key}`), prefRows.length);
      (spec.scope === "level" ? pref.levels : pref.audience).append(row.tr);
      if (spec.scope === "broadcast" && data.topic_defaults.length === 0) {
        const empty = node("tr", "empty-row");
        const cell = node("td", "muted", "Follow a topic to choose its channels here.");
        cell.colSpan = 4;
        empty.append(cell);
        pref.audience.append(empty);
      }
      prefRows.push(row);
    }
    const shown = new Set(prefRows.map((row) => `${row.scope}:${row.key}`));
    keptRules = data.rules.filter((rule) => !shown.has(`${rule.scope}:${rule.key}`));

    const settings = data.settings;
    pref.timezone.value = settings.timezone || "";
    pref.quietStart.value = settings.quiet_start || "";
    pref.quietEnd.value = settings.quiet_end || "";
    pref.digest.value = settings.digest;
    pref.pushOffline.checked = Boolean(settings.push_only_offline);
    showTimezoneHint();
  }

  function prefRow(spec, rule, index) {
    const row = Object.assign({}, spec, { explicit: Boolean(rule), boxes: {} });
    const tr = node("tr", spec.scope === "level" ? `rule-row level-row level-${spec.key}` : "rule-row");
    tr.dataset.scope = spec.scope;
    tr.dataset.key = spec.key;
    const th = node("th", "rule-label");
    th.scope = "row";
    th.id = `rule-${index}`;
    const name = node("span", "rule-name", spec.label);
    if (spec.scope === "level") name.prepend(node("span", "level-dot"));
    th.append(name);
    if (spec.detail) th.append(node("span", "rule-detail", spec.detail));
    if (spec.defaults) {
      row.note = node("span", "tag tag-default", "default");
      row.note.title = spec.source === "staff"
        ? "You have no rule here: this is the topic’s default, set by staff"
        : "You have no rule here: this is the site’s default";
      row.reset = node("button", "link-button reset-button", "Use default");
      row.reset.type = "button";
      row.reset.setAttribute("aria-label", `${spec.label}: use the default`);
      row.reset.addEventListener("click", () => {
        for (const channel of CHANNELS) row.boxes[channel].checked = spec.defaults[channel];
        row.explicit = false;
        rowChanged(row);
        row.boxes.email.focus();
      });
      th.append(row.note, row.reset);
    }
    row.error = node("span", "field-error");
    row.error.id = `rule-${index}-error`;
    row.error.hidden = true;
    th.append(row.error);
    tr.append(th);
    const channels = channelsOf(rule || spec.defaults);
    for (const channel of CHANNELS) {
      const cell = node("td", "channel-cell");
      const box = node("input");
      box.type = "checkbox";
      box.checked = channels[channel];
      box.dataset.channel = channel;
      box.setAttribute("aria-label", `${spec.label}: ${CHANNEL_NAMES[channel]}`);
      box.setAttribute("aria-describedby", row.error.id);
      box.addEventListener("change", () => rowChanged(row));
      row.boxes[channel] = box;
      cell.append(box);
      tr.append(cell);
    }
    row.tr = tr;
    rowChanged(row, true);
    return row;
  }

  /** The rule a row asks for, or null: a row at its default without a rule keeps none; a level row with nothing on neither. */
  function rowRule(row) {
    const channels = Object.fromEntries(CHANNELS.map((channel) => [channel, row.boxes[channel].checked]));
    const wanted = row.scope === "level"
      ? CHANNELS.some((channel) => channels[channel])
      : row.explicit || CHANNELS.some((channel) => channels[channel] !== row.defaults[channel]);
    return wanted ? Object.assign({ scope: row.scope, key: row.key }, channels) : null;
  }

  function rowChanged(row, initial) {
    if (row.note) {
      const hasRule = rowRule(row) !== null;
      row.note.hidden = hasRule;
      row.reset.hidden = !hasRule;
    }
    if (!initial) setSaveStatus("");
  }

  function showTimezoneHint() {
    const value = pref.timezone.value.trim();
    pref.timezoneHint.hidden = !browserTimezone || value === browserTimezone;
    pref.useTimezone.textContent = `Use ${browserTimezone}`;
  }

  function fillTimezones() {
    let zones = [];
    try {
      if (typeof Intl.supportedValuesOf === "function") zones = Intl.supportedValuesOf("timeZone");
    } catch (error) {
      zones = [];
    }
    const all = new Set(["UTC", ...zones]);
    if (browserTimezone) all.add(browserTimezone);
    pref.timezones.replaceChildren(...Array.from(all).sort().map((zone) => Object.assign(node("option"), { value: zone })));
  }

  function setSaveStatus(text, state) {
    pref.status.textContent = text;
    pref.status.dataset.state = state || "";
  }

  function clearErrors() {
    for (const error of pref.form.querySelectorAll(".field-error")) {
      if (error === pref.pushError) continue;
      error.textContent = "";
      error.hidden = true;
    }
    for (const input of pref.form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    for (const tr of pref.form.querySelectorAll("tr.invalid")) tr.classList.remove("invalid");
  }

  /** Show each of `error.fields` next to the field it names; rows: the row of each PUT rule (null: none here). */
  function showFieldErrors(fields, rows) {
    const elsewhere = [];
    let first = null;
    for (const [name, message] of Object.entries(fields)) {
      const rule = /^rules\.(\d+)\.(\w+)$/.exec(name);
      const setting = /^settings\.(\w+)$/.exec(name);
      let target = null;
      let input = null;
      if (rule && rows[Number(rule[1])]) {
        const row = rows[Number(rule[1])];
        target = row.error;
        input = row.boxes[rule[2]] || row.boxes.email;
        row.tr.classList.add("invalid");
      } else if (setting && SETTING_INPUTS[setting[1]]) {
        target = pref.form.querySelector(`.field-error[data-field="settings.${setting[1]}"]`);
        input = SETTING_INPUTS[setting[1]];
      }
      if (!target) {
        elsewhere.push(message);
        continue;
      }
      target.textContent = target.textContent ? `${target.textContent} ${message}` : message;
      target.hidden = false;
      input.setAttribute("aria-invalid", "true");
      first = first || input;
    }
    if (first) first.focus();
    return elsewhere;
  }

  async function savePreferences(event) {
    event.preventDefault();
    if (pref.save.disabled) return;
    clearErrors();
    const rules = [];
    const rows = []; // the row of each rule, by its index (errors name `rules.<index>`)
    for (const row of prefRows) {
      const rule = rowRule(row);
      if (rule) {
        rules.push(rule);
        rows.push(row);
      }
    }
    for (const rule of keptRules) {
      rules.push(rule);
      rows.push(null);
    }
    const settings = {
      timezone: pref.timezone.value.trim(),
      quiet_start: pref.quietStart.value || null,
      quiet_end: pref.quietEnd.value || null,
      digest: pref.digest.value,
      push_only_offline: pref.pushOffline.checked,
    };
    pref.save.disabled = true;
    setSaveStatus("Saving…", "busy");
    try {
      const data = await preferencesRequest("PUT", { rules, settings });
      const titles = new Map(prefRows.filter((row) => row.scope === "topic").map((row) => [row.key, row.label]));
      fillPreferences(data, titles);
      setSaveStatus("Saved", "saved");
    } catch (error) {
      const elsewhere = error.fields ? showFieldErrors(error.fields, rows) : [error.message];
      const detail = elsewhere.length ? ` ${elsewhere.join(" ")}` : " Fix the fields marked above.";
      setSaveStatus(`Not saved.${detail}`, "error");
    } finally {
      pref.save.disabled = false;
    }
  }

  // Browser notifications: client.js's Web Push methods (on this browser, at once; not part of Save)

  function pushMethods() {
    return ["pushState", "enablePush", "disablePush"].every((name) => typeof client[name] === "function");
  }

  async function renderPush() {
    let state;
    if (!pushMethods()) state = "unavailable";
    else if (typeof NotificationClient.pushSupported === "function" && !NotificationClient.pushSupported()) {
      state = "unsupported";
    } else {
      try {
        state = await client.pushState();
      } catch (error) {
        showPushError(error, "Could not read this browser’s notification state");
        state = "off";
      }
    }
    if (!(state in PUSH_TEXT)) state = "off";
    pref.pushState.dataset.state = state;
    pref.pushState.textContent = PUSH_TEXT[state];
    pref.pushToggle.disabled = state !== "on" && state !== "off";
    pref.pushToggle.setAttribute("aria-checked", String(state === "on"));
    pref.pushToggle.textContent = state === "on" ? "Turn off" : "Turn on";
  }

  // What to do about an enablePush() error, by its code (client.js).
  const PUSH_HINTS = {
    denied: "Allow notifications for this site in the browser’s site settings, then try again.",
    push_disabled: "The site’s administrator has not set up Web Push (its VAPID keys).",
    unsupported: "Try another browser.",
  };

  function showPushError(error, what) {
    const message = String((error && error.message) || error || "unknown error").replace(/[.\s]+$/, "");
    // client.js's codes are strings; a DOMException's is a legacy number (its name says more).
    const code = error && (typeof error.code === "string" ? error.code : error.name !== "Error" && error.name);
    const hint = PUSH_HINTS[error && error.code];
    pref.pushError.textContent = `${what}: ${message}${code ? ` (${code})` : ""}.${hint ? ` ${hint}` : ""}`;
    pref.pushError.hidden = false;
  }

  async function togglePush() {
    if (!pushMethods()) return;
    const turnOn = pref.pushToggle.getAttribute("aria-checked") !== "true";
    pref.pushToggle.disabled = true;
    pref.pushError.hidden = true;
    pref.pushState.textContent = turnOn ? "Turning on…" : "Turning off…";
    try {
      await (turnOn ? client.enablePush() : client.disablePush());
    } catch (error) {
      showPushError(error, turnOn ? "Browser notifications could not be turned on" : "Browser notifications could not be turned off");
    }
    await renderPush();
  }

  fillTimezones();
  pref.button.addEventListener("click", openSettings);
  pref.close.addEventListener("click", closeSettings);
  pref.cancel.addEventListener("click", closeSettings);
  pref.dialog.addEventListener("click", (event) => event.target === pref.dialog && closeSettings()); // the backdrop
  pref.dialog.addEventListener("close", () => pref.button.focus());
  pref.form.addEventListener("submit", savePreferences);
  pref.form.addEventListener("input", (event) => {
    if (event.target === pref.timezone) showTimezoneHint();
    if (pref.status.dataset.state !== "busy") setSaveStatus("");
  });
  pref.useTimezone.addEventListener("click", () => {
    pref.timezone.value = browserTimezone;
    showTimezoneHint();
    setSaveStatus("");
    pref.timezone.focus();
  });
  pref.quietClear.addEventListener("click", () => {
    pref.quietStart.value = "";
    pref.quietEnd.value = "";
    setSaveStatus("");
    pref.quietStart.focus();
  });
  pref.pushToggle.addEventListener("click", togglePush);

  client.start();
})();
