"""`sidecar run --workers N`: N worker processes sharing the listening ports (SO_REUSEPORT).

The supervisor starts each worker as a fresh interpreter, restarts one that dies,
forwards SIGTERM/SIGINT (drain and stop) and SIGHUP (reload) to all of them, and exits
once they have all stopped after a stop signal.

Metrics add up across workers through prometheus-client's multiprocess mode: every
worker writes its samples to files in one PROMETHEUS_MULTIPROC_DIR, and whichever worker
answers /metrics sums them (counters and histograms add; in-flight gauges add over live
workers; breaker and ejection gauges carry a `pid` label, one series per worker). Breaker
state, budgets, limits and ejections are per worker, and the admin API answers for the
worker that accepts the connection.
"""

from __future__ import annotations

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

log = logging.getLogger("sidecar.workers")

POLL_SECONDS = 0.1
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RESTART_WINDOW_SECONDS = 60.0
MAX_RESTARTS_PER_WINDOW = 10  # a worker that keeps dying is a bug or a bad host: give up loudly


def supervise(config_path: str, workers: int, loop: str, watch: float | None) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = [sys.executable, "-m", "sidecar", "run", "--config", config_path, "--loop", loop, "--worker"]
    if watch:
        command += ["--watch", str(watch)]
    signals: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)

    for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(forwarded, remember)
    # A signal also wakes the wait between two looks at the workers, so it is forwarded at once.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    previous_wakeup = signal.set_wakeup_fd(wake_write)

    processes = [_start(command, env, slot) for slot in range(workers)]
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
                processes[slot] = _start(command, env, slot)
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
        for fd in (wake_read, wake_write):
            os.close(fd)
    failed = [process.returncode for process in processes if process.returncode not in (0, None)]
    return 1 if failed or len(restarts) > MAX_RESTARTS_PER_WINDOW else 0


def _start(command: list[str], env: dict[str, str], slot: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, env=env)
    log.info("worker started", extra={"pid": process.pid, "slot": slot})
    return process


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the shared metrics files."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
    except OSError:
        log.exception("could not clear a dead worker's gauges", extra={"pid": pid})


def stop_with_supervisor() -> None:
    """In a worker: get SIGTERM (and so drain) if the supervisor dies, even by SIGKILL (Linux only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the supervisor on this platform")
