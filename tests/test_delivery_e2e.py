"""Durable delivery through a running sidecar: 202s on the traffic listener, deliveries to a real
upstream, the admin API and metrics. The store is a real SQLite file under a temporary state dir."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningSidecar, SidecarFactory, Upstream, answering, echo, route_yaml, wait_until
from tests.processes import free_port

FAST = "backoff: {base: 10ms, max: 50ms}"


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "state"
    monkeypatch.setenv("SIDECAR_STATE_DIR", str(directory))
    return directory


def queued(upstream_url: str, delivery: str = FAST, extra: str = "") -> str:
    return route_yaml(upstream_url, f"delivery: {{{delivery}}}\n{extra}")


async def post(
    client: aiohttp.ClientSession, url: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    async with client.post(url, data=body, headers=headers or {}) as response:
        text = await response.read()
        return response.status, json.loads(text) if text.startswith(b"{") else {}, response.headers


async def admin_json(client: aiohttp.ClientSession, url: str, method: str = "GET", **kwargs: Any) -> Any:
    async with client.request(method, url, **kwargs) as response:
        return response.status, await response.json()


async def status_of(client: aiohttp.ClientSession, sidecar: RunningSidecar, message_id: str) -> dict[str, Any]:
    status, body = await admin_json(client, f"{sidecar.admin}/api/v1/deliveries/{message_id}")
    assert status == 200, body
    result: dict[str, Any] = body
    return result


async def until_status(
    client: aiohttp.ClientSession, sidecar: RunningSidecar, message_id: str, wanted: str, limit: float = 10.0
) -> dict[str, Any]:
    async with asyncio.timeout(limit):
        while (seen := await status_of(client, sidecar, message_id))["status"] != wanted:
            await asyncio.sleep(0.02)
    return seen



async def test_a_write_is_answered_202_and_delivered_with_its_key(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(queued(upstream.url))
    status, body, headers = await post(client, sidecar.url + "/hook?x=1", b'{"a": 1}',
                                       {"Content-Type": "application/json", "X-Custom": "yes"})
    assert status == 202
    assert body == {"id": body["id"], "status": "queued", "route": "main"}
    assert headers["Location"] == f"/api/v1/deliveries/{body['id']}"
    await wait_until(lambda: len(upstream.hits) == 1)
    seen = await until_status(client, sidecar, body["id"], "delivered")
    hit = upstream.hits[0]
    assert (hit.method, hit.target, hit.body) == ("POST", "/hook?x=1", b'{"a": 1}')
    assert hit.headers["X-Custom"] == "yes" and hit.headers["Content-Type"] == "application/json"
    assert hit.headers["Idempotency-Key"] == body["id"]  # made by the sidecar: the caller sent none
    assert hit.headers["Host"] == f"127.0.0.1:{upstream.port}"
    assert (seen["attempts"], seen["last_status"]) == (1, 200)
    assert sidecar.metric("sidecar_deliveries_total", route="main", outcome="delivered") == 1


async def test_reads_and_other_methods_are_proxied_as_before(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(queued(upstream.url, FAST + ", methods: [POST]"))
    async with client.get(sidecar.url + "/read") as response:
        assert (response.status, await response.text()) == (200, "GET /read")
    async with client.put(sidecar.url + "/put", data=b"x") as response:
        assert (response.status, await response.text()) == (200, "PUT /put")
    assert [hit.target for hit in upstream.hits] == ["/read", "/put"]


async def test_on_request_mode_queues_only_with_prefer_respond_async(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(queued(upstream.url, FAST + ", mode: on_request"))
    async with client.post(sidecar.url + "/now", data=b"x") as response:
        assert (response.status, await response.text()) == (200, "POST /now")
    status, body, _ = await post(client, sidecar.url + "/later", b"y", {"Prefer": "wait=5, respond-async"})
    assert status == 202
    await until_status(client, sidecar, body["id"], "delivered")
    assert [hit.target for hit in upstream.hits] == ["/now", "/later"]


async def test_upstream_down_then_back_delivers_everything_in_order(
    sidecar_factory: SidecarFactory, client: aiohttp.ClientSession,
    upstream_on: Callable[[Upstream, int], Awaitable[None]],
) -> None:
    port = free_port()  # nothing listens there yet: connect failures
    sidecar = await sidecar_factory(queued(f"http://127.0.0.1:{port}", extra="circuit_breaker: {reset_timeout: 100ms}"))
    ids = []
    for number in range(20):
        status, body, _ = await post(client, sidecar.url + "/hook", str(number).encode())
        assert status == 202
        ids.append(body["id"])
    await wait_until(lambda: sidecar.metric("sidecar_deliveries_total", route="main", outcome="retried") >= 3)
    upstream = Upstream("late")
    await upstream_on(upstream, port)
    await wait_until(lambda: len(upstream.hits) >= 20, limit=15)
    await until_status(client, sidecar, ids[-1], "delivered")
    assert [hit.body for hit in upstream.hits] == [str(number).encode() for number in range(20)]
    assert [hit.headers["Idempotency-Key"] for hit in upstream.hits] == ids


async def test_a_rejected_message_is_dead_at_once_and_redrive_delivers_it(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/hook", answering(400, "no"), echo)
    sidecar = await sidecar_factory("admin: {listen: 127.0.0.1:0, token: sesame}\n" + queued(upstream.url))
    status, body, _ = await post(client, sidecar.url + "/hook", b"payload")
    assert status == 202
    dead = await until_status(client, sidecar, body["id"], "dead")
    assert (dead["attempts"], dead["last_status"], dead["dead_reason"]) == (1, 400, "rejected")
    assert len(upstream.hits) == 1
    assert sidecar.metric("sidecar_deliveries_total", route="main", outcome="dead") == 1
    listed = await admin_json(client, f"{sidecar.admin}/api/v1/deliveries?route=main&status=dead")
    assert listed == (200, {"deliveries": [dead], "after": None})
    redrive = f"{sidecar.admin}/api/v1/deliveries/redrive?route=main"
    assert (await admin_json(client, redrive, "POST"))[0] == 401  # mutations need the admin token
    assert len(upstream.hits) == 1
    answer = await admin_json(client, redrive, "POST", headers={"Authorization": "Bearer sesame"})
    assert answer == (200, {"route": "main", "redriven": 1})
    await until_status(client, sidecar, body["id"], "delivered")
    assert len(upstream.hits) == 2 and upstream.hits[1].body == b"payload"


async def test_the_same_idempotency_key_is_stored_once_and_delivered_once(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(queued(upstream.url))
    first = await post(client, sidecar.url + "/pay", b"1", {"Idempotency-Key": "order-7"})
    second = await post(client, sidecar.url + "/pay", b"1", {"Idempotency-Key": "order-7"})
    assert first[0] == second[0] == 202
    assert first[1]["id"] == second[1]["id"]
    await until_status(client, sidecar, first[1]["id"], "delivered")
    listed = await admin_json(client, f"{sidecar.admin}/api/v1/deliveries?route=main")
    assert [d["id"] for d in listed[1]["deliveries"]] == [first[1]["id"]]
    assert len(upstream.hits) == 1
    assert upstream.hits[0].headers.getall("Idempotency-Key") == ["order-7"]
    assert sidecar.metric("sidecar_deliveries_total", route="main", outcome="deduplicated") == 1


async def test_a_full_queue_answers_503_queue_full_and_stores_nothing(
    sidecar_factory: SidecarFactory, client: aiohttp.ClientSession
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    sidecar = await sidecar_factory(queued(down, FAST + ", max_pending: 2"))
    assert [(await post(client, sidecar.url + "/h", b"x"))[0] for _ in range(2)] == [202, 202]
    status, body, headers = await post(client, sidecar.url + "/h", b"x")
    assert (status, headers["x-sidecar-error"], body["error"]) == (503, "queue_full", "queue_full")
    listed = await admin_json(client, f"{sidecar.admin}/api/v1/deliveries")
    assert len(listed[1]["deliveries"]) == 2


async def test_a_body_over_max_body_is_refused_413_and_not_stored(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(queued(upstream.url, FAST + ", max_body: 10B"))
    status, _, headers = await post(client, sidecar.url + "/h", b"x" * 11)
    assert (status, headers["x-sidecar-error"]) == (413, "payload_too_large")

    async def chunked() -> AsyncIterator[bytes]:
        yield b"x" * 6
        yield b"x" * 6

    async with client.post(sidecar.url + "/h", data=chunked()) as response:
        assert (response.status, response.headers["x-sidecar-error"]) == (413, "payload_too_large")
    assert (await post(client, sidecar.url + "/h", b"x" * 10))[0] == 202
    listed = await admin_json(client, f"{sidecar.admin}/api/v1/deliveries")
    assert [d["size"] for d in listed[1]["deliveries"]] == [10]


async def test_a_queued_post_reaches_the_upstream_once_per_attempt(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """The route's own retries would send this POST three times; the queue's schedule replaces them."""

    upstream.on("/h", answering(503))
    retries = "retries: {attempts: 3, on: [503], non_idempotent: true}"
    sidecar = await sidecar_factory(queued(upstream.url, FAST + ", max_attempts: 1", retries))
    status, body, _ = await post(client, sidecar.url + "/h", b"once")
    assert status == 202
    seen = await until_status(client, sidecar, body["id"], "dead")
    assert (seen["attempts"], seen["last_status"], seen["dead_reason"]) == (1, 503, "max_attempts")
    assert len(upstream.hits) == 1
    async with client.post(sidecar.url + "/h", data=b"x", headers={"Prefer": "respond-async"}) as response:
        assert response.status == 202  # queued again: never proxied with retries


async def test_admin_api_shows_retries_and_deletes_a_message(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/h", answering(422))
    sidecar = await sidecar_factory(queued(upstream.url))
    _, body, _ = await post(client, sidecar.url + "/h", b"x")
    await until_status(client, sidecar, body["id"], "dead")
    url = f"{sidecar.admin}/api/v1/deliveries/{body['id']}"
    upstream.on("/h", echo)
    status, retried = await admin_json(client, url + "/retry", "POST")
    assert status == 200 and retried["id"] == body["id"]
    await until_status(client, sidecar, body["id"], "delivered")
    assert (await admin_json(client, url + "/retry", "POST"))[0] == 409  # delivered: nothing to retry
    assert await admin_json(client, url, "DELETE") == (200, {"id": body["id"], "deleted": True})
    assert (await admin_json(client, url))[0] == 404
    assert (await admin_json(client, f"{sidecar.admin}/api/v1/deliveries?status=nope"))[0] == 400
    assert (await admin_json(client, f"{sidecar.admin}/api/v1/deliveries/redrive?route=nope", "POST"))[0] == 404


async def test_an_answer_whose_body_breaks_off_is_judged_by_its_status(
    sidecar_factory: SidecarFactory, raw_upstream: Callable[[Any], Awaitable[int]], client: aiohttp.ClientSession
) -> None:
    """The deliverer drops the answer's body; one that breaks off (or stalls) costs the
    connection, not the outcome: a 200 is delivered, a 503 retried, and nothing is raised."""
    answers = [b"HTTP/1.1 503 Busy\r\nContent-Length: 1000\r\n\r\npartial",
               b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial"]
    requests = []

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        requests.append(await reader.readexactly(length))
        writer.write(answers[min(len(requests), len(answers)) - 1])
        await writer.drain()  # then close mid-body

    port = await raw_upstream(respond)
    sidecar = await sidecar_factory(queued(f"http://127.0.0.1:{port}"))
    status, body, _ = await post(client, sidecar.url + "/hook", b"one write")
    assert status == 202
    seen = await until_status(client, sidecar, body["id"], "delivered")
    assert (seen["attempts"], seen["last_status"]) == (2, 200)
    assert requests == [b"one write", b"one write"]
