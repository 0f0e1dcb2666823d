"""Who is online: every open connection, across all server processes.

Two backends behind one interface, chosen by ``NOTIFICATIONS["PRESENCE_BACKEND"]``
(a dotted path, loaded lazily like Django's storage backends):

- ``LocalPresence``: this process's connections only (one-process quick start).
- ``RedisPresence``: shared by every process, in the channel layer's Redis (the ``hosts`` of
  ``CHANNEL_LAYERS["default"]``: URLs, or Sentinel-managed masters), or at
  ``NOTIFICATIONS["REDIS_URL"]`` (``notifications.conf.redis_hosts``). Each connection is a hash
  ``<prefix>:presence:conn:<id>`` plus a member of the sorted set
  ``<prefix>:presence:alive`` scored by its last heartbeat. One task per process
  refreshes the scores of its local connections every ``PRESENCE_TTL / 3`` seconds (and writes
  a record again that Redis lost, restarted empty);
  a process that dies without cleaning up stops refreshing, and its connections drop
  out of every listing after at most ``PRESENCE_TTL`` seconds.

  Several servers (several ``hosts``, or several URLs in ``NOTIFICATIONS["REDIS_URL"]``) are
  shards: a connection's record and its member of the alive set live on the shard its id hashes
  to (``shard_index``), where its heartbeats and removal go; ``online()`` reads every shard, and
  lists what the shards that answer hold (a shard that is down: its connections are missing
  until it is back and the next heartbeat writes them again).
"""

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from . import conf
from .transport import redis_retry_once

logger = logging.getLogger(__name__)

POOL_SIZE = 16  # Redis connections per process and shard for presence writes
# Options of a channel layer's host entry that are not presence's: channels-redis blocks in reads
# (no socket timeout) and its retry objects are for the asyncio client; presence sets its own.
LAYER_ONLY_OPTIONS = ("socket_timeout", "retry", "retry_on_error")


def shard_index(connection_id: str, shards: int) -> int:
    """The shard (0 to ``shards - 1``) that holds a connection's record: the same in every process."""
    return zlib.crc32(connection_id.encode()) % shards if shards > 1 else 0


def _split(value: str | Sequence[str]) -> list[str]:
    """The non-empty entries of a comma-separated setting (or a list)."""
    parts = value.split(",") if isinstance(value, str) else value
    return [part.strip() for part in parts if part.strip()]


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
    def __init__(self, url: str | Sequence[str] | None = None, prefix: str | None = None, ttl: float | None = None):
        """``url``: one Redis URL, several (comma-separated, or a list: shards); default: the app's
        Redis (``notifications.conf.redis_hosts``: the channel layer's, or ``NOTIFICATIONS["REDIS_URL"]``)."""
        super().__init__()
        # channels-redis host entries, one per shard: {"address": url, ...}, Sentinel, or keywords.
        self.hosts = [{"address": address} for address in _split(url)] if url else conf.redis_hosts()
        if not self.hosts:
            raise ImproperlyConfigured(
                "RedisPresence needs Redis: a channels-redis layer in CHANNEL_LAYERS['default'] (its hosts), "
                "or NOTIFICATIONS['REDIS_URL'].")
        self.prefix = f"{prefix or conf.settings.REDIS_PREFIX}:presence"
        self.ttl = ttl or conf.settings.PRESENCE_TTL
        self._clients: dict[asyncio.AbstractEventLoop, list] = {}
        self._heartbeats: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
        self._batches: dict[tuple[asyncio.AbstractEventLoop, int], list] = {}  # writes waiting for _flush
        self._flushing: set[asyncio.Task] = set()

    @property
    def alive_key(self) -> str:
        return f"{self.prefix}:alive"

    def conn_key(self, connection_id: str) -> str:
        return f"{self.prefix}:conn:{connection_id}"

    @property
    def shards(self) -> int:
        return len(self.hosts)

    def _loop_clients(self) -> list:
        import redis.asyncio

        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = [self._connect(redis.asyncio, i) for i in range(self.shards)]
            self._heartbeats[loop] = loop.create_task(self._heartbeat())
        return self._clients[loop]

    def _connect(self, module, shard: int = 0):
        """A client of ``module`` (``redis`` or ``redis.asyncio``) for shard ``shard``: its URL, its
        Sentinel-managed master, or its connection keywords, with the entry's other options."""
        options = {key: value for key, value in self.hosts[shard].items() if key not in LAYER_ONLY_OPTIONS}
        if "master_name" in options:
            sentinel = module.sentinel.Sentinel(options.pop("sentinels"), socket_timeout=2,
                                                sentinel_kwargs=options.pop("sentinel_kwargs", None))
            return sentinel.master_for(options.pop("master_name"), **options)
        address = options.pop("address", None)
        asyncio_client = module.__name__ == "redis.asyncio"
        options.update(redis_retry_once(asyncio_client=asyncio_client))
        if asyncio_client:
            # A burst of connects or disconnects (a restart: every client at once) waits for one of
            # a few connections instead of opening hundreds, or failing with "Too many connections".
            options.update(max_connections=POOL_SIZE, timeout=10)
            pool_class = module.BlockingConnectionPool
            pool = pool_class.from_url(address, **options) if address else pool_class(**options)
            return module.Redis(connection_pool=pool)
        return module.Redis.from_url(address, **options) if address else module.Redis(**options)

    async def _write(self, connection: Connection) -> None:
        def queue(pipe) -> None:
            pipe.set(self.conn_key(connection.id), connection.to_json(), ex=int(self.ttl * 2))
            pipe.zadd(self.alive_key, {connection.id: time.time()})

        await self._pipelined(connection.id, queue)

    async def _pipelined(self, connection_id: str, queue) -> None:
        """Run the commands ``queue(pipe)`` adds, on the shard of ``connection_id``, together with
        every other write queued for that shard in this event-loop tick: one pipeline, one pooled
        connection. A deploy drops and reconnects every socket at once; one pipeline each waited
        for a connection of the pool, and past its timeout failed ("No connection available")."""
        loop = asyncio.get_running_loop()
        key = (loop, shard_index(connection_id, self.shards))
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = []
            task = loop.create_task(self._flush(key))
            self._flushing.add(task)  # held until done (the loop keeps only a weak reference)
            task.add_done_callback(self._flushing.discard)
        done = loop.create_future()
        batch.append((queue, done))
        await done

    async def _flush(self, key) -> None:
        await asyncio.sleep(0)  # the writes of this tick join the batch
        batch = self._batches.pop(key)
        try:
            async with self._loop_clients()[key[1]].pipeline(transaction=False) as pipe:
                for queue, _ in batch:
                    queue(pipe)
                await pipe.execute()
        except Exception as exc:
            outcome: Exception | None = exc
        else:
            outcome = None
        for _, done in batch:
            if not done.done():  # a caller that was cancelled meanwhile
                if outcome is None:
                    done.set_result(None)
                else:
                    done.set_exception(outcome)

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
        def queue(pipe) -> None:
            pipe.delete(self.conn_key(connection_id))
            pipe.zrem(self.alive_key, connection_id)

        try:
            await self._pipelined(connection_id, queue)
        except Exception as exc:
            logger.warning("presence remove failed: %s: %s", type(exc).__name__, exc)

    async def _heartbeat(self) -> None:
        """Refresh this process's connections; a dead process's entries expire after ``ttl``."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not self.local:
                continue
            by_shard: dict[int, list[str]] = {}
            for cid in self.local:
                by_shard.setdefault(shard_index(cid, self.shards), []).append(cid)
            # Concurrently: a shard that is down (waiting for a connection) delays no other.
            results = await asyncio.gather(*(self._refresh(shard, ids) for shard, ids in by_shard.items()),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, Exception):
                    logger.warning("presence heartbeat failed: %s: %s", type(result).__name__, result)

    async def _refresh(self, shard: int, ids: list[str]) -> None:
        """Refresh ``ids`` on their shard; write again the records it lost (a restart, empty)."""
        client = self._loop_clients()[shard]
        async with client.pipeline(transaction=False) as pipe:
            pipe.zadd(self.alive_key, {cid: time.time() for cid in ids})
            for cid in ids:
                pipe.expire(self.conn_key(cid), int(self.ttl * 2))
            kept = (await pipe.execute())[1:]
        lost = [self.local[cid] for cid, found in zip(ids, kept, strict=True) if not found and cid in self.local]
        if lost:
            async with client.pipeline(transaction=False) as pipe:
                for connection in lost:
                    pipe.set(self.conn_key(connection.id), connection.to_json(), ex=int(self.ttl * 2))
                await pipe.execute()

    def online(self) -> list[Connection]:
        """Every open connection on the shards that answer; raises only if none does."""
        import redis

        connections: list[Connection] = []
        failed: list[Exception] = []
        for shard in range(self.shards):
            try:
                connections += self._online(redis, shard)
            except redis.RedisError as exc:
                if self.shards == 1:
                    raise
                failed.append(exc)
                logger.warning("presence: shard %d of %d did not answer: %s: %s", shard + 1, self.shards,
                               type(exc).__name__, exc)
        if failed and len(failed) == self.shards:
            raise failed[0]
        return sorted(connections, key=lambda c: c.since)

    def _online(self, module, shard: int) -> list[Connection]:
        client = self._connect(module, shard)
        try:
            cutoff = time.time() - self.ttl
            client.zremrangebyscore(self.alive_key, "-inf", cutoff)
            ids = [i.decode() for i in client.zrange(self.alive_key, 0, -1)]
            values = client.mget([self.conn_key(i) for i in ids]) if ids else []
        finally:
            client.close()
        return [Connection.from_json(v) for v in values if v]


_backend: BasePresence | None = None


def get_presence() -> BasePresence:
    """The configured presence backend (one per process)."""
    global _backend
    if _backend is None:
        _backend = import_string(conf.settings.PRESENCE_BACKEND)()
    return _backend


def reset_presence(**kwargs) -> None:
    """Forget the backend, so a settings change takes effect."""
    global _backend
    _backend = None


setting_changed.connect(reset_presence)
