"""The innermost step: send one attempt to one endpoint and return its response headers.

This is the edge where aiohttp's and asyncio's exceptions become sidecar errors.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import ClientResponse, ClientSession, ClientTimeout
from yarl import URL

from sidecar.call import Call, Handler
from sidecar.config import RouteSpec
from sidecar.endpoints import EndpointPool
from sidecar.errors import (
    BadUpstreamResponse,
    ConnectFailure,
    SidecarError,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.metrics import RouteMetrics

# The outcome label of an attempt that ended in an error, by error kind.
OUTCOMES = {
    ConnectFailure.kind: "connect_failure",
    UpstreamReset.kind: "reset",
    UpstreamTimeout.kind: "timeout",
    BadUpstreamResponse.kind: "bad_response",
}


def forwarder(route: RouteSpec, session: ClientSession, endpoints: EndpointPool, metrics: RouteMetrics) -> Handler:
    timeouts = route.timeouts
    per_try = timeouts.per_try or timeouts.total
    # sock_connect bounds the TCP (and TLS) connect alone; the per-try budget below
    # bounds everything up to response headers, including waiting for a pooled
    # connection. Body silence is the relay's idle watchdog, not aiohttp's.
    client_timeout = ClientTimeout(total=None, connect=None, sock_connect=timeouts.connect, sock_read=None)
    loop = asyncio.get_running_loop()

    async def forward(call: Call) -> ClientResponse:
        started = loop.time()
        budget = min(per_try, call.deadline - started)
        if budget <= 0:
            raise UpstreamTimeout(f"no time left for an attempt within the {timeouts.total:g}s total timeout")
        endpoint = call.endpoint = endpoints.pick(call.avoid)
        call.attempts += 1
        call.headers["Host"] = endpoint.authority
        try:
            response = await _send(call, endpoint.base, endpoint.authority, budget)
        except UpstreamError as error:
            endpoints.record(endpoint, failed=True)
            _account(call, metrics, OUTCOMES[error.kind], loop.time() - started)
            raise
        failed = response.status >= 500
        endpoints.record(endpoint, failed)
        _account(call, metrics, "failure_status" if failed else "success", loop.time() - started)
        return response

    async def _send(call: Call, base: str, authority: str, budget: float) -> ClientResponse:
        url = URL(base + call.target, encoded=True)
        try:
            async with asyncio.timeout(budget):
                return await session.request(
                    call.method, url, headers=call.headers, data=call.body,
                    allow_redirects=False, timeout=client_timeout,
                )
        except aiohttp.ConnectionTimeoutError as exc:
            raise ConnectFailure(f"connect to {authority} timed out after {timeouts.connect:g}s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailure(f"cannot connect to {authority}: {exc.os_error.strerror or exc}") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{authority} sent no response headers within {budget:.3g}s") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise UpstreamReset(f"{authority} closed the connection before response headers") from exc
        except aiohttp.ClientResponseError as exc:
            raise BadUpstreamResponse(f"{authority} sent an invalid response: {exc.message}") from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamReset(f"sending the request body to {authority} failed") from exc
        except aiohttp.ClientConnectionError as exc:
            # aiohttp wraps a failure of our request body stream (the caller stalled or
            # left) in a connection error: answer for the caller's failure, not the upstream's.
            if isinstance(exc.__cause__, SidecarError):
                raise exc.__cause__ from None
            raise UpstreamReset(f"the connection to {authority} failed: {exc}") from exc

    return forward


def _account(call: Call, metrics: RouteMetrics, outcome: str, seconds: float) -> None:
    call.upstream_seconds += seconds
    metrics.attempt(outcome, seconds)
