/**
 * NotificationClient: a browser client for the `notifications.v2` WebSocket protocol.
 *
 * One file, no build step, no dependencies: copy it into your site, or serve it from
 * this app (`{% static "notifications/client.js" %}`). The protocol is described in
 * docs/protocol.md; this file follows it:
 *
 * - connects to /ws/notifications/ with the session cookie (same origin), or first
 *   POSTs `ticketUrl` for a one-time ticket and connects with `?ticket=` (another origin);
 * - offers the subprotocol `notifications.v2`;
 * - reconnects after a lost connection with exponential backoff and full jitter
 *   (a random delay in [0, min(maxDelay, baseDelay * 2^attempt)]), and starts the
 *   backoff over once a connection has stayed up for `stableAfter` ms;
 * - never reconnects after close 4001 (unauthenticated), 4003 (forbidden) or 4426 (the
 *   server no longer speaks this client's protocol version): the status becomes "offline"
 *   and `detail.reason` says why ("signed_out", "forbidden", "unsupported_protocol"; a fresh
 *   ticket is fetched once after `invalid_ticket`, since a ticket works only once); after
 *   close 4010 (the session logged out or the password changed) it reconnects, and the
 *   handshake says whether the session is still valid;
 * - keeps the unread count: `hello.unread_count`, +1 per new `notification` frame, and
 *   the absolute count of `unread_count` and `ack` frames. Every tab has its own socket
 *   and gets the same frames; a BroadcastChannel tells the other tabs of this browser
 *   which items were read or dismissed, so their lists match too;
 * - never reports the same notification twice (deduplicated by id);
 * - keeps its cursor, its position in each stream it reads (`{"u.1": 17, "b": 120, "t.7": 3}`:
 *   `hello.cursor`, then `cursor[stream] = offset` of each `notification`, a stream added by
 *   `subscribed`, replaced by `resumed.cursor`), and the `epoch` from `hello`; it reconnects
 *   with `?since=u.1:17,b:120,t.7:3&epoch=<epoch>`: the server replays what was missed, in
 *   order, each once (reported with source "missed"), then `resumed`. After close 4400 (the
 *   server refused that cursor) the next connect starts afresh, with an inbox re-fetch;
 * - loads the newest inbox page (`GET /api/notifications/`) on the first connect, and
 *   again whenever a resume is not possible (`resumed.recovered === false`): the store
 *   is the source of truth;
 * - applies `read` and `dismissed` frames, sent when another connection of the user
 *   (another browser, the REST API, the admin) changed the inbox.
 *
 * Usage:
 *
 *   const client = new NotificationClient({
 *     onStatus(status, detail) { ... },        // "connecting" | "connected" | "reconnecting" | "offline";
 *                                              // detail.code: the close code (reconnecting, offline)
 *     onNotification(n, source) { ... },       // each new notification once; source "live" | "missed" | "inbox"
 *     onChange(client) { ... },                // something in client.notifications / unreadCount / topics changed
 *   });
 *   client.start();
 *   client.markRead([42]); client.markAllRead(); client.dismiss(42);
 *   client.follow("deploys"); client.unfollow("deploys"); await client.fetchTopics();
 *
 * Web Push (docs/delivery.md), to reach the user while no page of the site is open:
 *
 *   NotificationClient.pushSupported();        // serviceWorker, PushManager and Notification exist
 *   await client.pushState();                  // "unsupported" | "denied" | "off" | "on" (this browser)
 *   await client.enablePush({serviceWorkerUrl, scope});  // both optional; returns the subscription's JSON
 *   await client.disablePush();                // unsubscribes this browser, here and on the server
 *
 * `enablePush` asks the user's permission, registers the service worker (`serviceWorkerUrl`,
 * else the option of that name, else `sw.js` beside this file's own URL; `scope`: the
 * browser's default, the worker's folder), reads the key of `GET <apiUrl>push/`, subscribes
 * (`userVisibleOnly`) and POSTs the subscription to `<apiUrl>push/subscriptions/`. It throws an
 * Error whose `.code` is "unsupported", "denied" (permission refused or dismissed),
 * "push_disabled" (the site sends no Web Push) or the server's error code.
 *
 * State you may read: client.status, client.unreadCount, client.notifications (newest
 * first), client.topics (slugs followed), client.user, client.cursor ({stream: offset}),
 * client.epoch, client.inboxLoaded.
 */
(function (root) {
  "use strict";

  const SUBPROTOCOL = "notifications.v2";
  // This file's own URL (while it first runs), to find the service worker beside it.
  const SCRIPT_URL = (typeof document !== "undefined" && document.currentScript && document.currentScript.src) || null;
  const CLOSE_UNAUTHENTICATED = 4001;
  const CLOSE_FORBIDDEN = 4003;
  const CLOSE_BAD_CURSOR = 4400;
  const CLOSE_UNSUPPORTED_PROTOCOL = 4426;

  const DEFAULTS = {
    url: "/ws/notifications/", // a path on this site, or an absolute ws(s):// or http(s):// URL
    apiUrl: "/api/", // the REST API, for the inbox re-fetch, dismiss and topics; null: no REST calls
    ticketUrl: null, // set for cross-origin use: POST here for {"ticket": ...} before each connect
    credentials: "same-origin", // fetch() credentials for apiUrl and ticketUrl ("include" across origins)
    csrfToken: () => readCookie("csrftoken"), // sent as X-CSRFToken on REST writes (Django session auth)
    pageSize: 50, // how many notifications the inbox re-fetch asks for
    baseDelay: 500, // ms: first reconnect delay bound
    maxDelay: 30000, // ms: cap of the reconnect delay bound
    stableAfter: 5000, // ms a connection must stay up before the backoff starts over
    requestTimeout: 10000, // ms to wait for the reply to a client frame
    broadcastChannel: true, // share read/dismissed state with the other tabs of this browser
    onFrame: null, // (frame) => {}: every server frame, after the client has handled it
    onStatus: null, // (status, detail) => {}
    onNotification: null, // (notification, source) => {}
    onUnreadCount: null, // (count) => {}
    onChange: null, // (client) => {}
    onError: null, // (error) => {}: a failed request (REST or WebSocket)
    serviceWorkerUrl: null, // Web Push: the service worker; null: sw.js beside this file
  };

  function readCookie(name) {
    const match = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
    return match ? decodeURIComponent(match[1]) : null;
  }

  /** The absolute WebSocket URL for a path or an http(s)/ws(s) URL. */
  function wsUrl(url) {
    const absolute = new URL(url, root.location.href);
    if (absolute.protocol === "http:") absolute.protocol = "ws:";
    if (absolute.protocol === "https:") absolute.protocol = "wss:";
    return absolute;
  }

  class NotificationClient {
    constructor(options = {}) {
      this.options = Object.assign({}, DEFAULTS, options);
      this.status = "idle";
      this.user = null;
      this.unreadCount = 0;
      this.topics = new Set(); // slugs this user follows
      this.cursor = {}; // stream -> offset of the last notification seen in it (docs/protocol.md, "Cursors")
      this.epoch = null; // hello.epoch: names the store the cursor belongs to
      this._resuming = false; // between a connect with ?since= and its `resumed` frame
      this._byId = new Map(); // id -> notification (the dedupe set and the list)
      this._socket = null;
      this._attempt = 0;
      this._retryTimer = null;
      this._stableTimer = null;
      this._pending = new Map(); // request id -> {resolve, reject, timer}
      this._nextRequestId = 1;
      this._handshakeError = null;
      this._ticketRetried = false;
      this._caughtUpOnce = false;
      this.inboxLoaded = false; // true once the inbox page was read (after the first connect)
      this._channel = null;
      this._stopped = true;
      this._onOnline = () => this._retryNow();
    }

    /** Newest first. */
    get notifications() {
      return Array.from(this._byId.values()).sort((a, b) => b.id - a.id);
    }

    start() {
      if (!this._stopped) return this;
      this._stopped = false;
      root.addEventListener("online", this._onOnline);
      this._connect();
      return this;
    }

    /** Close the connection and stop reconnecting. */
    stop() {
      this._stopped = true;
      root.removeEventListener("online", this._onOnline);
      clearTimeout(this._retryTimer);
      clearTimeout(this._stableTimer);
      if (this._socket) this._socket.close(1000);
      this._socket = null;
      if (this._channel) this._channel.close();
      this._channel = null;
      this._setStatus("offline", { reason: "stopped" });
    }

    // Connecting

    async _connect() {
      clearTimeout(this._retryTimer);
      if (this._stopped) return;
      this._setStatus(this._attempt === 0 && this.status === "idle" ? "connecting" : "reconnecting");
      const url = wsUrl(this.options.url);
      this._resuming = this._caughtUpOnce && this.epoch !== null;
      if (this._resuming) {
        url.searchParams.set("since", cursorParam(this.cursor));
        url.searchParams.set("epoch", this.epoch);
      }
      if (this.options.ticketUrl) {
        let ticket;
        try {
          ticket = await this._fetchTicket();
        } catch (error) {
          if (error.status === 401 || error.status === 403) {
            this._setStatus("offline", { reason: "signed_out", code: error.status });
          } else {
            this._scheduleReconnect();
          }
          return;
        }
        if (this._stopped) return;
        url.searchParams.set("ticket", ticket);
      }
      this._handshakeError = null;
      let socket;
      try {
        socket = new WebSocket(url.href, [SUBPROTOCOL]);
      } catch (error) {
        this._report(error);
        this._setStatus("offline", { reason: "bad_url" });
        return;
      }
      this._socket = socket;
      socket.onmessage = (event) => this._receive(event);
      socket.onclose = (event) => this._closed(socket, event);
    }

    async _fetchTicket() {
      const headers = { Accept: "application/json" };
      const csrf = this.options.csrfToken && this.options.csrfToken();
      if (csrf) headers["X-CSRFToken"] = csrf;
      const response = await fetch(this.options.ticketUrl, {
        method: "POST",
        credentials: this.options.credentials,
        headers,
      });
      if (!response.ok) throw httpError(response, await response.json().catch(() => ({})));
      return (await response.json()).ticket;
    }

    _closed(socket, event) {
      if (socket !== this._socket) return; // an older socket
      this._socket = null;
      clearTimeout(this._stableTimer);
      for (const [, request] of this._pending) {
        clearTimeout(request.timer);
        request.reject(new Error("connection closed"));
      }
      this._pending.clear();
      if (this._stopped) return;
      const error = this._handshakeError;
      if (event.code === CLOSE_UNSUPPORTED_PROTOCOL) {
        this._setStatus("offline", { reason: "unsupported_protocol", code: event.code, error: error && error.code });
        return;
      }
      if (event.code === CLOSE_BAD_CURSOR) this.epoch = null; // resuming from it cannot work: start afresh
      if (event.code === CLOSE_UNAUTHENTICATED || event.code === CLOSE_FORBIDDEN) {
        // A ticket works once and for seconds: after `invalid_ticket`, try once with a new one.
        const newTicket = this.options.ticketUrl && error && error.code === "invalid_ticket" && !this._ticketRetried;
        this._ticketRetried = Boolean(newTicket);
        if (!newTicket) {
          this._setStatus("offline", {
            reason: event.code === CLOSE_UNAUTHENTICATED ? "signed_out" : "forbidden",
            code: event.code,
            error: error && error.code,
          });
          return;
        }
      }
      this._scheduleReconnect(event.code);
    }

    /** Reconnect after a jittered backoff; ``code``: the close code of the socket that closed, if one did. */
    _scheduleReconnect(code) {
      if (this._stopped) return;
      const bound = Math.min(this.options.maxDelay, this.options.baseDelay * 2 ** this._attempt);
      let delay = Math.random() * bound; // full jitter
      // An overloaded or degraded server (close 4013) says how long to stay away: at least that.
      const hint = this._handshakeError && this._handshakeError.retry_after;
      if (typeof hint === "number" && hint > 0) delay = Math.max(delay, hint * 1000);
      this._attempt += 1;
      const detail = { attempt: this._attempt, delay: Math.round(delay) };
      if (code !== undefined) detail.code = code;
      this._setStatus("reconnecting", detail);
      clearTimeout(this._retryTimer);
      this._retryTimer = setTimeout(() => this._connect(), delay);
    }

    _retryNow() {
      if (this.status === "reconnecting" && !this._socket) this._connect();
    }

    // Receiving

    _receive(event) {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (error) {
        this._report(error);
        return;
      }
      const handler = this["_on_" + frame.type];
      if (handler) handler.call(this, frame);
      if (frame.id !== undefined && this._pending.has(frame.id)) {
        const request = this._pending.get(frame.id);
        this._pending.delete(frame.id);
        clearTimeout(request.timer);
        if (frame.type === "error") request.reject(Object.assign(new Error(frame.message), { code: frame.code }));
        else request.resolve(frame);
      }
      if (this.options.onFrame) this.options.onFrame(frame);
    }

    _on_hello(frame) {
      this.user = frame.user;
      this.unreadCount = frame.unread_count;
      // Without a resume this connection reads live from hello's cursor (and the inbox re-fetch
      // covers what came before); a resume keeps the old cursor until `resumed` replaces it.
      if (!this._resuming) this.cursor = Object.assign({}, frame.cursor);
      this.epoch = frame.epoch || null;
      this.topics = new Set(frame.topics);
      this._ticketRetried = false;
      this._openChannel();
      clearTimeout(this._stableTimer);
      this._stableTimer = setTimeout(() => (this._attempt = 0), this.options.stableAfter);
      this._setStatus("connected", { user: frame.user });
      this._countChanged();
      if (!this._resuming) this.catchUp();
    }

    _on_notification(frame) {
      const { type, ...notification } = frame;
      this.cursor[frame.stream] = frame.offset; // seen, even when its id is (deduplicated)
      // Replayed frames (before `resumed`) are already in hello's unread count.
      const source = this._resuming ? "missed" : "live";
      if (this._add(notification, source) && !notification.read && source === "live") {
        this.unreadCount += 1;
        this._countChanged();
      }
    }

    _on_resumed(frame) {
      this._resuming = false;
      this.cursor = Object.assign({}, frame.cursor);
      if (!frame.recovered) this.catchUp(); // too far behind, or the store changed: reload the inbox
    }

    _on_read(frame) {
      this._applyLocally(frame.all ? { op: "all_read" } : { op: "read", ids: frame.ids }, false);
    }

    _on_dismissed(frame) {
      for (const id of frame.ids) this._applyLocally({ op: "dismissed", id }, false);
    }

    _on_unread_count(frame) {
      this._setCount(frame.count);
    }

    _on_ack(frame) {
      this._setCount(frame.unread_count);
    }

    _on_subscribed(frame) {
      this.topics.add(frame.topic);
      // A topic now read from `offset` on; a stream already in the cursor keeps its position.
      if (frame.offset !== undefined && !(frame.stream in this.cursor)) this.cursor[frame.stream] = frame.offset;
      this._changed();
    }

    _on_unsubscribed(frame) {
      this.topics.delete(frame.topic);
      this._changed();
    }

    _on_error(frame) {
      if (frame.id === undefined) this._handshakeError = frame; // the reason before a 4001/4003 close
      if (!this._pending.has(frame.id)) this._report(Object.assign(new Error(frame.message), { code: frame.code }));
    }

    _setCount(count) {
      this.unreadCount = count;
      if (count === 0) {
        for (const n of this._byId.values()) n.read = true; // nothing is unread anywhere
      }
      this._countChanged();
    }

    /** Remember a notification; report it once. Returns false for an id already seen. */
    _add(notification, source) {
      if (this._byId.has(notification.id)) return false;
      this._byId.set(notification.id, notification);
      if (this.options.onNotification) this.options.onNotification(notification, source);
      this._changed();
      return true;
    }

    // Catching up

    /**
     * Re-read the newest inbox page and merge it: new items are added (source "missed"
     * when they arrived while this client was away), read states are refreshed, and items
     * dismissed elsewhere are dropped. Runs on a connect that does not resume (the first
     * one) and when a resume fails.
     */
    async catchUp() {
      if (!this.options.apiUrl) return;
      const knownAtRequest = new Set(this._byId.keys());
      // After the first load, an unknown item newer than the oldest one this client knows
      // arrived while it was away ("missed"); an older one only moved into the page ("inbox").
      let missedAfter = this._caughtUpOnce ? 0 : Infinity;
      if (this._caughtUpOnce && knownAtRequest.size) missedAfter = Math.min(...knownAtRequest);
      let page;
      try {
        page = await this._api("GET", `notifications/?limit=${this.options.pageSize}`);
      } catch (error) {
        this._report(error);
        return;
      }
      this._caughtUpOnce = true;
      this.inboxLoaded = true;
      const fresh = new Map(page.results.map((n) => [n.id, n]));
      // The page covers ids from `oldest` up; an id known before the request in that range
      // that the store no longer lists was dismissed elsewhere. Ids seen since are kept.
      const oldest = page.next_before === null ? 0 : Math.min(...fresh.keys());
      for (const [id, known] of this._byId) {
        if (fresh.has(id)) known.read = fresh.get(id).read;
        else if (id >= oldest && knownAtRequest.has(id)) this._byId.delete(id);
      }
      for (const n of page.results.slice().reverse()) {
        this._add(n, n.id > missedAfter ? "missed" : "inbox");
      }
      this._changed();
    }

    // Requests

    /** Send a client frame and wait for its reply (rejects on an error frame or a timeout). */
    request(frame) {
      const socket = this._socket;
      if (!socket || socket.readyState !== WebSocket.OPEN || this.status !== "connected") {
        return Promise.reject(new Error("not connected"));
      }
      const id = `c${this._nextRequestId++}`;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          this._pending.delete(id);
          reject(new Error(`no reply to ${frame.type} within ${this.options.requestTimeout} ms`));
        }, this.options.requestTimeout);
        this._pending.set(id, { resolve, reject, timer });
        socket.send(JSON.stringify(Object.assign({}, frame, { id })));
      });
    }

    get connected() {
      return this.status === "connected";
    }

    /** Mark notifications read (over the socket when connected, else through the REST API). */
    async markRead(ids) {
      ids = ids.filter((id) => this._byId.has(id) && !this._byId.get(id).read);
      if (!ids.length) return;
      this._applyLocally({ op: "read", ids }, true);
      try {
        if (this.connected) await this.request({ type: "mark_read", ids });
        else for (const id of ids) this._setCount((await this._api("POST", `notifications/${id}/read/`)).unread_count);
      } catch (error) {
        this._report(error);
      }
    }

    async markAllRead() {
      this._applyLocally({ op: "all_read" }, true);
      try {
        if (this.connected) await this.request({ type: "mark_all_read" });
        else this._setCount((await this._api("POST", "notifications/read-all/")).unread_count);
      } catch (error) {
        this._report(error);
      }
    }

    /** Remove a notification from the inbox (REST only: the protocol has no dismiss frame). */
    async dismiss(id) {
      this._applyLocally({ op: "dismissed", id }, true);
      try {
        const reply = await this._api("DELETE", `notifications/${id}/`);
        if (!this.connected) this._setCount(reply.unread_count); // else an unread_count frame follows
      } catch (error) {
        this._report(error);
      }
    }

    async follow(slug) {
      return this._follow(slug, true);
    }

    async unfollow(slug) {
      return this._follow(slug, false);
    }

    async _follow(slug, following) {
      try {
        if (this.connected) await this.request({ type: following ? "subscribe" : "unsubscribe", topic: slug });
        else await this._api(following ? "POST" : "DELETE", `topics/${encodeURIComponent(slug)}/follow/`);
        following ? this.topics.add(slug) : this.topics.delete(slug);
        this._changed();
        return true;
      } catch (error) {
        this._report(error);
        return false;
      }
    }

    /** The topics this user may follow: [{slug, title, private, following}]. */
    async fetchTopics() {
      const { results } = await this._api("GET", "topics/");
      for (const topic of results) {
        if (topic.following) this.topics.add(topic.slug);
        else this.topics.delete(topic.slug);
      }
      this._changed();
      return results;
    }

    async _api(method, path, body) {
      if (!this.options.apiUrl) throw new Error("not connected, and no apiUrl to fall back on");
      const headers = { Accept: "application/json" };
      if (method !== "GET") {
        const csrf = this.options.csrfToken && this.options.csrfToken();
        if (csrf) headers["X-CSRFToken"] = csrf;
      }
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const response = await fetch(this.options.apiUrl + path, {
        method,
        headers,
        credentials: this.options.credentials,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const data = await response.json().catch(() => ({}));
      if (!response.ok) throw httpError(response, data);
      return data;
    }

    // Web Push

    /** Whether this browser can receive Web Push (a service worker, PushManager, Notification). */
    static pushSupported() {
      return (
        typeof navigator !== "undefined" && "serviceWorker" in navigator &&
        "PushManager" in root && "Notification" in root
      );
    }

    /** "unsupported" | "denied" | "off" | "on": whether this browser is subscribed. */
    async pushState() {
      if (!NotificationClient.pushSupported()) return "unsupported";
      if (Notification.permission === "denied") return "denied";
      if (Notification.permission !== "granted") return "off";
      for (const registration of await this._pushRegistrations()) {
        if (await registration.pushManager.getSubscription()) return "on";
      }
      return "off";
    }

    /** Subscribe this browser and store the subscription on the server; its JSON. */
    async enablePush({ serviceWorkerUrl, scope } = {}) {
      if (!NotificationClient.pushSupported()) throw codedError("unsupported", "This browser has no Web Push.");
      const permission = await Notification.requestPermission();
      if (permission !== "granted") throw codedError("denied", "Notifications are not allowed in this browser.");
      const url = this._serviceWorkerUrl(serviceWorkerUrl);
      const registration = await activated(
        await navigator.serviceWorker.register(url, scope ? { scope } : undefined)
      );
      const info = await this._api("GET", "push/");
      if (!info.enabled || !info.public_key) throw codedError("push_disabled", "This site sends no Web Push.");
      const key = base64UrlBytes(info.public_key);
      let subscription = await registration.pushManager.getSubscription();
      if (subscription && !sameKey(subscription.options && subscription.options.applicationServerKey, key)) {
        await subscription.unsubscribe(); // made with another key: push services would refuse our messages
        subscription = null;
      }
      if (!subscription) {
        try {
          subscription = await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key });
        } catch (error) {
          if (error && error.name === "NotAllowedError") throw codedError("denied", error.message);
          throw error;
        }
      }
      const json = subscription.toJSON();
      await this._api("POST", "push/subscriptions/", json);
      return json;
    }

    /** Unsubscribe this browser, and remove its subscription from the server; whether there was one. */
    async disablePush() {
      if (!NotificationClient.pushSupported()) return false;
      let removed = false;
      for (const registration of await this._pushRegistrations()) {
        const subscription = await registration.pushManager.getSubscription();
        if (!subscription) continue;
        const endpoint = subscription.endpoint;
        await subscription.unsubscribe();
        removed = true;
        try {
          await this._api("DELETE", "push/subscriptions/", { endpoint });
        } catch (error) {
          if (error.status !== 404) throw error; // 404: the server had dropped it already
        }
      }
      return removed;
    }

    _serviceWorkerUrl(url) {
      url = url || this.options.serviceWorkerUrl;
      if (url) return new URL(url, root.location.href).href;
      return new URL("sw.js", SCRIPT_URL || new URL("/static/notifications/client.js", root.location.href)).href;
    }

    /** This site's registrations of our service worker (every registration when none is ours). */
    async _pushRegistrations() {
      const all = await navigator.serviceWorker.getRegistrations();
      const url = this._serviceWorkerUrl();
      const ours = all.filter((r) => [r.active, r.waiting, r.installing].some((w) => w && w.scriptURL === url));
      return ours.length ? ours : all;
    }

    // Other tabs of this browser

    _openChannel() {
      if (!this.options.broadcastChannel || this._channel || !root.BroadcastChannel) return;
      this._channel = new BroadcastChannel(`notifications.${this.user.id}`);
      this._channel.onmessage = (event) => this._applyLocally(event.data, false);
    }

    /** Apply a read/dismiss locally; tell the other tabs when it happened here. */
    _applyLocally(change, tellOthers) {
      if (change.op === "read") {
        for (const id of change.ids) if (this._byId.has(id)) this._byId.get(id).read = true;
      } else if (change.op === "all_read") {
        for (const n of this._byId.values()) n.read = true;
      } else if (change.op === "dismissed") {
        this._byId.delete(change.id);
      }
      if (tellOthers && this._channel) this._channel.postMessage(change);
      this._changed();
    }

    // Reporting

    _setStatus(status, detail = {}) {
      const same = status === this.status;
      this.status = status;
      if (this.options.onStatus && !(same && status !== "reconnecting")) this.options.onStatus(status, detail);
    }

    _countChanged() {
      if (this.options.onUnreadCount) this.options.onUnreadCount(this.unreadCount);
      this._changed();
    }

    _changed() {
      if (this.options.onChange) this.options.onChange(this);
    }

    _report(error) {
      if (this.options.onError) this.options.onError(error);
    }
  }

  /** A cursor as `?since=` writes it: `u.1:17,b:120,t.7:3`. */
  function cursorParam(cursor) {
    return Object.entries(cursor).map(([stream, offset]) => `${stream}:${offset}`).join(",");
  }

  function httpError(response, data) {
    const error = (data && data.error) || {};
    return Object.assign(new Error(error.message || `HTTP ${response.status}`), {
      status: response.status,
      code: error.code,
    });
  }

  function codedError(code, message) {
    return Object.assign(new Error(message), { code });
  }

  /** A base64url string's bytes (an `applicationServerKey`). */
  function base64UrlBytes(text) {
    const base64 = (text + "=".repeat((4 - (text.length % 4)) % 4)).replace(/-/g, "+").replace(/_/g, "/");
    return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  }

  function sameKey(buffer, bytes) {
    if (!buffer) return false;
    const other = new Uint8Array(buffer);
    return other.length === bytes.length && other.every((byte, i) => byte === bytes[i]);
  }

  /** The registration once it has an active worker (pushManager.subscribe needs one). */
  function activated(registration) {
    if (registration.active) return Promise.resolve(registration);
    const worker = registration.installing || registration.waiting;
    return new Promise((resolve, reject) => {
      worker.addEventListener("statechange", () => {
        if (worker.state === "activated") resolve(registration);
        else if (worker.state === "redundant") reject(new Error("the service worker failed to install"));
      });
    });
  }

  root.NotificationClient = NotificationClient;
})(typeof window !== "undefined" ? window : globalThis);
