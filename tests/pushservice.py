"""A local Web Push service for tests and benchmarks: an HTTPS server on 127.0.0.1 that plays
the push service and the browser behind it.

``PushService(folder).start()`` listens on a free port with a self-signed certificate for
127.0.0.1 (written to ``folder``; ``.ca_file``). Clients trust it through ``REQUESTS_CA_BUNDLE``
(``.environ()``): the product sends only to https endpoints and verifies them as usual.

``service.subscribe()`` makes a "browser" subscription (a fresh P-256 key pair and a 16-byte auth
secret) whose endpoint is on this service: ``.json`` is what ``PushManager.subscribe()``'s
``toJSON()`` gives. For every request the service records a ``PushRequest``: it checks the VAPID
``Authorization: vapid t=<JWT>, k=<key>`` header (ES256 signature by ``k``, ``aud`` this origin,
``exp`` in the future and within 24 hours, ``sub`` present), the ``TTL`` header, and decrypts the
aes128gcm body with the subscription's private key and auth secret (``.payload``, ``.json()``).
A request that fails a check gets 400 (403 for VAPID, 404 for an unknown endpoint) and lists why
in ``.errors`` (``PushService(folder, check=False)`` checks nothing); otherwise the answer is the
endpoint's configured one (``respond``: 201 by default; 404, 410, 429 with
``Retry-After``, 500, a delay...).
"""

import base64
import datetime
import ipaddress
import json
import os
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import http_ece
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def write_certificate(folder: Path, host: str = HOST) -> tuple[Path, Path]:
    """A self-signed certificate for the IP address ``host`` (also its own CA): ``(cert, key)`` files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "push-service.crt", folder / "push-service.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@dataclass
class Subscription:
    """A browser's side of one subscription: its keys, and the JSON it gives the site."""

    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes

    @property
    def p256dh(self) -> str:
        point = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        return b64url(point)

    @property
    def path(self) -> str:
        return "/" + self.endpoint.split("/", 3)[3]

    @property
    def json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "expirationTime": None,
                "keys": {"p256dh": self.p256dh, "auth": b64url(self.auth)}}


@dataclass
class Answer:
    status: int = 201
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a slow service: timeouts)


@dataclass
class PushRequest:
    """One request the service received, what it found in it, and how it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    errors: list[str] = field(default_factory=list)
    claims: dict[str, Any] | None = None  # the VAPID JWT's claims (when its signature verified)
    vapid_key: str | None = None  # the VAPID public key of the header's k=
    payload: bytes | None = None  # the decrypted body

    def json(self) -> Any:
        assert self.payload is not None, self.errors
        return json.loads(self.payload)


def verify_vapid(header: str | None, origin: str) -> tuple[dict[str, Any], str]:
    """The claims and key of a valid VAPID ``Authorization`` header (RFC 8292); ``ValueError`` otherwise."""
    if not header or not header.lower().startswith("vapid "):
        raise ValueError(f"Authorization is not 'vapid t=..., k=...': {header!r}")
    params = dict(part.strip().split("=", 1) for part in header[6:].split(",") if "=" in part)
    token, key = params.get("t"), params.get("k")
    if not token or not key:
        raise ValueError("VAPID header without t= or k=")
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(key))
        head_b64, claims_b64, signature_b64 = token.split(".")
        head = json.loads(b64url_decode(head_b64))
        claims = json.loads(b64url_decode(claims_b64))
        signature = b64url_decode(signature_b64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"VAPID token or key does not parse: {exc}") from None
    if head.get("alg") != "ES256" or len(signature) != 64:
        raise ValueError(f"VAPID JWT is not ES256: {head}")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public.verify(der, f"{head_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError("VAPID JWT signature does not verify with k") from None
    if claims.get("aud") != origin:
        raise ValueError(f"VAPID aud {claims.get('aud')!r} is not {origin!r}")
    exp = claims.get("exp")
    if not isinstance(exp, int) or not time.time() < exp <= time.time() + 24 * 3600:
        raise ValueError(f"VAPID exp {exp!r} is not in the next 24 hours")
    if not claims.get("sub"):
        raise ValueError("VAPID claims without sub")
    return claims, key


class PushService:
    """The server; ``with PushService(folder) as service:`` starts and stops it."""

    def __init__(self, folder: Path | str, *, check: bool = True):
        """``check=False`` records requests without verifying or decrypting them (load tests)."""
        self.folder = Path(folder)
        self.check = check
        self.requests: list[PushRequest] = []
        self.answers: dict[str, Answer] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.ca_file: Path | None = None

    # Running

    def start(self) -> "PushService":
        cert_file, key_file = write_certificate(self.folder)
        self.ca_file = cert_file
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        server = ThreadingHTTPServer((HOST, 0), _handler(self))
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="push-service", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "PushService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def origin(self) -> str:
        return f"https://{HOST}:{self.port}"

    def environ(self) -> dict[str, str]:
        """The environment that makes ``requests`` trust this service: ``REQUESTS_CA_BUNDLE``."""
        return {"REQUESTS_CA_BUNDLE": str(self.ca_file)}

    # Subscriptions and answers

    def subscribe(self, name: str | None = None) -> Subscription:
        """A new browser subscription on this service (its endpoint ``/push/<name>``)."""
        name = name or secrets.token_urlsafe(12)
        subscription = Subscription(f"{self.origin}/push/{name}", ec.generate_private_key(ec.SECP256R1()),
                                    os.urandom(16))
        self.subscriptions[subscription.path] = subscription
        return subscription

    def respond(self, subscription: Subscription | str, status: int = 201, *, retry_after: int | str | None = None,
                delay: float = 0.0, headers: dict[str, str] | None = None) -> None:
        """Answer the requests to this subscription (or path) with ``status`` from now on."""
        path = subscription if isinstance(subscription, str) else subscription.path
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = str(retry_after)
        self.answers[path] = Answer(status, extra, delay)

    def received(self, subscription: Subscription | str | None = None) -> list[PushRequest]:
        """The requests so far (to one subscription, or all), oldest first."""
        path = None if subscription is None else subscription if isinstance(subscription, str) else subscription.path
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # Handling

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[PushRequest, Answer]:
        request = PushRequest(path, headers, body)
        answer = self.answers.get(path, Answer())
        subscription = self.subscriptions.get(path)
        if not self.check:
            request.status = answer.status
            with self._lock:
                self.requests.append(request)
            return request, answer
        try:
            request.claims, request.vapid_key = verify_vapid(headers.get("authorization"), self.origin)
        except ValueError as exc:
            request.errors.append(str(exc))
        if not headers.get("ttl", "").isdigit():
            request.errors.append(f"TTL header missing or not a number: {headers.get('ttl')!r}")
        if headers.get("content-encoding") != "aes128gcm":
            request.errors.append(f"Content-Encoding is {headers.get('content-encoding')!r}, not aes128gcm")
        if subscription is None:
            request.errors.append(f"no subscription at {path}")
        else:
            try:
                request.payload = http_ece.decrypt(body, private_key=subscription.private_key,
                                                   auth_secret=subscription.auth, version="aes128gcm")
            except Exception as exc:
                request.errors.append(f"the body does not decrypt: {type(exc).__name__}: {exc}")
        if request.errors:
            status = 403 if request.claims is None else 404 if subscription is None else 400
            answer = Answer(status)
        request.status = answer.status
        with self._lock:
            self.requests.append(request)
        return request, answer


def _handler(service: PushService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the sender's session reuses its connection

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {name.lower(): value for name, value in self.headers.items()}
            request, answer = service.handle(self.path, headers, body)
            if answer.delay:
                time.sleep(answer.delay)
            text = "; ".join(request.errors).encode()
            try:
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if answer.status in (201, 202):
                    self.send_header("Location", f"{service.origin}/message/{len(service.requests)}")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the client gave up (its timeout)

        def log_message(self, format: str, *args) -> None:  # quiet
            pass

    return Handler
