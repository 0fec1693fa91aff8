"""The wire: HTTP/1.1 bytes in and out. The only package that touches aiohttp's and
prometheus-client's internals (private attributes, parser objects, the writer's head buffer).

    server_protocol.py  the listeners' HTTP/1.1 server: aiohttp's protocol, hardened
    request_checks.py   what a request must be before it is routed (never an open proxy)
    headers.py          header rules of a proxy, and the one encoder of message heads
    body.py             the caller's request body: streamed once, or buffered to replay
    upstream_client.py  pooled keep-alive upstream connections; foreign errors become ours here
    relay.py            the chosen response to the caller, streamed under the idle watchdog
    whole_response.py   a small response that arrived whole, written in one go
    responses.py        the one renderer of responses the sidecar makes itself
    tallies.py          per-request metric tallies folded into prometheus-client's children

Everything above this package sees a `Response` (proxy/call.py) and `SidecarError`s, never an
aiohttp exception.
"""
