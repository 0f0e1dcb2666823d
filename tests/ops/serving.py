"""``bin/serve`` (uvicorn, as in production) as a test server, on TCP (IPv4 or IPv6) or a Unix
socket, with HTTP and WebSocket clients for each. No fixtures here (see ``conftest.py``)."""

import asyncio
import http.client
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect, unix_connect

from tests.server import (
    APP_ENV,
    BASE_DIR,
    RECV_TIMEOUT,
    WS_PATH,
    LiveServer,
    Response,
    free_port,
    http_request,
    port_answers,
)

SERVE = BASE_DIR / "bin" / "serve"
START_TIMEOUT = 30.0
# Variables of bin/serve itself: never inherited from the developer's shell.
SERVE_ENV = ("SERVE_HOST", "SERVE_PORT", "SERVE_UDS", "SERVE_FD", "SERVE_WORKERS", "SERVE_GRACEFUL_TIMEOUT",
             "SERVER_HEADER", "PROMETHEUS_MULTIPROC_DIR", "TRUSTED_PROXIES", "FORWARDED_ALLOW_IPS",
             "WEB_CONCURRENCY", "SERVE_MAX_HEADER_BYTES", "SERVE_HEADER_TIMEOUT", "SERVE_WS_MAX_UNSENT_BYTES",
             "SERVE_WS_CLOSE_TIMEOUT")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


@dataclass
class Served(LiveServer):
    """A running ``bin/serve``: ``host``/``port``, or ``uds``; ``workers`` uvicorn processes."""

    host: str = "127.0.0.1"
    uds: str | None = None
    workers: int = 1
    metrics_dir: Path | None = field(default=None)

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.netloc}"

    def ws_url(self, path: str = WS_PATH, **query: str) -> str:
        return f"ws://{self.netloc}{path}" + (f"?{urlencode(query)}" if query else "")

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.uds:
            return _UnixHTTPConnection(self.uds, timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, **kwargs) -> Response:
        return http_request(self, method, path, **kwargs)

    async def request_async(self, method: str, path: str, **kwargs) -> Response:
        return await asyncio.to_thread(self.request, method, path, **kwargs)

    async def websocket(self, *, token: str | None = None, query: dict | None = None,
                        headers: dict | None = None, subprotocols=None) -> ClientConnection:
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        options = dict(additional_headers=all_headers, subprotocols=subprotocols, open_timeout=RECV_TIMEOUT,
                       close_timeout=2)
        if self.uds:
            uri = f"ws://localhost{WS_PATH}" + (f"?{urlencode(query)}" if query else "")
            return await unix_connect(self.uds, uri, **options)
        return await connect(self.ws_url(**(query or {})), **options)

    def stop(self) -> None:
        super().stop()
        if self.uds and os.path.exists(self.uds):
            os.unlink(self.uds)


def start_serve(env: dict[str, str], log_path: Path, *, workers: int = 1, host: str = "127.0.0.1",
                uds: str | None = None, args: tuple[str, ...] = (), attempts: int = 3) -> Served:
    """Start ``bin/serve`` and wait (bounded) until it answers ``/healthz`` in every worker
    (well, until the socket answers and one ``/healthz`` succeeds)."""
    full_env = {k: v for k, v in os.environ.items() if k not in APP_ENV and k not in SERVE_ENV}
    # No delivery worker unless the test asks (tests/server.py, start_server, says why).
    full_env.update({"DJANGO_SETTINGS_MODULE": "project.settings", "PYTHONUNBUFFERED": "1",
                     "DELIVERY_WORKER": "0"}, **env)
    metrics_dir = log_path.parent / f"metrics-{log_path.stem}"
    full_env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    failures = []
    for _ in range(attempts):
        port = 0 if uds else free_port(host)
        bind = ["--uds", uds] if uds else ["--host", host, "--port", str(port)]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [str(SERVE), *bind, "--workers", str(workers), "--", *args],
                cwd=BASE_DIR, env=full_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        server = Served(port=port, process=process, log_path=log_path, env=full_env, host=host, uds=uds,
                        workers=workers, metrics_dir=Path(full_env["PROMETHEUS_MULTIPROC_DIR"]))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if port_answers(port, host, uds=uds):
                try:
                    if server.request("GET", "/healthz", timeout=2).status == 200:
                        return server
                except OSError:
                    pass
            time.sleep(0.1)
        server.stop()
        failures.append(f"{uds or port}: exit code {process.returncode}")
        if process.returncode is None or "address already in use" not in server.log().lower():
            break
    raise RuntimeError(f"bin/serve did not start within {START_TIMEOUT:.0f} s ({'; '.join(failures)}):\n"
                       f"{log_path.read_text(errors='replace')}")
