"""With --workers N: how a cache purge made through one worker's admin API reaches the others.

Each worker's cache is its own. The supervisor opens one unnamed file (`open_for_workers`), and
every worker inherits it (its number in SIDECAR_PURGE_LOG_FD). The worker that answers a purge
applies it, appends one line `{"route": ..., "prefix": ..., "pid": ...}` and sends SIGUSR1 to the
supervisor, which forwards it to every worker; each then reads the lines past its own offset and
applies the other workers' (the answering one skips its own: it applied it already, and applying
it again would drop what was stored since).

Why a log and not a signal alone: a signal carries no data, and two sent close together may arrive
as one; a worker that reads everything past its offset misses no purge. Why an inherited unnamed
file and not a path: nothing is left behind when the supervisor is killed, no temp cleaner can
remove it under long-running workers, and no other process can open it. A worker (re)started later
starts at the end of the file: its cache is empty, so the purges before it concern nothing it has.

The file grows by one line (about 60 bytes) per purge and lives as long as the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("sidecar.workers")

PURGE_LOG_FD = "SIDECAR_PURGE_LOG_FD"
# One purge's line. The admin listener's request line (8 KiB) keeps real ones far below this.
MAX_LINE = 64 * 1024
# Read at most this much per step, so a step is bounded; a longer backlog takes further steps.
READ_CHUNK = 1024 * 1024

Purge = tuple[str | None, str]  # route (None: every cached route), prefix


def open_for_workers() -> int:
    """In the supervisor: an unnamed append-only file for the workers to inherit (Popen pass_fds)."""
    fd, path = tempfile.mkstemp(prefix="sidecar-purges-")
    os.unlink(path)  # it lives on while a process holds it open
    # O_APPEND on the shared open file: every write lands whole at the end, whoever writes.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    return fd


class PurgeLog:
    """A worker's side of the log: append this worker's purges, read the others' since the last read."""

    def __init__(self, fd: int, pid: int | None = None) -> None:
        self._fd = fd
        self._pid = pid if pid is not None else os.getpid()
        self._offset = os.fstat(fd).st_size  # what came before concerns caches this worker never had

    @classmethod
    def inherited(cls) -> PurgeLog | None:
        """The log the supervisor handed down, or None when there is none (started without a supervisor)."""
        value = os.environ.get(PURGE_LOG_FD)
        if not value:
            return None
        try:
            return cls(int(value))
        except (ValueError, OSError):
            log.error("no purge log to share cache purges with the other workers", extra={"fd": value})
            return None

    def append(self, route: str | None, prefix: str) -> bool:
        """Log a purge this worker made, in one write (O_APPEND: one piece, after every other);
        False when it could not be logged (then the other workers will not apply it)."""
        line = json.dumps({"route": route, "prefix": prefix, "pid": self._pid}).encode() + b"\n"
        if len(line) > MAX_LINE:
            log.error("cache purge too long to pass to the other workers", extra={"bytes": len(line)})
            return False
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # the disk filled up mid-line: end it, so the next line stands alone
                os.write(self._fd, b"\n")
                raise OSError(f"wrote {written} of {len(line)} bytes")
        except OSError:
            log.exception("could not pass a cache purge to the other workers")
            return False
        return True

    def read(self) -> tuple[list[Purge], bool]:
        """The other workers' purges logged since the last read (at most READ_CHUNK of them), and
        whether there may be more to read now. A last line still being written waits for the next read."""
        chunk = os.pread(self._fd, READ_CHUNK, self._offset)
        more = len(chunk) == READ_CHUNK
        whole = chunk.rfind(b"\n") + 1
        if whole == 0:
            if more:  # a full chunk and no line end: nothing we wrote; skip it rather than stick here
                log.error("skipped a cache purge log chunk without a line end", extra={"offset": self._offset})
                self._offset += len(chunk)
            return [], more
        self._offset += whole
        purges = []
        for line in chunk[:whole].splitlines():
            entry = _parsed(line)
            if entry is None:
                log.error("skipped a malformed line of the cache purge log", extra={"line": line[:200]})
            elif entry[0] != self._pid:
                purges.append(entry[1])
        return purges, more


def _parsed(line: bytes) -> tuple[int, Purge] | None:
    """(the writer's pid, the purge) of one line, or None if it is not one."""
    try:
        entry: Any = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    route, prefix, pid = entry.get("route"), entry.get("prefix"), entry.get("pid")
    if not (isinstance(route, str) or route is None) or not isinstance(prefix, str) or not isinstance(pid, int):
        return None
    return pid, (route, prefix)


@contextlib.contextmanager
def following(purges: PurgeLog, apply: Callable[[str | None, str], dict[str, int]]) -> Iterator[None]:
    """While inside, on the running loop: each SIGUSR1 applies the purges the other workers logged.

    SIGUSR1's default action ends the process, so a worker starts with it blocked (the supervisor
    starts it so; the mask survives exec): one forwarded before this handler is in place waits,
    and arrives once it is unblocked here. On the way out it is blocked again before the handler
    goes, for the same reason."""
    loop = asyncio.get_running_loop()

    def catch_up() -> None:
        new, more = purges.read()
        for route, prefix in new:
            purged = apply(route, prefix)
            log.info("cache purge from another worker applied", extra={"route": route, "prefix": prefix,
                                                                       "purged": purged})
        if more:
            loop.call_soon(catch_up)  # a long backlog: one bounded step at a time, requests in between

    loop.add_signal_handler(signal.SIGUSR1, catch_up)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        loop.remove_signal_handler(signal.SIGUSR1)
