"""One log line per kind of failure, not one per failed call: an outage is a line, not a storm."""

import logging
import time


class OutageLog:
    """Log the first failure of each kind, then at most one summary line per ``interval`` seconds
    (at ``level``: ERROR unless the caller is only reporting a failure logged elsewhere)."""

    def __init__(self, logger: logging.Logger, *, interval: float = 30.0, level: int = logging.ERROR):
        self.logger = logger
        self.interval = interval
        self.level = level
        self.seen: dict[str, tuple[float, int]] = {}

    def failure(self, what: str, exc: BaseException) -> None:
        kind = f"{what}: {type(exc).__name__}"
        now = time.monotonic()
        last, suppressed = self.seen.get(kind, (0.0, 0))
        if now - last >= self.interval:
            extra = f" ({suppressed} more since the last report)" if suppressed else ""
            self.logger.log(self.level, "%s: %s%s", kind, exc, extra)
            self.seen[kind] = (now, 0)
        else:
            self.seen[kind] = (last, suppressed + 1)

    def recovered(self, what: str) -> None:
        """Forget the failures of ``what`` and say it works again (if it had failed)."""
        kinds = [k for k in self.seen if k.startswith(f"{what}: ")]
        for kind in kinds:
            del self.seen[kind]
        if kinds:
            self.logger.warning("%s: working again", what)
