"""Health endpoints for load balancers and orchestrators: cheap, unauthenticated, JSON.

- ``GET /healthz``: liveness. No I/O: the process is up and serving requests.
- ``GET /readyz``: readiness. One database query and one real round trip through the
  channel layer (Redis in production); 503 naming the dependency that failed:
  ``{"status": "unavailable", "checks": {"database": "ok", "channel_layer": "error"}}``.
  What failed (an error names hosts, ports, the database) goes to the log, once per kind of
  failure (``OutageLog``), and to clients allowed to read ``/metrics``, as ``"details"``.
"""

import asyncio
import logging
import time
import uuid

from channels.db import database_sync_to_async
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from .layers import channel_layer
from .metrics import metrics_allowed
from .outage_log import OutageLog

CHECK_TIMEOUT = 2.0
# WARNING: the component that uses the dependency logs its own failures at ERROR.
failures = OutageLog(logging.getLogger(__name__), level=logging.WARNING)


@never_cache
@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})


@database_sync_to_async
def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def _check_channel_layer() -> None:
    layer = channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer is configured")
    channel = await layer.new_channel()
    token = uuid.uuid4().hex
    await layer.send(channel, {"type": "readyz.ping", "token": token})
    message = await layer.receive(channel)
    if message.get("token") != token:
        raise RuntimeError("the channel layer returned another message")


async def _run(name: str, check) -> str:
    """``check``'s outcome in detail: ``ok (1.2 ms)``, or ``error: ...`` (also logged)."""
    what = f"readyz: {name}"
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except TimeoutError:
        failures.failure(what, TimeoutError(f"no answer within {CHECK_TIMEOUT:g} s"))
        return f"error: no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:
        failures.failure(what, exc)
        return f"error: {type(exc).__name__}: {exc}"[:300]
    failures.recovered(what)
    return f"ok ({(time.perf_counter() - started) * 1000:.1f} ms)"


@never_cache
@require_GET
async def readyz(request):
    database, layer = await asyncio.gather(
        _run("database", _check_database), _run("channel_layer", _check_channel_layer))
    details = {"database": database, "channel_layer": layer}
    checks = {name: "ok" if value.startswith("ok") else "error" for name, value in details.items()}
    ready = all(value == "ok" for value in checks.values())
    body: dict = {"status": "ok" if ready else "unavailable", "checks": checks}
    if metrics_allowed(request):
        body["details"] = details
    return JsonResponse(body, status=200 if ready else 503)
