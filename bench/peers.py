"""Proxy peers for bench.py: nginx and HAProxy as reverse proxies in front of the same upstream, one worker or
thread each, pinned like the sidecar, with keep-alive to the upstream. They show what a proxy written in C
costs on the same machine and path, which puts the sidecar's numbers in scale.

Each is optional: `--peers auto` measures those whose binary is installed and prints a notice for the others.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from procs import BenchError, Pinning, Processes
from servers import (
    Server,
    binary_version,
    check_response,
    free_ports,
    nginx_argv,
    nginx_common,
    nginx_version,
    progress,
    wait_ready,
)

PEERS = ("nginx", "haproxy")
INSTALL_HINT = "apt-get install -y nginx haproxy"
# nginx's error log at warn and above, and HAProxy's stderr: alerts and warnings.
NGINX_PROBLEMS = re.compile(r"\[(warn|error|crit|alert|emerg)\]")
HAPROXY_PROBLEMS = re.compile(r"\[(WARNING|ALERT|EMERG)\]")
# Idle upstream connections each peer keeps, as the issue asks (nginx `keepalive 64`): as many as wrk opens.
UPSTREAM_KEEPALIVE = 64


def peers_arg(text: str) -> tuple[str, ...] | None:
    """`auto` -> None (every installed peer); `none` -> (); `nginx,haproxy` -> those, each required."""
    if text == "auto":
        return None
    if text == "none":
        return ()
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    unknown = [name for name in names if name not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected auto, none or a list of {','.join(PEERS)}; got {text!r}")
    return names


def choose_peers(requested: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """The peers to run and a notice for each one skipped. Asked for by name but not installed is an error;
    under `auto` it is a notice."""
    chosen, notices = [], []
    for name in PEERS if requested is None else requested:
        if shutil.which(name) is not None:
            chosen.append(name)
        elif requested is None:
            notices.append(f"{name} proxy peer skipped: {name} is not installed ({INSTALL_HINT})")
        else:
            raise BenchError(f"--peers {name}: no {name} binary on PATH ({INSTALL_HINT})")
    return chosen, notices


def nginx_proxy_conf(tmp: Path, port: int, upstream_port: int, idle_connections: int) -> str:
    # proxy_http_version 1.1 and an empty Connection header keep upstream connections open; `keepalive` sets how
    # many idle ones the worker caches. Its keepalive_requests/timeout (60s, 1000 requests by default) are raised
    # like the upstream's own, so no connection is recycled mid-run. proxy_max_temp_file_size 0: a large body
    # that does not fit the buffers waits for the client instead of going to a temp file on disk.
    # Each client connection may need an upstream one too.
    connections = max(1024, 2 * idle_connections + 512)
    return nginx_common(tmp, "nginx-proxy", connections) + f"""    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def haproxy_conf(port: int, upstream_port: int, idle_connections: int) -> str:
    # One thread; `http-reuse always` shares idle upstream connections between client connections (the
    # closest to a pool). Timeouts long enough that no keep-alive connection is closed during a run.
    maxconn = max(4096, idle_connections + 1024)
    return f"""global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 10s
    timeout http-keep-alive 300s
    http-reuse always

frontend bench
    bind 127.0.0.1:{port}
    default_backend up

backend up
    server up 127.0.0.1:{upstream_port}
"""


def start_peer(
    name: str, procs: Processes, upstream_port: int, args: argparse.Namespace, pin: Pinning
) -> Server:
    """Start one peer on the proxy CPUs, wait until a request through it gets 200, and check the body."""
    (port,) = free_ports(1)
    binary = shutil.which(name)
    if binary is None:
        raise BenchError(f"no {name} binary on PATH ({INSTALL_HINT})")
    progress(f"starting {name} proxy peer on 127.0.0.1:{port}")
    tmp = procs.logdir
    if name == "nginx":
        conf = nginx_proxy_conf(tmp, port, upstream_port, args.idle_connections)
        argv = nginx_argv(binary, tmp, "nginx-proxy", conf)
        label = f"{nginx_version(binary)} proxy (1 worker)"
        log, problems = tmp / "nginx-proxy-error.log", NGINX_PROBLEMS
    else:
        conf_path = tmp / "haproxy.cfg"
        conf_path.write_text(haproxy_conf(port, upstream_port, args.idle_connections))
        # -db: foreground, one process (no master-worker), logs to stderr.
        argv = [binary, "-db", "-f", str(conf_path)]
        version = binary_version([binary, "-v"], r"version (\d[\w.]*)", "haproxy")
        label = f"{version} (1 thread)"
        log, problems = procs.log_path(name), HAPROXY_PROBLEMS
    proc = procs.start_server(name, Pinning.prefix(pin.sidecar_cpus) + argv)
    url = f"http://127.0.0.1:{port}/"
    wait_ready(url, proc, f"{name} proxy", procs.log_path(name))
    check_response(url, f"{name} proxy", args.body_size)
    return Server(name, label, url, proc, log, problems)
