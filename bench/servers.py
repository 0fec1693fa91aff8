"""The servers bench.py measures: the fast upstream (nginx, or fast_upstream.py), the sidecar and the naive
proxy, plus ports, readiness checks and log scanning shared with peers.py.

Every server listens on 127.0.0.1 only, runs under `Processes` (killed on any way out), and must answer
within READY_TIMEOUT_S of starting.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import importlib.util
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from procs import BenchError, Pinning, Processes, listening_sockets

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
READY_TIMEOUT_S = 10.0
# nginx's config parser rejects a token longer than its 4 KiB read buffer, so `return 200 "<body>"` only works
# for small bodies; larger ones are served from a file (see nginx_upstream_conf).
MAX_INLINE_BODY = 2048
# The bench's sidecar config sets these so that teardown takes a moment, not the default 5 s drain.
SHUTDOWN_CONFIG = "{drain_delay: 0s, timeout: 2s}"
# Lines of a Python proxy's stderr that mean something went wrong under load.
PYTHON_PROBLEMS = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


def progress(message: str) -> None:
    # stderr, so that `--json` leaves stdout machine-readable.
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Server:
    """One target of the benchmark: the upstream measured directly, or a proxy in front of it."""

    name: str  # the key in the report: direct, sidecar, sidecar-2w, naive, nginx, haproxy
    label: str  # what it is, for the table
    url: str
    proc: subprocess.Popen[bytes] | None = None  # whose process tree's CPU and RSS are measured; None: direct
    log: Path | None = None  # its process log, scanned for `problems` after the run
    problems: re.Pattern[str] | None = None
    processes: int = 1  # processes expected alive under `proc` at the end (a supervisor's workers)


# --- ports and readiness ---------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports. The sockets are held open together so that the kernel cannot
    hand out the same port twice; a small race remains (someone may bind one before our server does)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    """Status and body, or None when nothing answered (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return None


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Poll `url` until it answers 200: bounded by READY_TIMEOUT_S, and fails fast if the process died."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} while starting:\n{log_tail(log)}")
        answer = http_get(url, timeout=0.5)
        if answer is not None and answer[0] == 200:
            return
        time.sleep(0.05)
    raise BenchError(f"{what} not ready at {url} after {READY_TIMEOUT_S:.0f}s:\n{log_tail(log)}")


def check_response(url: str, what: str, body_size: int) -> None:
    """One request before measuring: a 200 with the expected body, so we benchmark the path we think we do."""
    answer = http_get(url, timeout=2.0)
    if answer is None or answer[0] != 200 or len(answer[1]) != body_size:
        got = "no answer" if answer is None else f"status {answer[0]}, {len(answer[1])} body bytes"
        raise BenchError(f"{what} at {url}: expected 200 with {body_size} body bytes, got {got}")


def log_problems(server: Server, limit: int = 10) -> list[str]:
    """Lines of the server's log that match its problem pattern: under load there should be none."""
    if server.log is None or server.problems is None or not server.log.exists():
        return []
    pattern = server.problems
    return [line for line in server.log.read_text(errors="replace").splitlines() if pattern.search(line)][:limit]


def binary_version(argv: list[str], pattern: str, name: str) -> str:
    """`<name> <version>` from the output of `argv` (e.g. `nginx -v`), or just `name`."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return name
    match = re.search(pattern, out.stderr + out.stdout)
    return f"{name} {match.group(1)}" if match else name


# --- the upstream ----------------------------------------------------------------------------------------


def nginx_common(tmp: Path, name: str, worker_connections: int) -> str:
    """The part of an nginx config every nginx in the bench shares: one worker, no daemon, every path in the
    temp dir (so nginx needs nothing from /var and leaves nothing behind), no access log, and keep-alive
    connections that last the whole run (nginx's default keepalive_requests of 1000 would close wrk's
    connections mid-run and measure reconnects)."""
    return f"""daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {2 * worker_connections + 64};
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp}/{name}-client_body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
"""


def nginx_upstream_conf(tmp: Path, port: int, body_size: int) -> str:
    # Up to MAX_INLINE_BODY bytes: `return 200` from memory, the cheapest answer nginx has. Above: a static file
    # (try_files keeps the URL `/`; the page cache and sendfile make it nearly as cheap).
    if body_size <= MAX_INLINE_BODY:
        location = f'default_type text/plain;\n            return 200 "{"x" * body_size}";'
    else:
        (tmp / "www").mkdir(exist_ok=True)
        (tmp / "www" / "body.txt").write_bytes(b"x" * body_size)
        # Started as root, nginx's worker runs as `nobody`: let it through the private temp dir (search only, no
        # listing) to the file.
        tmp.chmod(0o711)
        (tmp / "www").chmod(0o755)
        (tmp / "www" / "body.txt").chmod(0o644)
        # The file stays open (open_file_cache) and goes out with sendfile: no open/stat/read per request.
        location = (f"root {tmp}/www;\n            default_type text/plain;\n            sendfile on;\n"
                    "            open_file_cache max=16 inactive=600s;\n            open_file_cache_valid 600s;\n"
                    "            try_files /body.txt =404;")
    # 4096 connections: every proxy keeps its own pool of upstream connections open for the whole run.
    return nginx_common(tmp, "upstream", 4096) + f"""    server {{
        listen 127.0.0.1:{port};
        location / {{
            {location}
        }}
    }}
}}
"""


def nginx_argv(binary: str, tmp: Path, name: str, conf: str) -> list[str]:
    path = tmp / f"{name}.conf"
    path.write_text(conf)
    # -e: nginx opens its compiled-in error log before reading the config; point that at the temp dir too.
    return [binary, "-p", str(tmp), "-c", str(path), "-e", str(tmp / f"{name}-error.log")]


def nginx_version(binary: str) -> str:
    return binary_version([binary, "-v"], r"nginx/(\S+)", "nginx")


def start_upstream(kind: str, procs: Processes, port: int, pin: Pinning, body_size: int) -> Server:
    """Start the fast upstream on `port`, pinned to the load CPU, and check it answers with `body_size` bytes."""
    nginx = shutil.which("nginx")
    if kind == "nginx" and nginx is None:
        raise BenchError("--upstream nginx: no nginx binary on PATH (apt-get install -y nginx)")
    if kind != "aiohttp" and nginx is not None:
        argv = nginx_argv(nginx, procs.logdir, "upstream", nginx_upstream_conf(procs.logdir, port, body_size))
        how = "return 200" if body_size <= MAX_INLINE_BODY else "static file"
        label = f"{nginx_version(nginx)} (1 worker, {how})"
    else:
        argv = [sys.executable, str(HERE / "fast_upstream.py"), str(port), "--body-size", str(body_size)]
        label = "aiohttp" + ("+uvloop" if importlib.util.find_spec("uvloop") else "") + " (1 process)"
    proc = procs.start_server("upstream", Pinning.prefix(pin.load_cpu) + argv)
    url = f"http://127.0.0.1:{port}/"
    wait_ready(url, proc, "upstream", procs.log_path("upstream"))
    check_response(url, "upstream", body_size)
    return Server("direct", label, url)


# --- the sidecar and the naive proxy ---------------------------------------------------------------------


def sidecar_config(port: int, admin_port: int, upstream_port: int, args: argparse.Namespace) -> str:
    # --retries on leaves the route's retry policy at the built-in defaults (attempts 2); off sets attempts 1,
    # which the sidecar treats as a passthrough.
    retries = "" if args.retries == "on" else "    retries: {attempts: 1}\n"
    return f"""listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin_port}}}
log: {{access: {"true" if args.access_log == "on" else "false"}}}
shutdown: {SHUTDOWN_CONFIG}
upstreams:
  up: {{endpoints: [http://127.0.0.1:{upstream_port}]}}
routes:
  - name: bench
    match: {{path_prefix: /}}
    upstream: up
{retries}"""


def access_log_path(procs: Processes, name: str) -> Path:
    return procs.logdir / f"{name}-access.log"


def access_log_lines(procs: Processes, name: str) -> int:
    path = access_log_path(procs, name)
    if not path.exists():
        return 0
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def image_environment() -> dict[str, str]:
    """GLIBC_TUNABLES as the Dockerfile sets it: the Python proxies (sidecar and naive alike) run with the
    image's malloc settings, so neither is measured with a setting the other lacks."""
    match = re.search(r"GLIBC_TUNABLES=(\S+)", (REPO / "Dockerfile").read_text())
    return {"GLIBC_TUNABLES": match.group(1)} if match else {}


def start_sidecar(
    name: str, workers: int, procs: Processes, upstream_port: int, args: argparse.Namespace, pin: Pinning,
    checkout: Path = REPO,
) -> Server:
    """Start the sidecar and wait for /readyz (and, with workers, until every worker listens). taskset execs,
    so the child's pid is the sidecar's own (with workers, the supervisor's; the workers are its children
    and inherit its CPU affinity). The access log (stdout) goes to a file of its own, so writing it costs
    what writing a container's stdout to disk costs, not a terminal's, and the process log stays readable.
    `checkout`: the source tree to run (pair.py runs another commit's beside this one)."""
    port, admin_port = free_ports(2)
    # Bytecode as `pip install` leaves it: an editable checkout (or PYTHONDONTWRITEBYTECODE=1) would
    # make the sidecar compile its sources at every start, about 0.6 MiB more idle RSS than deployed.
    compileall.compile_dir(checkout / "sidecar", quiet=1)
    progress(f"starting {name} on 127.0.0.1:{port} ({workers} worker(s), loop {args.loop}), waiting for /readyz")
    config = procs.logdir / f"{name}.yaml"
    config.write_text(sidecar_config(port, admin_port, upstream_port, args))
    argv = [sys.executable, "-m", "sidecar", "run", "--config", str(config), "--loop", args.loop]
    if workers > 1:
        argv += ["--workers", str(workers)]
    # `-m` puts the working directory first on sys.path: the sidecar package imported is the checkout's.
    proc = procs.start_server(name, Pinning.prefix(pin.sidecar_cpus) + argv, stdout=access_log_path(procs, name),
                              env=image_environment(), cwd=checkout)
    log = procs.log_path(name)
    wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc, name, log)
    # /readyz answers from whichever worker accepts the connection: wait until all of them have bound the port.
    deadline = time.monotonic() + READY_TIMEOUT_S
    while workers > 1 and listening_sockets(port) < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            listening = listening_sockets(port)
            raise BenchError(f"only {listening} of {workers} {name} workers listen on {port}:\n{log_tail(log)}")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/"
    check_response(url, name, args.body_size)
    shape = "1 process" if workers == 1 else f"{workers} workers + supervisor"
    return Server(name, f"sidecar ({shape}, {args.loop})", url, proc, log, PYTHON_PROBLEMS, workers)


def start_naive(procs: Processes, upstream_port: int, args: argparse.Namespace, pin: Pinning) -> Server:
    """Start naive_proxy.py, the reference baseline, pinned exactly like the sidecar and on the same loop. It has
    no admin port: ready when a request through it gets the upstream's 200."""
    (port,) = free_ports(1)
    progress(f"starting naive proxy on 127.0.0.1:{port} (loop {args.loop})")
    argv = [sys.executable, str(HERE / "naive_proxy.py"), str(port), f"http://127.0.0.1:{upstream_port}",
            "--loop", args.loop]
    proc = procs.start_server("naive", Pinning.prefix(pin.sidecar_cpus) + argv, env=image_environment())
    url = f"http://127.0.0.1:{port}/"
    wait_ready(url, proc, "naive proxy", procs.log_path("naive"))
    check_response(url, "naive proxy", args.body_size)
    return Server("naive", f"naive aiohttp proxy (1 process, {args.loop})", url, proc, procs.log_path("naive"),
                  PYTHON_PROBLEMS)


def code_version() -> str:
    """The commit the sidecar runs from, and whether sidecar/ has uncommitted edits: with an editable install,
    whatever is on disk when the sidecar starts is what gets measured."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "sidecar"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{commit}{' + uncommitted edits in sidecar/' if dirty else ''}"
