"""Who is online: every open connection, across all server processes.

Two backends behind one interface, chosen by ``NOTIFICATIONS["PRESENCE_BACKEND"]``
(a dotted path, loaded lazily like Django's storage backends):

- ``LocalPresence``: this process's connections only (one-process quick start).
- ``RedisPresence``: shared by every process, in the channel layer's Redis (``REDIS_URL``, or
  the master named ``REDIS_SENTINEL_MASTER`` found through ``REDIS_SENTINELS``). Each connection is a hash
  ``<prefix>:presence:conn:<id>`` plus a member of the sorted set
  ``<prefix>:presence:alive`` scored by its last heartbeat. One task per process
  refreshes the scores of its local connections every ``PRESENCE_TTL / 3`` seconds;
  a process that dies without cleaning up stops refreshing, and its connections drop
  out of every listing after at most ``PRESENCE_TTL`` seconds.
"""

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

logger = logging.getLogger(__name__)

POOL_SIZE = 16  # Redis connections per process for presence writes


@dataclass
class Connection:
    id: str
    user_id: int
    username: str
    since: float
    ip: str | None = None
    user_agent: str = ""
    server: str = ""
    topics: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Connection":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @property
    def since_display(self) -> str:
        return datetime.fromtimestamp(self.since, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class BasePresence:
    """Backends record connections from async consumers and list them from sync code (the admin)."""

    def __init__(self):
        self.local: dict[str, Connection] = {}

    async def add(self, connection: Connection) -> None:
        self.local[connection.id] = connection

    async def update_topics(self, connection_id: str, topics: list[str]) -> None:
        if connection_id in self.local:
            self.local[connection_id].topics = sorted(topics)

    async def remove(self, connection_id: str) -> None:
        self.local.pop(connection_id, None)

    def online(self) -> list[Connection]:
        """Every open connection, oldest first."""
        raise NotImplementedError("subclasses of BasePresence must provide an online() method")


class LocalPresence(BasePresence):
    def online(self) -> list[Connection]:
        return sorted(self.local.values(), key=lambda c: c.since)


class RedisPresence(BasePresence):
    def __init__(self, url: str | None = None, prefix: str | None = None, ttl: float | None = None):
        super().__init__()
        self.url = url or settings.REDIS_URL
        # Sentinel wins over the URL, as for the channel layer (project.layers).
        self.sentinels = [] if url else list(getattr(settings, "REDIS_SENTINELS", []))
        self.prefix = f"{prefix or settings.NOTIFICATIONS['REDIS_PREFIX']}:presence"
        self.ttl = ttl or settings.NOTIFICATIONS["PRESENCE_TTL"]
        self._clients: dict[asyncio.AbstractEventLoop, object] = {}
        self._heartbeats: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}

    @property
    def alive_key(self) -> str:
        return f"{self.prefix}:alive"

    def conn_key(self, connection_id: str) -> str:
        return f"{self.prefix}:conn:{connection_id}"

    def _client(self):
        import redis.asyncio

        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = self._connect(redis.asyncio)
            self._heartbeats[loop] = loop.create_task(self._heartbeat())
        return self._clients[loop]

    def _connect(self, module):
        """A client of ``module`` (``redis`` or ``redis.asyncio``) for the URL or the Sentinel master."""
        if self.sentinels:
            sentinel = module.sentinel.Sentinel(self.sentinels, socket_timeout=2)
            return sentinel.master_for(settings.REDIS_SENTINEL_MASTER, db=settings.REDIS_SENTINEL_DB,
                                       password=settings.REDIS_SENTINEL_PASSWORD or None)
        if module.__name__ == "redis.asyncio":
            # A burst of connects or disconnects (a restart: every client at once) waits for one of
            # a few connections instead of opening hundreds, or failing with "Too many connections".
            pool = module.BlockingConnectionPool.from_url(self.url, max_connections=POOL_SIZE, timeout=10)
            return module.Redis(connection_pool=pool)
        return module.Redis.from_url(self.url)

    async def _write(self, connection: Connection) -> None:
        client = self._client()
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(self.conn_key(connection.id), connection.to_json(), ex=int(self.ttl * 2))
            pipe.zadd(self.alive_key, {connection.id: time.time()})
            await pipe.execute()

    async def add(self, connection: Connection) -> None:
        await super().add(connection)
        try:
            await self._write(connection)
        except Exception as exc:  # presence is advisory: never fail a connection because of it
            logger.warning("presence add failed: %s: %s", type(exc).__name__, exc)

    async def update_topics(self, connection_id: str, topics: list[str]) -> None:
        await super().update_topics(connection_id, topics)
        if connection_id in self.local:
            try:
                await self._write(self.local[connection_id])
            except Exception as exc:
                logger.warning("presence update failed: %s: %s", type(exc).__name__, exc)

    async def remove(self, connection_id: str) -> None:
        await super().remove(connection_id)
        try:
            client = self._client()
            async with client.pipeline(transaction=False) as pipe:
                pipe.delete(self.conn_key(connection_id))
                pipe.zrem(self.alive_key, connection_id)
                await pipe.execute()
        except Exception as exc:
            logger.warning("presence remove failed: %s: %s", type(exc).__name__, exc)

    async def _heartbeat(self) -> None:
        """Refresh this process's connections; a dead process's entries expire after ``ttl``."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not self.local:
                continue
            try:
                client = self._client()
                now = time.time()
                async with client.pipeline(transaction=False) as pipe:
                    pipe.zadd(self.alive_key, {cid: now for cid in self.local})
                    for cid in self.local:
                        pipe.expire(self.conn_key(cid), int(self.ttl * 2))
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("presence heartbeat failed: %s: %s", type(exc).__name__, exc)

    def online(self) -> list[Connection]:
        import redis

        client = self._connect(redis)
        try:
            cutoff = time.time() - self.ttl
            client.zremrangebyscore(self.alive_key, "-inf", cutoff)
            ids = [i.decode() for i in client.zrange(self.alive_key, 0, -1)]
            values = client.mget([self.conn_key(i) for i in ids]) if ids else []
        finally:
            client.close()
        connections = [Connection.from_json(v) for v in values if v]
        return sorted(connections, key=lambda c: c.since)


_backend: BasePresence | None = None


def get_presence() -> BasePresence:
    """The configured presence backend (one per process)."""
    global _backend
    if _backend is None:
        _backend = import_string(settings.NOTIFICATIONS["PRESENCE_BACKEND"])()
    return _backend


def reset_presence(**kwargs) -> None:
    """Forget the backend, so a settings change takes effect."""
    global _backend
    _backend = None


setting_changed.connect(reset_presence)
