"""Prometheus metrics, and ``GET /metrics``.

The code calls the small functions below, one line at each point; labels have a bounded
set of values (frame types, error codes, known close codes), never a user, socket or
topic. The hub counts a fan-out with one ``inc(n)`` per notification, not one per socket.

Several server processes (``bin/serve`` runs uvicorn workers) write their values to
files in ``PROMETHEUS_MULTIPROC_DIR`` (set before the process starts: prometheus_client
reads it at import); ``/metrics`` in any process then reports the sum over all of them.
Open connections are a ``livesum`` gauge: a process that exits (or dies) stops counting.

``/metrics`` answers clients whose address is in ``METRICS_ALLOWED_IPS`` (loopback by
default; the address behind ``TRUSTED_PROXIES``) or that send
``Authorization: Bearer <METRICS_TOKEN>``; anyone else gets 403 JSON.
"""

import hmac
import ipaddress
import logging
import os
import re

from django.http import HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from . import conf
from .proxies import client_ip

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
disable_created_metrics()  # no "_created" twin of every counter (multi-process mode has none either)

CONNECTIONS = Gauge(
    "notifications_ws_connections", "Open WebSocket connections (past the handshake, registered with the hub).",
    multiprocess_mode="livesum",
)
CONNECTS = Counter("notifications_ws_connects", "WebSocket handshakes, by result: accepted or refused.", ["result"])
DISCONNECTS = Counter("notifications_ws_disconnects", "WebSocket connections closed, by close code.", ["code"])
FRAMES_IN = Counter("notifications_ws_frames_in", "Valid client frames, by type.", ["type"])
FRAMES_OUT = Counter("notifications_ws_frames_out", "Frames sent or queued to clients, by type.", ["type"])
ERRORS = Counter("notifications_ws_errors", "Error frames sent to clients, by error code.", ["code"])
SENT = Counter("notifications_sent", "Notifications pushed after commit, by audience kind.", ["audience"])
PUSH_LATENCY = Histogram(
    "notifications_push_latency_seconds",
    "From the sending transaction's commit to the frame handed to the local sockets (per notification and "
    "process; across machines it includes their clock difference).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RESUMES = Counter("notifications_resumes", "Resume requests, by outcome: recovered, or the reason it was not.",
                  ["outcome"])
SLOW_CONSUMERS = Counter("notifications_ws_slow_consumer_closes",
                         "Connections closed with 4008 because their outbox overflowed.")
OVER_CAPACITY = Counter("notifications_channel_layer_over_capacity",
                        "Channel-layer messages channels-redis dropped because a channel was over capacity.")
PUSH_FAILURES = Counter("notifications_push_failures",
                        "Pushes that failed to reach the channel layer (stored; the hubs read them from the store).")
HUB_MESSAGES = Counter("notifications_hub_messages_received",
                       "Channel-layer messages this process's hub received, by kind: user, topic, broadcast "
                       "(notifications of that audience) or control (follows, closes, read state). A process "
                       "receives only the audiences of its own sockets.", ["kind"])
_HUB_MESSAGE_KINDS = {kind: HUB_MESSAGES.labels(kind) for kind in ("user", "topic", "broadcast", "control")}
STORE_READS = Counter("notifications_hub_store_reads",
                      "Notifications a hub read from the store because their push was lost, late or dropped.")
DELIVERIES = Counter("notifications_deliveries",
                     "Deliveries on external channels (email, digest, push), by channel and outcome: sent, "
                     "retried (a failure that will be tried again), failed (given up) or skipped (not sent: read "
                     "before its digest, no address, a socket was open).", ["channel", "outcome"])
DELIVERIES_PLANNED = Counter("notifications_deliveries_planned",
                             "Deliveries the preferences asked for (rows written), by channel.", ["channel"])

# Close codes worth a label of their own; any other (a client may send any 3000-4999) is "other".
KNOWN_CLOSE_CODES = {1000, 1001, 1005, 1006, 1011, 1012, 4001, 4003, 4005, 4008, 4009, 4010, 4012, 4013, 4029, 4400,
                     4426}
_NOTIFICATION_FRAMES = FRAMES_OUT.labels("notification")
_USER_EVENT_FRAMES = FRAMES_OUT.labels("user_event")
_ACCEPTED = CONNECTS.labels("accepted")
_REFUSED = CONNECTS.labels("refused")


def _close_label(code) -> str:
    return str(code) if code in KNOWN_CLOSE_CODES else ("none" if code is None else "other")


# One-line hooks, called from the consumer, the hub and push.


def connection_opened() -> None:
    _ACCEPTED.inc()
    CONNECTIONS.inc()


def connection_refused() -> None:
    _REFUSED.inc()


def connection_closed(code, *, was_open: bool) -> None:
    DISCONNECTS.labels(_close_label(code)).inc()
    if was_open:
        CONNECTIONS.dec()


def frame_in(kind: str) -> None:
    FRAMES_IN.labels(kind).inc()


def frame_out(frame: dict) -> None:
    FRAMES_OUT.labels(frame.get("type", "?")).inc()
    if frame.get("type") == "error":
        ERRORS.labels(frame.get("code", "?")).inc()


def delivered(count: int, committed_at: float | None, now: float) -> None:
    """The hub handed one notification to ``count`` local sockets."""
    if count:
        _NOTIFICATION_FRAMES.inc(count)
    if committed_at:
        PUSH_LATENCY.observe(max(0.0, now - committed_at))


def user_event(count: int) -> None:
    if count:
        _USER_EVENT_FRAMES.inc(count)


def hub_message(kind: str) -> None:
    """The hub received one channel-layer message: ``user``, ``topic``, ``broadcast`` or ``control``."""
    _HUB_MESSAGE_KINDS[kind].inc()


def sent(audience: str) -> None:
    SENT.labels(audience).inc()


def delivery(channel: str, outcome: str, count: int = 1) -> None:
    """``count`` deliveries on ``channel`` ended a try with ``outcome`` (sent, retried, failed, skipped)."""
    if count:
        DELIVERIES.labels(channel, outcome).inc(count)


def deliveries_planned(channel: str, count: int) -> None:
    if count:
        DELIVERIES_PLANNED.labels(channel).inc(count)


def resumed(outcome: dict) -> None:
    RESUMES.labels("recovered" if outcome.get("recovered") else outcome.get("reason", "?")).inc()
    if outcome.get("count"):
        _NOTIFICATION_FRAMES.inc(outcome["count"])


def slow_consumer() -> None:
    SLOW_CONSUMERS.inc()


def over_capacity(count: int) -> None:
    OVER_CAPACITY.inc(count)


def push_failed() -> None:
    PUSH_FAILURES.inc()


def store_read(count: int) -> None:
    if count:
        STORE_READS.inc(count)


def process_exit() -> None:
    """This process stops serving: its open connections stop counting at once (live gauges)."""
    if MULTIPROC_DIR:
        multiprocess.mark_process_dead(os.getpid(), MULTIPROC_DIR)


# The endpoint

_PID = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def _forget_dead_processes(path: str) -> None:
    """Drop the live gauges of processes that died without cleaning up (killed, crashed)."""
    pids = {int(m.group(1)) for name in os.listdir(path) if (m := _PID.match(name))}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            pass  # alive, another user's


def exposition() -> bytes:
    """Every metric in the text format: this process's, or the sum over all processes."""
    if not MULTIPROC_DIR:
        return generate_latest(REGISTRY)
    _forget_dead_processes(MULTIPROC_DIR)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, MULTIPROC_DIR)
    return generate_latest(registry)


def _address_allowed(address: str | None) -> bool:
    allowed = [a.strip() for a in conf.settings.METRICS_ALLOWED_IPS if a.strip()]
    if not address:
        return "unix" in allowed  # a Unix-socket peer has no address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def _token_ok(request) -> bool:
    expected = conf.settings.METRICS_TOKEN
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def metrics_allowed(request) -> bool:
    """Whether ``request`` may read ``/metrics`` (and ``/readyz``'s details): from an address in
    ``METRICS_ALLOWED_IPS`` (behind ``TRUSTED_PROXIES``), or with the ``METRICS_TOKEN`` bearer."""
    meta = request.META
    address = client_ip(meta.get("REMOTE_ADDR"), meta.get("HTTP_X_FORWARDED_FOR"), meta.get("HTTP_X_REAL_IP"))
    return _token_ok(request) or _address_allowed(address)


@never_cache
@require_GET
def metrics_view(request):
    if not metrics_allowed(request):
        message = "Metrics are served to METRICS_ALLOWED_IPS or with 'Authorization: Bearer <METRICS_TOKEN>'."
        return JsonResponse({"error": {"code": "forbidden", "message": message}}, status=403)
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)


# channels-redis logs the messages group_send dropped; settings route its logger here too.
_OVER_CAPACITY = re.compile(r"^(\d+) of \d+ channels over capacity")


class OverCapacityHandler(logging.Handler):
    """Count channels-redis' ``"%s of %s channels over capacity in group %s"`` lines (messages
    ``group_send`` dropped) in ``notifications_channel_layer_over_capacity_total``."""

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, str) or "over capacity" not in record.msg:
            return
        try:
            match = _OVER_CAPACITY.match(record.getMessage())
        except Exception:  # a malformed record must not break logging
            return
        if match:
            over_capacity(int(match.group(1)))
