"""The registry of a process's local sockets: who is connected here, and which streams each reads.

Only an index: it says which outboxes a stream's notification goes to, which streams have local
sockets (the hub joins their groups), and which lost their last one (the hub leaves them).
"""

from .outbox import Outbox


class Registry:
    def __init__(self):
        self.everyone: set[Outbox] = set()
        self.by_user: dict[int, set[Outbox]] = {}
        self.by_stream: dict[str, set[Outbox]] = {}

    def add(self, outbox: Outbox) -> None:
        self.everyone.add(outbox)
        self.by_user.setdefault(outbox.user_id, set()).add(outbox)
        for stream in outbox.streams():
            self.by_stream.setdefault(stream, set()).add(outbox)

    def remove(self, outbox: Outbox) -> list[str]:
        """Forget the socket; return the streams it was the last local reader of."""
        self.everyone.discard(outbox)
        _discard(self.by_user, outbox.user_id, outbox)
        return [stream for stream in outbox.streams() if _discard(self.by_stream, stream, outbox)]

    def route(self, outbox: Outbox, stream: str) -> None:
        self.by_stream.setdefault(stream, set()).add(outbox)

    def unroute(self, outbox: Outbox, stream: str) -> bool:
        """Stop routing the stream to the socket; True if it was the stream's last local reader."""
        return _discard(self.by_stream, stream, outbox)

    def readers(self, stream: str) -> set[Outbox]:
        return self.by_stream.get(stream, set())

    def of_user(self, user_id: int) -> set[Outbox]:
        return self.by_user.get(user_id, set())

    def oldest_over_limit(self, user_id: int, limit: int) -> list[Outbox]:
        """The user's oldest local connections beyond ``limit`` (to be closed for the newest)."""
        mine = sorted(self.of_user(user_id), key=lambda outbox: outbox.opened_at)
        return mine[: max(0, len(mine) - limit)]


def _discard(index: dict, key, outbox: Outbox) -> bool:
    """Remove ``outbox`` from ``index[key]``; True if that emptied (and deleted) the entry."""
    members = index.get(key)
    if members is None:
        return False
    members.discard(outbox)
    if members:
        return False
    del index[key]
    return True
