"""Per-stream ordering: each stream's notifications are handed on in offset order, each once.

Offsets are gap-free and committed in order within a stream (``notifications.streams``), so
for every stream a process reads the sequencer knows which offset comes next:

- a message with the next offset is delivered at once;
- a message that arrives early waits; if the missing offsets have not arrived after
  ``HUB_GAP_WAIT`` they are read from the store and delivered in order;
- a message already delivered (read from the store first, then arriving late) is dropped;
- ``check`` compares a stream's committed head with what was delivered: a head seen at the
  previous check and still not delivered was lost on the way (read from the store); a head
  below what was delivered means the store was replaced.

A stream that is being joined (its group joined, its head not read yet) keeps what arrives
until ``ready(stream, head)``: everything after ``head`` is then delivered.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import metrics
from .outage_log import OutageLog

logger = logging.getLogger(__name__)
failures = OutageLog(logger)
STORE_FAILED = "hub could not read missed notifications from the store"


@dataclass
class StreamState:
    next: int | None = None  # the next offset to deliver; None while the head is not known
    pending: dict[int, dict] = field(default_factory=dict)
    seen_head: int | None = None  # a head seen at the last check and not delivered then
    gap_timer: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sequencer:
    """``deliver(message)`` is called for each message in order; ``read(stream, first, last)`` reads
    the store (async) and returns the messages of offsets ``first..last`` that exist."""

    def __init__(self, deliver: Callable[[dict], None],
                 read: Callable[[str, int, int], Awaitable[list[dict]]], *, gap_wait: float):
        self.deliver = deliver
        self.read = read
        self.gap_wait = gap_wait
        self.streams: dict[str, StreamState] = {}

    def open(self, stream: str) -> None:
        """Start keeping the stream's messages (its head is not known yet)."""
        self.streams.setdefault(stream, StreamState())

    def ready(self, stream: str, head: int) -> None:
        """The stream's committed head, read after its group was joined: deliver what follows it."""
        state = self.streams.setdefault(stream, StreamState())
        if state.next is None:
            state.next = head + 1
            state.pending = {offset: m for offset, m in state.pending.items() if offset > head}
            self._drain(stream, state)

    def is_ready(self, stream: str) -> bool:
        state = self.streams.get(stream)
        return state is not None and state.next is not None

    def position(self, stream: str) -> int:
        """The last offset delivered in the stream (a ready stream)."""
        return self.streams[stream].next - 1  # type: ignore[operator]

    def close(self, stream: str) -> None:
        state = self.streams.pop(stream, None)
        if state is not None and state.gap_timer is not None:
            state.gap_timer.cancel()

    def restart(self, heads: dict[str, int]) -> None:
        """The store was replaced: forget what was pending and continue each stream after its new head."""
        for stream, state in self.streams.items():
            if state.next is None:
                continue  # still joining: its head is read after the join
            if state.gap_timer is not None:
                state.gap_timer.cancel()
            self.streams[stream] = StreamState(next=heads.get(stream, 0) + 1)

    def accept(self, message: dict) -> None:
        stream, offset = message["stream"], message["offset"]
        state = self.streams.get(stream)
        if state is None or (state.next is not None and offset < state.next):
            return  # not read here (any more), or already delivered
        state.pending[offset] = message
        if state.next is None:
            return
        self._drain(stream, state)
        if state.pending and state.gap_timer is None:
            loop = asyncio.get_running_loop()
            state.gap_timer = loop.call_later(self.gap_wait, lambda: loop.create_task(self._fill_gap(stream)))

    def _drain(self, stream: str, state: StreamState) -> None:
        while state.next in state.pending:
            self.deliver(state.pending.pop(state.next))
            state.next += 1

    async def _fill_gap(self, stream: str) -> None:
        state = self.streams.get(stream)
        if state is None:
            return
        state.gap_timer = None
        if state.pending:
            await self.fill(stream, max(state.pending) - 1)

    def check(self, stream: str, head: int, delivered_before: int) -> str:
        """Compare the stream's committed head, read after ``delivered_before = position(stream)``
        was taken, with what was delivered: ``"ok"``, ``"lost"`` (a head seen at the previous check
        is still not delivered: call ``fill``) or ``"reset"`` (the head is below what had been
        delivered: the store was replaced). Messages delivered while the head was read may be
        newer than it, hence the position from before the read."""
        state = self.streams.get(stream)
        if state is None or state.next is None:
            return "ok"
        if head < delivered_before:
            return "reset"
        lost = state.seen_head is not None and state.seen_head >= state.next
        state.seen_head = head if head >= state.next else None
        return "lost" if lost else "ok"

    async def fill(self, stream: str, through: int) -> None:
        """Deliver, in order, the offsets up to ``through`` that never arrived, read from the store.

        If the store cannot be read, nothing is skipped: the next check or gap tries again."""
        state = self.streams.get(stream)
        if state is None:
            return
        async with state.lock:
            if state.next is None or through < state.next:
                return
            first = state.next
            try:
                rows = await self.read(stream, first, through)
            except Exception as exc:
                failures.failure(STORE_FAILED, exc)
                return
            failures.recovered(STORE_FAILED)
            if self.streams.get(stream) is not state or state.next is None:
                return  # closed or restarted meanwhile
            logger.info("hub read %d notification(s) of %s %d..%d from the store", len(rows), stream, first, through)
            metrics.store_read(len(rows))
            for message in rows:
                if message["offset"] >= state.next:
                    state.pending.setdefault(message["offset"], message)
            # Offsets with no row were deleted (a user or topic deleted with its notifications): skip them.
            while state.next <= through:
                if state.next in state.pending:
                    self.deliver(state.pending.pop(state.next))
                state.next += 1
            self._drain(stream, state)
