"""Child processes, CPU pinning and /proc accounting for bench.py.

Everything here is Linux-only and reads /proc directly: no psutil, so the bench needs nothing beyond the
sidecar's own dependencies.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

STOP_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class BenchError(Exception):
    """Setup failed (a server did not start, a tool crashed): no numbers to show."""


# --- child processes -------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child between fork and exec. If the bench is SIGKILLed its `finally` never runs; with
    PDEATHSIG the kernel still kills the child, so no server outlives the bench. (Only the direct child:
    `sidecar run --workers N` workers are grandchildren and only go with the normal teardown's killpg.)"""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """Owns every child. Each runs in its own session (= process group), so one killpg also takes down what
    it forked (nginx's worker, the sidecar's workers). A context manager, so cleanup happens on any way out
    of the `with`."""

    def __init__(self, logdir: Path, cwd: Path) -> None:
        self.logdir = logdir
        self.cwd = cwd
        self._children: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for proc in reversed(self._children):
            stop_process(proc)

    def log_path(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def start_server(self, name: str, argv: Sequence[str], stdout: Path | None = None,
                     env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """stderr (and stdout, unless `stdout` names another file) goes to `<name>.log`. Files, not pipes: a
        pipe nobody drains fills up and blocks the server mid-run. `env` is added to ours; `cwd` defaults to
        the bench's."""
        with contextlib.ExitStack() as files:
            log = files.enter_context(open(self.log_path(name), "wb"))
            out = files.enter_context(open(stdout, "wb")) if stdout else log
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=log,
                                    env={**os.environ, **(env or {})},
                                    cwd=cwd or self.cwd, start_new_session=True, preexec_fn=_die_with_parent)
        self._children.append(proc)
        return proc

    def run_tool(self, argv: Sequence[str], timeout: float) -> str:
        """Run a load generator to completion and return its stdout; raise if it fails or hangs."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=_die_with_parent)
        self._children.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{argv[0]} still running after {timeout:.0f}s: killed") from exc
        finally:
            stop_process(proc)
            self._children.remove(proc)
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
        return out.decode(errors="replace")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the group, give it STOP_TIMEOUT_S to exit cleanly, then SIGKILL whatever is left."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)
    # The leader may be gone while group members (nginx's worker) are not. The kernel keeps a pid reserved
    # while it is some group's id, so this cannot hit an unrelated process.
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


# --- CPU pinning -----------------------------------------------------------------------------------------


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """`1`, `0,1`, `0-3,6` (taskset -c syntax) -> sorted CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"not a CPU list: {text!r}")
        cpus.update(range(int(low), int(high or low) + 1))
    return tuple(sorted(cpus))


def cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(cpu) for cpu in cpus)


@dataclass(frozen=True)
class Pinning:
    """Which CPU the load side (upstream + load generator) gets and which CPUs the sidecar gets (and every other
    proxy the bench measures, so they compete on equal terms); None = not pinned. By default the sidecar has
    cores to itself, so its CPU cost is not blurred by the load generator competing for them: one core for one
    worker, every core but the load core for more."""

    load_cpu: int | None
    sidecar_cpus: tuple[int, ...] | None

    @classmethod
    def detect(cls, enabled: bool, workers: int, override: tuple[int, ...] | None) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if override is not None:
            if shutil.which("taskset") is None:
                raise BenchError("--sidecar-cpus needs taskset, which is not installed")
            if not set(override) <= set(cpus):
                raise BenchError(f"--sidecar-cpus {cpu_list(override)}: this process may only use {cpu_list(cpus)}")
            return cls(cpus[0] if len(cpus) >= 2 else None, override)
        if not enabled or shutil.which("taskset") is None or len(cpus) < 2:
            return cls(None, None)
        return cls(cpus[0], (cpus[1],) if workers == 1 else tuple(cpus[1:]))

    @staticmethod
    def prefix(cpus: int | Sequence[int] | None) -> list[str]:
        if cpus is None:
            return []
        return ["taskset", "-c", str(cpus) if isinstance(cpus, int) else cpu_list(cpus)]

    def describe(self) -> str:
        if self.sidecar_cpus is None:
            return "none"
        sidecar = f"proxies on CPU{'s' if len(self.sidecar_cpus) > 1 else ''} {cpu_list(self.sidecar_cpus)}"
        load = "upstream+loadgen not pinned" if self.load_cpu is None else f"upstream+loadgen on CPU {self.load_cpu}"
        return f"{load}, {sidecar} (taskset)"

    @property
    def sidecar_alone(self) -> bool:
        """The sidecar has its cores to itself (as far as the bench's own processes go)."""
        return self.sidecar_cpus is not None and self.load_cpu is not None and self.load_cpu not in self.sidecar_cpus

    def notes(self, workers: int) -> list[str]:
        """What the reader must know to interpret the sidecar's numbers under this placement."""
        found = []
        if self.sidecar_cpus is None:
            found.append("nothing is pinned: the sidecar, the upstream and the load generator share all CPUs")
            return found
        if workers > len(self.sidecar_cpus):
            cores = "1 core" if len(self.sidecar_cpus) == 1 else f"{len(self.sidecar_cpus)} cores"
            found.append(f"the {workers} sidecar workers share {cores} (CPU {cpu_list(self.sidecar_cpus)}): no core "
                         "is free for another worker, so extra workers add no CPU (--sidecar-cpus changes this)")
        if not self.sidecar_alone:
            found.append("the sidecar shares a core with the upstream and the load generator: they compete for "
                         "it, so throughput and CPU busy include that contention")
        return found


# --- /proc -----------------------------------------------------------------------------------------------


def machine_busy_pct(sample_s: float = 1.0) -> float:
    """Share of all CPUs busy over `sample_s` before we start, from /proc/stat. Anything else running on the
    box (a test suite, a build) competes with the servers and skews every number, so we say so."""

    def busy_total() -> tuple[int, int]:
        ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        return sum(ticks) - idle, sum(ticks)

    busy0, total0 = busy_total()
    time.sleep(sample_s)
    busy1, total1 = busy_total()
    return (busy1 - busy0) / (total1 - total0) * 100 if total1 > total0 else math.nan


def cpus_busy_seconds(cpus: Sequence[int] | None) -> float:
    """CPU seconds spent busy (not idle or iowait) so far on `cpus` (None: all), from /proc/stat. Around a
    run, minus the sidecar's own CPU, it shows whether something else ran on the sidecar's cores."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name == "cpu" if cpus is None else name.removeprefix("cpu") in {str(cpu) for cpu in cpus}:
            total += sum(int(n) for n in ticks) - int(ticks[3]) - int(ticks[4])
    return total / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on. Field 2 (comm) is in parentheses and may contain spaces:
    split after its closing one. So field N of proc(5) is at index N - 3."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/<pid>/task/*/children; if the kernel lacks that file, by walking
    /proc for processes whose parent (stat field 4) is `pid`."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        found = [int(child) for task in tasks for child in (task / "children").read_text().split()]
    except FileNotFoundError:
        if not Path(f"/proc/{pid}").exists():
            return []
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                if entry.name.isdigit() and int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (the supervisor and its workers), root first."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(children(pid))
    return tree


def cpu_seconds_by_pid(root: int) -> dict[int, float]:
    """CPU seconds per process of `root`'s tree: utime + stime (all threads) + cutime + cstime (children it
    has already reaped, e.g. a worker that died and was restarted). Each second is counted once: a live
    child is in its own entry, a reaped one in its parent's cutime/cstime."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in process_tree(root):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # exited since we listed it
            fields = _stat_fields(pid)
            found[pid] = sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks  # fields 14-17
    return found


def rss_mib(root: int) -> tuple[float, int]:
    """VmRSS summed over `root`'s tree, and how many processes that is. Pages shared between the
    processes (the interpreter, the imported modules) count once per process."""
    total, count = 0.0, 0
    for pid in process_tree(root):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024  # the kernel reports kB
                    count += 1
    return (total if count else math.nan), count


def listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1/[::]:`port`: with SO_REUSEPORT, one per sidecar worker."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port  # 0A = LISTEN
    return count
