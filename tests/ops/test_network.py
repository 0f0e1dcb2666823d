"""Listen addresses (IPv4, IPv6, a Unix socket), response headers, HTTP and WebSocket on one
port, and the client address behind (un)trusted proxies, with real ``bin/serve`` processes."""

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile

import pytest

from tests.server import free_port, recv_json

from .serving import SERVE

pytestmark = [pytest.mark.server, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

SUBPROTOCOL = "notifications.v2"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


async def hello_over(server, token, **kwargs):
    ws = await server.websocket(token=token, **kwargs)
    frame = await recv_json(ws)
    assert frame["type"] == "hello", frame
    return ws, frame


async def test_ipv4_http_and_websocket_on_one_port_with_subprotocol_and_server_header(serve, alice, alice_token):
    server = await asyncio.to_thread(serve, "ipv4", SERVER_HEADER="notify-test")
    health = await server.request_async("GET", "/healthz")
    assert (health.status, health.json()) == (200, {"status": "ok"})
    assert health.headers.get_all("Server") == ["notify-test"]

    ws, hello = await hello_over(server, alice_token, subprotocols=["other.v9", SUBPROTOCOL])
    assert ws.subprotocol == SUBPROTOCOL
    assert ws.response.headers["Sec-WebSocket-Protocol"] == SUBPROTOCOL
    assert ws.response.headers.get_all("Server") == ["notify-test"]
    assert (hello["protocol"], hello["version"], hello["user"]["id"]) == (SUBPROTOCOL, 2, alice.pk)
    plain, _ = await hello_over(server, alice_token)  # no subprotocol offered: none chosen
    assert plain.subprotocol is None and "Sec-WebSocket-Protocol" not in plain.response.headers
    for w in (ws, plain):
        await w.close()


async def test_ipv6_loopback(serve, alice_token):
    if not ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1)")
    server = await asyncio.to_thread(serve, "ipv6", host="::1")
    assert server.http_url == f"http://[::1]:{server.port}"
    health = await server.request_async("GET", "/healthz")
    assert (health.status, health.json()) == (200, {"status": "ok"})
    ws, _ = await hello_over(server, alice_token)
    assert ws.remote_address[0] == "::1"
    await ws.close()


async def test_unix_socket_without_server_header(serve, alice_token):
    directory = tempfile.mkdtemp(prefix="ntf-")  # short: a Unix socket path has at most 107 bytes
    try:
        path = os.path.join(directory, "serve.sock")
        server = await asyncio.to_thread(serve, "uds", uds=path, SERVER_HEADER="")
        health = await server.request_async("GET", "/healthz")
        assert (health.status, health.json()) == (200, {"status": "ok"})
        assert "Server" not in health.headers
        ws, _ = await hello_over(server, alice_token, subprotocols=[SUBPROTOCOL])
        assert ws.subprotocol == SUBPROTOCOL
        assert "Server" not in ws.response.headers
        await ws.close()
        server.stop()
        assert not os.path.exists(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def online_ips(server, session) -> list[str]:
    page = server.request("GET", "/admin/notifications/notification/online/",
                          headers={"Cookie": f"sessionid={session['sessionid']}"})
    assert page.status == 200, page.text[:300]
    return re.findall(r"<td>[^<]*UTC</td><td>([^<]*)</td>", page.text)


async def test_forwarded_for_is_honoured_from_a_trusted_proxy_only(serve, alice_token, superuser_session):
    """The test client (127.0.0.1) plays the proxy. Trusted: its X-Forwarded-For names the client
    (in "who is online", and for the /metrics allow-list). Untrusted: the header is ignored."""
    forged = {"X-Forwarded-For": "203.0.113.9"}
    trusted, untrusted = await asyncio.gather(
        asyncio.to_thread(serve, "trusted", TRUSTED_PROXIES="127.0.0.1,::1"),
        asyncio.to_thread(serve, "untrusted", TRUSTED_PROXIES="10.0.0.1"),
    )
    via_proxy, _ = await hello_over(trusted, alice_token, headers=forged)
    for _ in range(50):  # presence is written just after hello
        ips = await asyncio.to_thread(online_ips, trusted, superuser_session)
        if ips:
            break
        await asyncio.sleep(0.1)
    assert ips == ["203.0.113.9"]
    assert (await trusted.request_async("GET", "/metrics", headers=forged)).status == 403  # a remote client
    assert (await trusted.request_async("GET", "/metrics")).status == 200
    await via_proxy.close()

    spoofing, _ = await hello_over(untrusted, alice_token, headers=forged)
    for _ in range(50):  # the new connection is listed (each server has a Redis prefix of its own)
        ips = await asyncio.to_thread(online_ips, untrusted, superuser_session)
        if ips == ["127.0.0.1"]:
            break
        await asyncio.sleep(0.1)
    assert ips == ["127.0.0.1"]
    assert (await untrusted.request_async("GET", "/metrics", headers=forged)).status == 200  # the header is ignored
    await spoofing.close()


def test_a_port_in_use_is_a_clear_startup_error(serve_env, tmp_path):
    """README: "address already in use" means another process listens there."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, **serve_env, "DJANGO_SETTINGS_MODULE": "project.settings"}
        result = subprocess.run([str(SERVE), "--port", str(port), "--workers", "1"], env=env, capture_output=True,
                                text=True, timeout=60)
    assert result.returncode != 0
    assert "address already in use" in (result.stdout + result.stderr).lower()
    assert free_port()  # nothing left behind


async def test_an_inherited_listening_socket_as_systemd_socket_activation_passes_it(serve_env, tmp_path, alice_token):
    """``bin/serve --fd N``: the socket is bound before the server starts (by systemd, here by the
    test) and shared by the workers; connections made before they are ready wait in its backlog."""
    from tests.server import APP_ENV

    from .serving import Served

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port, fd = listener.getsockname()[1], listener.fileno()
    env = {k: v for k, v in os.environ.items() if k not in APP_ENV}
    env.update(serve_env, DJANGO_SETTINGS_MODULE="project.settings",
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    log_path = tmp_path / "fd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(SERVE), "--fd", str(fd), "--workers", "2"], pass_fds=(fd,), env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    listener.close()  # the server holds its own copy
    server = Served(port=port, process=process, log_path=log_path, env=env)
    try:
        health = await server.request_async("GET", "/healthz", timeout=30)  # waits in the backlog meanwhile
        assert (health.status, health.json()) == (200, {"status": "ok"})
        ws, _ = await hello_over(server, alice_token)
        await ws.close()
    finally:
        server.stop()
    assert process.returncode == 0
    assert not re.search(r"ERROR|Traceback", server.log()), server.log()
