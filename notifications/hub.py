"""The per-process hub: one channel-layer channel per server process, joined to the groups of the
streams its local sockets read, fanned out locally.

A stream's group (``u.<user id>``, ``t.<topic id>``, ``b``; ``notifications.streams``) has as
members the channels of the processes that have a local socket reading it, so a send reaches
only the processes where a recipient is connected. The hub receives each message once and
hands the same pre-encoded frame to the outbox of every local socket of the stream
(``notifications.outbox``). Its parts:

- ``Registry`` (``notifications.registry``): the local sockets and the streams each reads;
- ``Sequencer`` (``notifications.sequencer``): each stream's offsets in order, once, gaps and
  lost pushes read from the store;
- here: joining a stream's group when its first local socket comes (then reading its head),
  leaving it ``LEAVE_AFTER`` seconds after its last one went (a reconnecting client finds it
  still joined), renewing every membership well before channels-redis' ``group_expiry``, and
  every ``HUB_SYNC_INTERVAL`` comparing the heads of the streams it reads with what it
  delivered, and checking that no Redis shard has forgotten its memberships (a marker group
  per shard; a shard that restarted empty is found within one interval, and its groups are
  joined again).
"""

import asyncio
import logging
import time
import weakref

from channels_redis.core import RedisChannelLayer

from . import conf, metrics, protocol, selectors, socket_receipts, streams, transport
from .db import database_sync_to_async
from .layers import channel_layer
from .outage_log import OutageLog
from .outbox import Outbox
from .registry import Registry
from .sequencer import Sequencer

logger = logging.getLogger(__name__)
failures = OutageLog(logger)

# Seconds a stream stays joined after its last local socket went.
LEAVE_AFTER = 30.0
# Memberships are renewed when this fraction of channels-redis' group_expiry has passed.
RENEW_FRACTION = 0.25
MARKER_PREFIX = "hub-marker."
RENEW_BATCH = 1000  # groups per pipeline when renewing
_MESSAGE_KINDS = {"u": "user", "t": "topic", "b": "broadcast"}


class Hub:
    """This process's channel, its joined streams and its index of local sockets."""

    def __init__(self, layer):
        self.layer = layer
        self.channel: str | None = None
        self.epoch = ""
        self.registry = Registry()
        options = conf.settings
        self.sequencer = Sequencer(self._deliver, self._read, gap_wait=options.HUB_GAP_WAIT)
        self.sync_interval = options.HUB_SYNC_INTERVAL
        self.joining: dict[str, asyncio.Task] = {}  # a stream's join: group_add, then its head
        self.next_join: tuple[list[str], asyncio.Task] | None = None  # the batch still taking streams
        self.leaving: dict[str, asyncio.Task] = {}
        self.idle_since: dict[str, float] = {}  # joined streams with no local socket
        self.started: asyncio.Future | None = None
        self.tasks: list[asyncio.Task] = []
        self.healthy = True
        self.last_message_at = time.monotonic()
        self.last_renewal = time.monotonic()
        self.markers = shard_markers(layer)
        self.marked: set[int] = set()  # the shards this hub's marker was added on
        # (user id, stream) -> the last offset handed to a socket of the user, since the last flush.
        self.socket_marks: socket_receipts.Marks = {}
        self.receipts_interval = options.SOCKET_RECEIPTS_INTERVAL
        self.last_receipts = time.monotonic()

    # Lifecycle

    async def start(self) -> None:
        """Create this process's channel (once; concurrent callers wait for the first)."""
        if self.started is None:
            self.started = asyncio.get_running_loop().create_future()
            try:
                self.channel = await self.layer.new_channel()
                self.epoch = await database_sync_to_async(selectors.store_epoch)()
            except BaseException as exc:
                self.started.set_exception(exc)
                self.started.exception()  # retrieved: later callers re-raise it themselves
                self.started = None
                raise
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._receive()), loop.create_task(self._sync())]
            self.started.set_result(None)
        await self.started

    async def stop(self) -> None:
        """Leave every group and stop receiving (the process is shutting down)."""
        for task in self.tasks:
            task.cancel()
        try:
            await self.flush_receipts()
        except Exception as exc:  # shutting down: the records say less than was sent, never more
            logger.warning("hub could not write its socket receipts: %s: %s", type(exc).__name__, exc)
        if self.channel is not None:
            joined = [s for s in self.sequencer.streams if s not in self.leaving]
            joined += [self.markers[index] for index in self.marked]
            try:
                await transport.group_discard_many(self.layer, joined, self.channel)
            except Exception as exc:  # shutting down: they expire after group_expiry anyway
                logger.warning("hub could not leave its groups: %s: %s", type(exc).__name__, exc)

    # Local sockets

    async def register(self, outbox: Outbox) -> dict[str, int]:
        """Start delivering to ``outbox``; return, for each stream it reads, the offset it starts after.

        Live frames reach the outbox from this call on (hold them with ``outbox.holding``)."""
        self.registry.add(outbox)
        return await self._positions(outbox, outbox.streams())

    def unregister(self, outbox: Outbox) -> None:
        outbox.stop()
        for stream in self.registry.remove(outbox):
            self.idle_since[stream] = time.monotonic()

    async def follow(self, outbox: Outbox, topic_id: int, slug: str) -> int | None:
        """Route the topic to this socket; return the offset it starts after (None: already routed,
        or the socket is gone). The stream is joined first, then routed: the socket gets nothing
        of it before the caller hears the offset."""
        if topic_id in outbox.topics:
            return None
        stream = streams.topic_stream(topic_id)
        self.idle_since.pop(stream, None)
        if not self.sequencer.is_ready(stream):  # (a stream being left is not ready)
            await self._join([stream])
        if topic_id in outbox.topics or outbox not in self.registry.everyone:
            if not self.registry.readers(stream):
                self.idle_since.setdefault(stream, time.monotonic())  # left later, as any unused stream
            return None  # routed meanwhile, or the connection closed while the group was joined
        outbox.topics[topic_id] = slug
        self.registry.route(outbox, stream)
        return self.sequencer.position(stream)

    def unfollow(self, outbox: Outbox, topic_id: int) -> bool:
        if outbox.topics.pop(topic_id, None) is None:
            return False
        stream = streams.topic_stream(topic_id)
        if self.registry.unroute(outbox, stream):
            self.idle_since[stream] = time.monotonic()
        return True

    def position(self, stream: str, default: int) -> int:
        """The last offset of the stream handed to local sockets (``default`` if not read here)."""
        return self.sequencer.position(stream) if self.sequencer.is_ready(stream) else default

    def connection_count(self) -> int:
        return len(self.registry.everyone)

    def oldest_over_limit(self, user_id: int, limit: int) -> list[Outbox]:
        return self.registry.oldest_over_limit(user_id, limit)

    async def _positions(self, outbox: Outbox, wanted: list[str]) -> dict[str, int]:
        """The position of each stream for a socket just routed to it (joining the streams not joined)."""
        positions = {}
        waiting = []
        for stream in wanted:
            self.idle_since.pop(stream, None)
            if self.sequencer.is_ready(stream):  # (a stream being left is not ready)
                positions[stream] = self.sequencer.position(stream)  # before any await: nothing missed
            else:
                waiting.append(stream)
        if waiting:
            heads = await self._join(waiting)
            # The head read at the join: what arrived after it was handed to this socket (routed
            # before the join), so it starts there, not at the position after that hand-off.
            positions.update(heads)
        return positions

    # Joining and leaving groups

    async def _join(self, wanted: list[str]) -> dict[str, int]:
        """Join the streams' groups (once each, however many sockets ask), then read their heads;
        return the head of each (a stream that became ready meanwhile: its position)."""
        new = [s for s in wanted if s not in self.joining and not self.sequencer.is_ready(s)]
        if new:
            if self.next_join is None:  # the joins asked for in this tick go together
                batch: list[str] = []
                self.next_join = (batch, asyncio.get_running_loop().create_task(self._join_batch(batch)))
            batch, task = self.next_join
            batch.extend(new)
            for stream in new:
                self.sequencer.open(stream)  # keep what arrives from now on
                self.joining[stream] = task
        heads: dict[str, int] = {}
        for result in await asyncio.gather(*{self.joining[s] for s in wanted if s in self.joining}):
            heads.update(result)
        return {s: heads[s] if s in heads else self.sequencer.position(s) for s in wanted}

    async def _join_batch(self, batch: list[str]) -> dict[str, int]:
        """The streams asked for until the loop runs this task: one round of group_adds and one
        read of their heads for all (a burst of handshakes joins in batches, not one by one)."""
        self.next_join = None
        return await self._join_now(batch)

    async def _join_now(self, new: list[str]) -> dict[str, int]:
        try:
            await self._rejoin(new)
            # Every commit after this read is pushed after the group_add above: it arrives here.
            heads = await database_sync_to_async(streams.heads)(new)
            for stream in new:
                self.sequencer.ready(stream, heads[stream])
            return heads
        except BaseException:
            for stream in new:
                if not self.sequencer.is_ready(stream):
                    self.sequencer.close(stream)
            raise
        finally:
            for stream in new:
                self.joining.pop(stream, None)

    async def _rejoin(self, new: list[str]) -> None:
        leaving = [self.leaving[s] for s in new if s in self.leaving]
        if leaving:
            await asyncio.gather(*leaving, return_exceptions=True)  # in order: the discard, then this add
        groups = list(new)
        for stream in new:  # each shard's marker, before the first membership there
            index = self.layer.consistent_hash(stream) if self.markers else 0
            if self.markers and index not in self.marked:
                groups.insert(0, self.markers[index])
                self.marked.add(index)
        await transport.group_add_many(self.layer, groups, self.channel)

    def _leave_idle(self) -> None:
        """Leave, together (one pipeline per Redis host), every stream idle for ``LEAVE_AFTER``."""
        deadline = time.monotonic() - LEAVE_AFTER
        idle = [stream for stream, since in self.idle_since.items()
                if since <= deadline and not self.registry.readers(stream) and stream not in self.joining]
        if not idle:
            return
        task = asyncio.get_running_loop().create_task(self._discard(idle))
        for stream in idle:
            del self.idle_since[stream]
            self.sequencer.close(stream)
            self.leaving[stream] = task

    async def _discard(self, idle: list[str]) -> None:
        try:
            await transport.group_discard_many(self.layer, idle, self.channel)
        except Exception as exc:  # they expire after group_expiry anyway
            failures.failure("hub could not leave a group", exc)
        finally:
            me = asyncio.current_task()
            for stream in idle:
                if self.leaving.get(stream) is me:  # (not a later leave of the same stream)
                    del self.leaving[stream]

    async def _renew(self) -> None:
        """Add this channel to every joined group again, long before channels-redis forgets it
        (``group_expiry``), so a long-lived socket never silently stops receiving; a process
        that dies stops renewing, and its memberships expire."""
        markers = [self.markers[index] for index in sorted(self.marked)]
        joined = [s for s in self.sequencer.streams if s not in self.leaving]
        for start in range(0, len(joined) + len(markers), RENEW_BATCH):
            await transport.group_add_many(self.layer, (joined + markers)[start : start + RENEW_BATCH], self.channel)

    async def _check_memberships(self) -> None:
        """Join again the groups of a Redis shard that forgot this process (restarted empty, or
        flushed): nothing else tells a hub whose own channel lives on another shard, and until
        it joins again its sockets would get those streams only from the store, late. The
        marker group this hub keeps on each shard is the witness: one ZSCORE per shard."""
        for index, marker in enumerate(self.markers):
            if index not in self.marked:
                continue  # no membership there yet
            connection = self.layer.connection(index)
            if await connection.zscore(self.layer._group_key(marker), self.channel) is not None:
                continue
            lost = [s for s in self.sequencer.streams
                    if s not in self.leaving and self.layer.consistent_hash(s) == index]
            logger.warning("Redis shard %d forgot this process's group memberships (restarted empty?): "
                           "joining its %d stream group(s) again", index, len(lost))
            await transport.group_add_many(self.layer, [*lost, marker], self.channel)
            await self.check_streams(fill_all=True)  # what was pushed while this process was not a member

    # Receiving

    async def _receive(self) -> None:
        backoff = 0.1
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.failure("channel layer receive failed, retrying", exc)
                self.healthy = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                await self._resubscribe()
                continue
            backoff = 0.1
            self.last_message_at = time.monotonic()
            try:
                self.dispatch(message)
            except Exception:
                logger.exception("hub failed to dispatch a %s message", message.get("type"))

    async def _resubscribe(self) -> None:
        """After a channel-layer failure: join every group again, then read what was missed."""
        try:
            await self._renew()
        except Exception:
            return
        if not self.healthy:
            failures.recovered("channel layer receive failed, retrying")
            self.healthy = True
        await self.check_streams(fill_all=True)

    def dispatch(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "stream.notification":
            metrics.hub_message(_MESSAGE_KINDS.get(message["stream"][:1], "control"))
            self.sequencer.accept(message)
        elif kind == "stream.user":
            metrics.hub_message("control")
            self._to_user(message)
        elif kind == "stream.topic":
            metrics.hub_message("control")
            self._to_topic(message)
        else:
            logger.warning("hub ignored a message of type %r", kind)

    def _deliver(self, message: dict) -> None:
        stream, offset, frame = message["stream"], message["offset"], message["frame"]
        readers = self.registry.readers(stream)
        handed = list(readers)
        for outbox in handed:
            outbox.offer(stream, offset, frame)
        if self.receipts_interval:  # (each stream's offsets reach the hub in order: this is its greatest)
            self.socket_marks.update(dict.fromkeys([(outbox.user_id, stream) for outbox in handed], offset))
        metrics.delivered(len(readers), message.get("t"), time.time())  # one call per notification

    def _to_user(self, message: dict) -> None:
        readers = self.registry.of_user(message["user"])
        metrics.user_event(len(readers))
        for outbox in list(readers):
            outbox.consumer.stream_user_event(outbox, message)

    def _to_topic(self, message: dict) -> None:
        """A topic was renamed or deleted: every local socket it is routed to applies the change."""
        for outbox in list(self.registry.readers(streams.topic_stream(message["topic_id"]))):
            outbox.consumer.stream_topic_event(outbox, message)

    async def _read(self, stream: str, first: int, last: int) -> list[dict]:
        return await database_sync_to_async(selectors.stream_messages)(stream, first, last)

    # The periodic check

    async def _sync(self) -> None:
        """Every ``sync_interval``: compare the heads of the joined streams with what was delivered
        (finding lost pushes, and a replaced store), leave idle streams, renew memberships."""
        renew_every = float(getattr(self.layer, "group_expiry", 86400)) * RENEW_FRACTION
        while True:
            await asyncio.sleep(self.sync_interval)
            self._leave_idle()
            try:
                if time.monotonic() - self.last_renewal >= renew_every:
                    await self._renew()
                    self.last_renewal = time.monotonic()
                await self._check_memberships()
                await self.check_streams()
                if self.receipts_interval and time.monotonic() - self.last_receipts >= self.receipts_interval:
                    await self.flush_receipts()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.failure("hub sync with the store failed", exc)
                continue
            failures.recovered("hub sync with the store failed")

    def note_replayed(self, user_id: int, stream: str, offset: int) -> None:
        """A resume handed ``offset`` of ``stream`` to a socket of ``user_id`` (``socket_receipts``)."""
        if self.receipts_interval:
            socket_receipts.note(self.socket_marks, user_id, stream, offset)

    async def flush_receipts(self) -> None:
        """Write the socket receipts noted since the last flush (``socket_receipts``)."""
        marks, self.socket_marks = self.socket_marks, {}
        self.last_receipts = time.monotonic()
        if marks:
            await database_sync_to_async(socket_receipts.flush)(marks)

    async def check_streams(self, *, fill_all: bool = False) -> None:
        """Read the heads of the ready streams (after taking their positions) and act on them."""
        before = {s: self.sequencer.position(s) for s in self.sequencer.streams if self.sequencer.is_ready(s)}
        epoch, heads = await database_sync_to_async(selectors.store_heads)(list(before))
        if self.epoch and epoch != self.epoch:
            self.reset(epoch, heads)
            return
        self.epoch = epoch
        for stream, delivered in before.items():
            if not self.sequencer.is_ready(stream):
                continue  # left meanwhile
            verdict = self.sequencer.check(stream, heads[stream], delivered)
            if verdict == "reset":
                self.reset(epoch, heads)
                return
            if verdict == "lost":
                # Lost on the way: perhaps the group's Redis (shard) restarted empty and forgot this
                # process; join again (it is idempotent), so what follows arrives live again.
                await self.layer.group_add(stream, self.channel)
            if verdict == "lost" or (fill_all and heads[stream] > self.sequencer.position(stream)):
                await self.sequencer.fill(stream, heads[stream])

    def reset(self, epoch: str, heads: dict[str, int]) -> None:
        """The store was replaced or went back (a restore, a failover that lost commits): cursors
        no longer match it. Continue each stream after its head and close every local connection
        (4012) so each client reconnects and resumes (and learns that it must reload)."""
        logger.warning("the notification store was reset (epoch %s -> %s); closing %d connection(s)",
                       self.epoch, epoch, len(self.registry.everyone))
        self.epoch = epoch
        self.sequencer.restart(heads)
        for outbox in list(self.registry.everyone):
            outbox.consumer.queue_close(protocol.CLOSE_STREAM_RESET, "stream reset: reconnect and resume")


def shard_markers(layer) -> list[str]:
    """For channels-redis' core layer, one group name per Redis host that hashes to that host
    (``Hub._check_memberships``); none for other layers."""
    if not isinstance(layer, RedisChannelLayer):
        return []
    markers: list[str] = []
    for index in range(layer.ring_size):
        k = 0
        while layer.consistent_hash(f"{MARKER_PREFIX}{k}") != index:
            k += 1
        markers.append(f"{MARKER_PREFIX}{k}")
    return markers


_hubs: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub]" = weakref.WeakKeyDictionary()


async def get_hub() -> Hub:
    """This event loop's hub, started."""
    loop = asyncio.get_running_loop()
    layer = channel_layer()
    hub = _hubs.get(loop)
    if hub is None or hub.layer is not layer:
        if hub is not None:
            for task in hub.tasks:
                task.cancel()
        hub = _hubs[loop] = Hub(layer)
    await hub.start()
    return hub


async def shutdown_hubs() -> None:
    """Stop this process's hubs (on ASGI lifespan shutdown)."""
    for hub in list(_hubs.values()):
        await hub.stop()
    _hubs.clear()
