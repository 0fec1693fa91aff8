"""The innermost step: send one attempt to one endpoint and return its response headers.

The attempt's per-try timeout, endpoint choice and accounting live here; the wire is
`upstream_client.py`, the edge where foreign exceptions become sidecar errors.
"""

from __future__ import annotations

import asyncio

from sidecar.config import Endpoint, RouteSpec
from sidecar.errors import BadUpstreamResponse, ConnectFailure, UpstreamError, UpstreamReset, UpstreamTimeout
from sidecar.policy.per_try_timeouts import PerTryTimeouts
from sidecar.proxy.call import Call, Handler, Response
from sidecar.proxy.endpoints import EndpointPool
from sidecar.telemetry.metrics import RouteMetrics
from sidecar.wire.upstream_client import UpstreamClient

# The outcome label of an attempt that ended in an error, by error kind.
OUTCOMES = {
    ConnectFailure.kind: "connect_failure",
    UpstreamReset.kind: "reset",
    UpstreamTimeout.kind: "timeout",
    BadUpstreamResponse.kind: "bad_response",
}


def forwarder(route: RouteSpec, client: UpstreamClient, endpoints: EndpointPool, metrics: RouteMetrics) -> Handler:
    timeouts = route.timeouts
    per_try = timeouts.per_try
    loop = asyncio.get_running_loop()
    expiries = PerTryTimeouts(loop)

    async def forward(call: Call) -> Response:
        started = loop.time()
        budget = min(per_try, call.deadline - started)
        if budget <= 0:
            raise UpstreamTimeout(f"no time left for an attempt within the {timeouts.total:g}s total timeout")
        endpoint = call.endpoint = endpoints.pick(call.avoid)
        call.attempts += 1
        call.headers["Host"] = endpoint.authority
        # The per-try budget bounds everything up to response headers; the connect
        # timeout bounds the TCP (and TLS) connect alone. Body silence is the relay's
        # idle watchdog.
        expiry = expiries.start(started + budget)
        try:
            response = await client.send(endpoint, call.method, call.target, call.headers, call.body, timeouts.connect)
        except asyncio.CancelledError:
            if not expiry.owns_cancellation():
                raise
            error = UpstreamTimeout(f"{endpoint.authority} sent no response headers within {budget:.3g}s")
            settle(call, endpoint, OUTCOMES[error.kind], True, started)
            raise error from None
        except UpstreamError as error:
            settle(call, endpoint, OUTCOMES[error.kind], True, started)
            raise
        finally:
            expiries.stop(expiry)
        failed = response.status >= 500
        settle(call, endpoint, "failure_status" if failed else "success", failed, started)
        return response

    def settle(call: Call, endpoint: Endpoint, outcome: str, failed: bool, started: float) -> None:
        """The attempt's verdict, for outlier ejection, metrics and the response headers."""
        endpoints.record(endpoint, failed)
        seconds = loop.time() - started
        call.upstream_seconds += seconds
        metrics.attempt(outcome, seconds)

    return forward
