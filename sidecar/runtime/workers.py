"""`sidecar run --workers N`: N worker processes sharing the listening ports (SO_REUSEPORT).

The supervisor starts each worker as a fresh interpreter, restarts one that dies,
forwards SIGTERM/SIGINT (drain and stop), SIGHUP (reload) and SIGUSR1 (apply new cache
purges) to all of them, and exits once they have all stopped after a stop signal. A worker
sends it SIGHUP after a reload through its admin API, and SIGUSR1 after a cache purge
(written to the purge log the supervisor hands down, runtime/purge_log.py), so both reach
every worker within milliseconds.

Metrics add up across workers through prometheus-client's multiprocess mode: every
worker writes its samples to files in one PROMETHEUS_MULTIPROC_DIR, and whichever worker
answers /metrics sums them (counters and histograms add; in-flight gauges add over live
workers; breaker and ejection gauges carry a `pid` label, one series per worker). Breaker
state, budgets, limits, ejections and caches are per worker, and the admin API answers for
the worker that accepts the connection (a reload and a cache purge are then passed on).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType
from typing import TYPE_CHECKING

from sidecar.runtime.purge_log import PURGE_LOG_FD, PurgeLog, following, open_for_workers

if TYPE_CHECKING:
    from sidecar.runtime.sidecar import Sidecar

log = logging.getLogger("sidecar.workers")

POLL_SECONDS = 0.1
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RESTART_WINDOW_SECONDS = 60.0
MAX_RESTARTS_PER_WINDOW = 10  # a worker that keeps dying is a bug or a bad host: give up loudly


def supervise(config_path: str, workers: int, loop: str, watch: float | None) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
    purge_log = open_for_workers()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, PURGE_LOG_FD: str(purge_log)}
    command = [sys.executable, "-m", "sidecar", "run", "--config", config_path, "--loop", loop, "--worker"]
    if watch:
        command += ["--watch", str(watch)]
    signals: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)

    for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(forwarded, remember)
    # A signal also wakes the wait between two looks at the workers, so it is forwarded at once.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    previous_wakeup = signal.set_wakeup_fd(wake_write)

    processes = [_start(command, env, slot, purge_log) for slot in range(workers)]
    restarts: list[float] = []
    stopping = False
    try:
        while True:
            while signals:
                signum = signals.pop(0)
                stopping = stopping or signum in (signal.SIGTERM, signal.SIGINT)
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(signum)
            for slot, process in enumerate(processes):
                if process.poll() is None or stopping:
                    continue
                _mark_dead(process.pid, metrics_dir)
                log.error("worker died; restarting it", extra={"pid": process.pid, "code": process.returncode})
                now = time.monotonic()
                restarts = [moment for moment in restarts if now - moment < RESTART_WINDOW_SECONDS] + [now]
                if len(restarts) > MAX_RESTARTS_PER_WINDOW:
                    log.critical("workers keep dying; stopping", extra={"restarts": len(restarts)})
                    stopping = True
                    for other in processes:
                        if other.poll() is None:
                            other.terminate()
                    break
                processes[slot] = _start(command, env, slot, purge_log)
            if stopping and all(process.poll() is not None for process in processes):
                break
            select.select([wake_read], [], [], POLL_SECONDS)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 4096)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        signal.set_wakeup_fd(previous_wakeup)
        for fd in (wake_read, wake_write, purge_log):
            os.close(fd)
    failed = [process.returncode for process in processes if process.returncode not in (0, None)]
    return 1 if failed or len(restarts) > MAX_RESTARTS_PER_WINDOW else 0


# Signals the supervisor forwards whose default action would end a worker that has no handler
# for them yet (one still starting, say a restarted one): SIGUSR1 (purges) and SIGHUP (reloads).
HELD_UNTIL_HANDLED = frozenset({signal.SIGUSR1, signal.SIGHUP})


def _start(command: list[str], env: dict[str, str], slot: int, purge_log: int) -> subprocess.Popen[bytes]:
    # The worker starts with those blocked (a signal mask survives exec): one forwarded before it
    # has a handler waits instead of ending it. It unblocks each once it handles it
    # (purge_log.following, runtime/sidecar.serve_until_stopped).
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_UNTIL_HANDLED)
    try:
        process = subprocess.Popen(command, env=env, pass_fds=(purge_log,))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_UNTIL_HANDLED)
    log.info("worker started", extra={"pid": process.pid, "slot": slot})
    return process


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the shared metrics files."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
    except OSError:
        log.exception("could not clear a dead worker's gauges", extra={"pid": pid})


async def serve_as_worker(sidecar: Sidecar, stop: asyncio.Event, watch: float | None) -> None:
    """serve_until_stopped in a worker: it stops with the supervisor, a reload or a cache purge
    through its admin API reaches the other workers through the supervisor, and theirs reach it."""
    from sidecar.runtime.sidecar import serve_until_stopped  # not in the supervisor, which needs none of it

    stop_with_supervisor()
    supervisor = os.getppid()
    sidecar.on_reloaded = lambda: _signal(supervisor, signal.SIGHUP)
    purges = PurgeLog.inherited()
    if purges is None:  # `--worker` without a supervisor's purge log: nothing to share purges with
        await serve_until_stopped(sidecar, stop, watch)
        return

    def purged(route: str | None, prefix: str) -> None:
        assert purges is not None
        if purges.append(route, prefix):
            _signal(supervisor, signal.SIGUSR1)

    sidecar.on_purged = purged
    with following(purges, sidecar.purge_cache):
        await serve_until_stopped(sidecar, stop, watch)


def _signal(supervisor: int, signum: int) -> None:
    """Signal the supervisor, unless it is gone: this worker's parent is then init or a subreaper,
    for which SIGHUP or SIGUSR1 means something else (this worker is stopping anyway)."""
    if os.getppid() != supervisor:
        log.warning("the supervisor is gone; the other workers are not told", extra={"signal": signum})
        return
    os.kill(supervisor, signum)


def stop_with_supervisor() -> None:
    """In a worker: get SIGTERM (and so drain) if the supervisor dies, even by SIGKILL (Linux only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the supervisor on this platform")
