"""``daemon.metrics_file``: the metrics written periodically for node_exporter's textfile collector.

node_exporter reads every ``*.prom`` file of its directory at each scrape, in
the Prometheus text format 0.0.4 (it parses no OpenMetrics). A file read while
it is being written would be half a file, so each version is written to a
temporary file in the same directory (a rename is atomic only within one file
system), then renamed over the last: a reader sees the old file or the new
one, whole. The temporary name starts with a dot and does not end in
``.prom``, so the collector never reads it.

The settings are read afresh for each write: a reload that sets, changes or
removes the file (or its interval) takes effect at once, the next write
going to the new path. A write that fails is logged, at most once per
``ERROR_LOG_INTERVAL`` with a count of the failures not logged, and never
stops the daemon; the next interval tries again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import structlog
import trio

log = structlog.get_logger("ipad")

#: At most one log record per this many seconds about failing writes.
ERROR_LOG_INTERVAL = 300.0


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``, in one rename: readers never see half of it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with open(fd, "w", encoding="utf-8") as file:  # noqa: PTH123 - we opened the fd
            file.write(text)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class MetricsFile:
    """The task that writes the metrics file while one is configured."""

    def __init__(
        self, settings: Callable[[], tuple[Path | None, float]], render: Callable[[], str]
    ) -> None:
        #: The configured file (None: none) and interval, read before every write.
        self.settings = settings
        self.render = render
        self.writes = 0
        self.failures = 0
        self._unlogged = 0
        self._logged_at: float | None = None
        self._changed = trio.Event()

    def reconfigure(self) -> None:
        """The configuration was reloaded: write now, with the new settings."""
        self._changed.set()

    async def run(self) -> None:
        """Write the file every interval, for ever (cancel to stop)."""
        while True:
            self._changed = trio.Event()  # before the write: a reload during it is not missed
            path, interval = self.settings()
            if path is not None:
                await self.write(path)
            with trio.move_on_after(interval):
                await self._changed.wait()

    async def write(self, path: Path) -> bool:
        """Write the metrics to ``path`` now; False (logged, rate-limited) if that failed."""
        text = self.render()
        try:
            # Abandoned if cancelled: a write stuck on a dead file system never holds up a stop.
            await trio.to_thread.run_sync(write_atomically, path, text, abandon_on_cancel=True)
        except OSError as exc:
            self.failures += 1
            self._log_failure(path, exc)
            return False
        self.writes += 1
        return True

    def _log_failure(self, path: Path, exc: OSError) -> None:
        now = trio.current_time()
        if self._logged_at is not None and now - self._logged_at < ERROR_LOG_INTERVAL:
            self._unlogged += 1
            return
        log.error("metrics.write_failed", path=str(path), error=exc.strerror or str(exc),
                  suppressed=self._unlogged)  # fmt: skip
        self._logged_at, self._unlogged = now, 0
