"""The shared store: Redis Streams, so every pod of a Deployment feeds and drains one queue.

Install with `pip install 'sidecar[redis]'`; configure `delivery: {store: redis://host:port/db}`.

Layout, under a key prefix (default `sidecar:delivery:`):

    m:{id}               hash    the message: request, status, attempts, lease (the source of truth)
    s:{route}            stream  the route's line of unfinished messages; consumer group `deliverers`
    due:{route}          zset    messages waiting for a retry, scored by due time (unordered routes)
    i:{route}:{status}   zset    ids by status, for listing, counting and redrive (lexical: time order)
    done:{route}         zset    delivered ids scored by delivery time, for purging
    t:{route}            hash    `bytes`: bodies of queued, delivering and dead messages
    k:{route}:{key}      string  "id expiry" for an Idempotency-Key, with a TTL of the dedupe window
    routes               set     routes that ever queued

Each operation is one Lua script, so it is atomic across pods. A worker claims new entries with
XREADGROUP; an entry whose consumer went silent for longer than the lease (the pod died) is handed
to a live one by XAUTOCLAIM (unordered routes) or XCLAIM of the head (ordered routes). Lease
expiry is judged by Redis's clock (the entry's idle time); due times by the caller's `now`.

Durability is Redis's: a 202 means Redis acknowledged the write. It survives a Redis crash only
with `appendonly yes` and `appendfsync always` (with `everysec`, up to a second is lost).
Keys are built inside the scripts: a single Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar.delivery.model import Headers, Message, Status
from sidecar.delivery.store import Accepted, Limits, Page, QueueFull, RouteStats, StoreError, StoreUnavailable

T = TypeVar("T")
GROUP = "deliverers"
REDRIVE_CHUNK = 200  # messages per script call: one call blocks Redis for its duration
PURGE_CHUNK = 500

# Shared Lua: move a message between status indexes.
_INDEX = """
local function index(p, route, id, old, new)
  if old then redis.call('ZREM', p .. 'i:' .. route .. ':' .. old, id) end
  if new then redis.call('ZADD', p .. 'i:' .. route .. ':' .. new, 0, id) end
end
"""

# ARGV: prefix route id key dedupe now window max_pending max_bytes size, then hash field/value pairs.
_ACCEPT = _INDEX + """
local p, route, id, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local dedupe, now, window = ARGV[5] == '1', tonumber(ARGV[6]), tonumber(ARGV[7])
local max_pending, max_bytes, size = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local dedupe_key = p .. 'k:' .. route .. ':' .. key
if dedupe then
  local seen = redis.call('GET', dedupe_key)
  if seen then
    local space = string.find(seen, ' ', 1, true)
    if tonumber(string.sub(seen, space + 1)) > now then return {'duplicate', string.sub(seen, 1, space - 1)} end
  end
end
local pending = 0
for _, status in ipairs({'queued', 'delivering', 'dead'}) do
  pending = pending + redis.call('ZCARD', p .. 'i:' .. route .. ':' .. status)
end
if pending + 1 > max_pending then return {'full', 'max_pending'} end
local stored = tonumber(redis.call('HGET', p .. 't:' .. route, 'bytes') or '0')
if stored + size > max_bytes then return {'full', 'max_bytes'} end
local stream = p .. 's:' .. route
if redis.call('SADD', p .. 'routes', route) == 1 or redis.call('EXISTS', stream) == 0 then
  pcall(redis.call, 'XGROUP', 'CREATE', stream, 'deliverers', '0', 'MKSTREAM')
end
local entry = redis.call('XADD', stream, '*', 'id', id)
redis.call('HSET', p .. 'm:' .. id, 'entry', entry, unpack(ARGV, 11))
index(p, route, id, nil, 'queued')
redis.call('HINCRBY', p .. 't:' .. route, 'bytes', size)
if dedupe then
  redis.call('SET', dedupe_key, id .. ' ' .. tostring(now + window), 'PX', math.max(1, math.ceil(window * 1000)))
end
return {'stored', id}
"""

# ARGV: prefix route owner now lease lease_ms limit ordered. Returns the claimed messages' hashes.
_CLAIM = _INDEX + """
local p, route, owner = ARGV[1], ARGV[2], ARGV[3]
local now, lease, lease_ms, limit, ordered = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), ARGV[8]
local stream, due = p .. 's:' .. route, p .. 'due:' .. route
if redis.call('EXISTS', stream) == 0 then return {} end
local claimed = {}
local function drop(entry)
  redis.call('XACK', stream, 'deliverers', entry)
  redis.call('XDEL', stream, entry)
end
local function park(entry, id, at)
  -- waiting for a retry on an unordered route: out of the stream, into the due set
  drop(entry)
  redis.call('HDEL', p .. 'm:' .. id, 'entry')
  redis.call('ZADD', due, at, id)
end
local function take(entry, id)
  local m = p .. 'm:' .. id
  local fields = redis.call('HMGET', m, 'status', 'next_attempt_at')
  local status = fields[1]
  if status ~= 'queued' and status ~= 'delivering' then
    drop(entry)  -- deleted, or finished by a worker whose lease had passed: not in the line any more
    return
  end
  if status == 'queued' and tonumber(fields[2]) > now then
    park(entry, id, fields[2])
    return
  end
  redis.call('HSET', m, 'status', 'delivering', 'lease_owner', owner, 'lease_expires_at', tostring(now + lease),
    'updated_at', ARGV[4], 'entry', entry, 'ordered', ordered)
  if status == 'queued' then index(p, route, id, 'queued', 'delivering') end
  claimed[#claimed + 1] = redis.call('HGETALL', m)
end
local function read(count)
  local got = redis.call('XREADGROUP', 'GROUP', 'deliverers', owner, 'COUNT', count, 'STREAMS', stream, '>')
  if got then
    for _, item in ipairs(got[1][2]) do take(item[1], item[2][2]) end
  end
end
local function head()
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  if not first then return nil end
  local pending = redis.call('XPENDING', stream, 'deliverers', first[1], first[1], 1)[1] ~= nil
  return first[1], first[2][2], pending
end
local function requeue_due()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)) do
    redis.call('ZREM', due, id)
    redis.call('HSET', p .. 'm:' .. id, 'entry', redis.call('XADD', stream, '*', 'id', id))
  end
end
if ordered == '1' then
  requeue_due()  -- retries scheduled while the route was unordered rejoin the line, at its end
  -- The first `limit` entries of the line, in order, up to the first that is not free and due.
  for _, item in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', limit)) do
    local entry, id = item[1], item[2][2]
    local fields = redis.call('HMGET', p .. 'm:' .. id, 'status', 'next_attempt_at')
    local waiting = fields[1] == 'queued' and tonumber(fields[2]) > now
    if redis.call('XPENDING', stream, 'deliverers', entry, entry, 1)[1] then
      if waiting then break end  -- waiting for its retry: it holds back the whole line
      if fields[1] == 'delivering' then
        -- another worker's: taken over only once idle past the lease
        if #redis.call('XCLAIM', stream, 'deliverers', owner, lease_ms, entry) == 0 then break end
      else
        redis.call('XCLAIM', stream, 'deliverers', owner, 0, entry)
      end
      take(entry, id)
    else
      if waiting then break end
      -- Everything before it is pending or gone, so the group's next new entry is this one.
      local got = redis.call('XREADGROUP', 'GROUP', 'deliverers', owner, 'COUNT', 1, 'STREAMS', stream, '>')
      if not got then break end
      local read = got[1][2][1]
      take(read[1], read[2][2])
      if read[1] ~= entry then break end
    end
  end
  return claimed
end
local entry, id, pending = head()
if entry and pending and redis.call('HGET', p .. 'm:' .. id, 'status') == 'queued' then
  -- a head left waiting while the route was ordered
  park(entry, id, redis.call('HGET', p .. 'm:' .. id, 'next_attempt_at'))
end
requeue_due()
local auto = redis.call('XAUTOCLAIM', stream, 'deliverers', owner, lease_ms, '0-0', 'COUNT', limit)
for _, item in ipairs(auto[2]) do
  if item and item[2] then take(item[1], item[2][2]) end
end
if #claimed < limit then read(limit - #claimed) end
return claimed
"""

# ARGV: prefix id owner new_status now, then field/value pairs ('' deletes the field).
_FINISH = _INDEX + """
local p, id, owner, new, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local m = p .. 'm:' .. id
local f = redis.call('HMGET', m, 'status', 'lease_owner', 'route', 'entry', 'ordered', 'size')
if f[1] ~= 'delivering' or f[2] ~= owner then return 0 end
local route, entry, ordered, size = f[3], f[4], f[5], tonumber(f[6])
local stream = p .. 's:' .. route
redis.call('HSET', m, 'status', new, 'updated_at', now)
redis.call('HDEL', m, 'lease_owner', 'lease_expires_at')
for i = 6, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', m, ARGV[i]) else redis.call('HSET', m, ARGV[i], ARGV[i + 1]) end
end
index(p, route, id, 'delivering', new)
if new == 'delivered' then
  redis.call('HSET', m, 'body', '')
  redis.call('HINCRBY', p .. 't:' .. route, 'bytes', -size)
  redis.call('ZADD', p .. 'done:' .. route, now, id)
end
if new == 'queued' and ordered == '1' then
  return 1  -- stays pending at the head of the line
end
redis.call('XACK', stream, 'deliverers', entry)
redis.call('XDEL', stream, entry)
redis.call('HDEL', m, 'entry')
if new == 'queued' then
  redis.call('ZADD', p .. 'due:' .. route, redis.call('HGET', m, 'next_attempt_at'), id)
end
return 1
"""

# Back of the line with fresh attempts and ttl. ARGV: prefix id now.
_REQUEUE = """
local function requeue(p, id, route, now)
  local m = p .. 'm:' .. id
  redis.call('HSET', m, 'status', 'queued', 'attempts', '0', 'queued_at', now, 'next_attempt_at', now,
    'updated_at', now)
  redis.call('HDEL', m, 'dead_reason', 'ordered')
  redis.call('ZREM', p .. 'i:' .. route .. ':dead', id)
  redis.call('ZADD', p .. 'i:' .. route .. ':queued', 0, id)
  redis.call('HSET', m, 'entry', redis.call('XADD', p .. 's:' .. route, '*', 'id', id))
end
"""

_RETRY = _REQUEUE + """
local p, id, now = ARGV[1], ARGV[2], ARGV[3]
local m = p .. 'm:' .. id
local f = redis.call('HMGET', m, 'status', 'route')
if f[1] == 'queued' then
  redis.call('HSET', m, 'next_attempt_at', now, 'updated_at', now)
  if redis.call('ZSCORE', p .. 'due:' .. f[2], id) then redis.call('ZADD', p .. 'due:' .. f[2], now, id) end
  return 1
end
if f[1] ~= 'dead' then return 0 end
requeue(p, id, f[2], now)
return 1
"""

# ARGV: prefix route now chunk. Returns how many moved.
_REDRIVE = _REQUEUE + """
local p, route, now = ARGV[1], ARGV[2], ARGV[3]
local ids = redis.call('ZRANGE', p .. 'i:' .. route .. ':dead', 0, tonumber(ARGV[4]) - 1)
for _, id in ipairs(ids) do requeue(p, id, route, now) end
return #ids
"""

# ARGV: prefix id
_DELETE = """
local p, id = ARGV[1], ARGV[2]
local m = p .. 'm:' .. id
local f = redis.call('HMGET', m, 'status', 'route', 'size', 'entry')
if not f[1] then return 0 end
local route = f[2]
redis.call('DEL', m)
redis.call('ZREM', p .. 'i:' .. route .. ':' .. f[1], id)
redis.call('ZREM', p .. 'due:' .. route, id)
redis.call('ZREM', p .. 'done:' .. route, id)
if f[1] ~= 'delivered' then redis.call('HINCRBY', p .. 't:' .. route, 'bytes', -tonumber(f[3])) end
if f[4] then
  redis.call('XACK', p .. 's:' .. route, 'deliverers', f[4])
  redis.call('XDEL', p .. 's:' .. route, f[4])
end
return 1
"""

# ARGV: prefix route before chunk
_PURGE = """
local p, route = ARGV[1], ARGV[2]
local done = p .. 'done:' .. route
local ids = redis.call('ZRANGEBYSCORE', done, '-inf', '(' .. ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(ids) do
  redis.call('DEL', p .. 'm:' .. id)
  redis.call('ZREM', done, id)
  redis.call('ZREM', p .. 'i:' .. route .. ':delivered', id)
end
return #ids
"""

_LISTED_FIELDS = (
    "route", "method", "target", "headers", "size", "idempotency_key", "accepted_at", "queued_at", "updated_at",
    "status", "attempts", "next_attempt_at", "last_error", "last_status", "dead_reason", "lease_owner",
    "lease_expires_at",
)


def _number(value: float) -> str:
    return repr(float(value))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _message(message_id: str, fields: dict[bytes, bytes]) -> Message:
    def optional_float(name: bytes) -> float | None:
        value = fields.get(name)
        return None if value is None else float(value)

    last_status = fields.get(b"last_status")
    return Message(
        id=message_id, route=fields[b"route"].decode(), method=fields[b"method"].decode(),
        target=fields[b"target"].decode(),
        headers=tuple((name, value) for name, value in json.loads(fields[b"headers"])),
        body=fields.get(b"body", b""), size=int(fields[b"size"]),
        idempotency_key=fields[b"idempotency_key"].decode(), accepted_at=float(fields[b"accepted_at"]),
        queued_at=float(fields[b"queued_at"]), updated_at=float(fields[b"updated_at"]),
        status=Status(fields[b"status"].decode()), attempts=int(fields[b"attempts"]),
        next_attempt_at=float(fields[b"next_attempt_at"]), last_error=_text(fields.get(b"last_error")),
        last_status=None if last_status is None else int(last_status), dead_reason=_text(fields.get(b"dead_reason")),
        lease_owner=_text(fields.get(b"lease_owner")), lease_expires_at=optional_float(b"lease_expires_at"),
    )


def _bytes(value: bytes | str) -> bytes:
    """The client is built without decode_responses: replies are bytes (typed as either)."""
    return value if isinstance(value, bytes) else value.encode()


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _encode_headers(headers: Headers) -> str:
    return json.dumps([list(pair) for pair in headers], separators=(",", ":"))


def redact(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    def __init__(self, client: aioredis.Redis, url: str, prefix: str) -> None:
        self.client = client
        self.url = redact(url)
        self.prefix = prefix
        self._accept = client.register_script(_ACCEPT)
        self._claim = client.register_script(_CLAIM)
        self._finish_script = client.register_script(_FINISH)
        self._retry = client.register_script(_RETRY)
        self._redrive = client.register_script(_REDRIVE)
        self._delete = client.register_script(_DELETE)
        self._purge = client.register_script(_PURGE)

    @classmethod
    async def open(cls, url: str, prefix: str = "sidecar:delivery:") -> RedisStore:
        """Connect and check the server answers; StoreError naming the URL (without password) if not."""
        try:
            client = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        except ValueError as exc:
            raise StoreError(f"delivery store {redact(url)} is not a usable Redis URL: {exc}") from None
        try:
            await client.ping()
        except RedisError as exc:
            await client.aclose()
            raise StoreError(f"delivery store {redact(url)} cannot be reached: {exc}") from None
        return cls(client, url, prefix)

    async def close(self) -> None:
        await self.client.aclose()

    async def _call(self, pending: Awaitable[T]) -> T:
        try:
            return await pending
        except RedisError as exc:
            raise StoreUnavailable(f"delivery store {self.url} cannot be used: {exc}") from None

    async def accept(self, message: Message, limits: Limits, *, dedupe: bool = True) -> Accepted:
        fields: list[str | bytes] = [
            "id", message.id, "route", message.route, "method", message.method, "target", message.target,
            "headers", _encode_headers(message.headers), "body", message.body, "size", str(message.size),
            "idempotency_key", message.idempotency_key, "accepted_at", _number(message.accepted_at),
            "queued_at", _number(message.queued_at), "updated_at", _number(message.updated_at),
            "status", Status.QUEUED.value, "attempts", "0", "next_attempt_at", _number(message.next_attempt_at),
        ]
        outcome, value = await self._call(self._accept(args=[
            self.prefix, message.route, message.id, message.idempotency_key, "1" if dedupe else "0",
            # int(): the config's Size prints as "256MiB", which Lua's tonumber cannot read.
            _number(message.accepted_at), _number(limits.dedupe_window), str(int(limits.max_pending)),
            str(int(limits.max_bytes)), str(message.size), *fields,
        ]))
        if outcome == b"full":
            raise QueueFull(message.route, value.decode())
        return Accepted(value.decode(), duplicate=outcome == b"duplicate")

    async def claim_due(
        self, route: str, *, owner: str, now: float, lease: float, limit: int, ordered: bool
    ) -> list[Message]:
        rows = await self._call(self._claim(args=[
            self.prefix, route, owner, _number(now), _number(lease), str(max(1, math.ceil(lease * 1000))),
            str(limit), "1" if ordered else "0",
        ]))
        messages = []
        for row in rows:
            fields = _pairs(row)
            messages.append(_message(self._id_of(fields), fields))
        return messages

    def _id_of(self, fields: dict[bytes, bytes]) -> str:
        return fields[b"id"].decode()

    async def _finish(self, message_id: str, owner: str, status: Status, now: float, *pairs: str) -> bool:
        done = await self._call(self._finish_script(args=[
            self.prefix, message_id, owner, status.value, _number(now), *pairs,
        ]))
        return bool(done)

    async def mark_delivered(self, message_id: str, *, owner: str, now: float, attempts: int, status: int) -> bool:
        return await self._finish(
            message_id, owner, Status.DELIVERED, now, "attempts", str(attempts), "last_status", str(status),
            "last_error", "",
        )

    async def reschedule(
        self, message_id: str, *, owner: str, now: float, attempts: int, next_attempt_at: float,
        error: str | None, status: int | None,
    ) -> bool:
        return await self._finish(
            message_id, owner, Status.QUEUED, now, "attempts", str(attempts),
            "next_attempt_at", _number(next_attempt_at), "last_error", error or "",
            "last_status", "" if status is None else str(status),
        )

    async def mark_dead(
        self, message_id: str, *, owner: str, now: float, attempts: int, reason: str,
        error: str | None, status: int | None,
    ) -> bool:
        return await self._finish(
            message_id, owner, Status.DEAD, now, "attempts", str(attempts), "dead_reason", reason,
            "last_error", error or "", "last_status", "" if status is None else str(status),
        )

    async def release(self, message_id: str, *, owner: str, now: float) -> bool:
        return await self._finish(message_id, owner, Status.QUEUED, now)

    async def get(self, message_id: str) -> Message | None:
        raw = await self._call(self.client.hgetall(f"{self.prefix}m:{message_id}"))
        fields = {_bytes(name): _bytes(value) for name, value in raw.items()}
        return _message(message_id, fields) if fields else None

    async def list(
        self, route: str | None = None, status: Status | None = None, limit: int = 100, after: str | None = None
    ) -> Page:
        routes = [route] if route is not None else sorted(await self._routes())
        statuses = [status] if status is not None else list(Status)
        start = f"({after}" if after else "-"
        async with self.client.pipeline(transaction=False) as pipe:
            for name in routes:
                for kind in statuses:
                    pipe.zrangebylex(f"{self.prefix}i:{name}:{kind.value}", start, "+", 0, limit + 1)
            found = await self._call(pipe.execute())
        ids = sorted(member.decode() for members in found for member in members)[: limit + 1]
        async with self.client.pipeline(transaction=False) as pipe:
            for message_id in ids[:limit]:
                pipe.hmget(f"{self.prefix}m:{message_id}", list(_LISTED_FIELDS))
            rows = await self._call(pipe.execute())
        messages = []
        for message_id, values in zip(ids, rows, strict=False):
            fields = {name.encode(): value for name, value in zip(_LISTED_FIELDS, values, strict=True)
                      if value is not None}
            if b"status" in fields:  # deleted between the two reads: skip it
                messages.append(_message(message_id, fields))
        return Page(messages, ids[limit - 1] if len(ids) > limit else None)

    async def _routes(self) -> set[str]:
        members = await self._call(self.client.smembers(f"{self.prefix}routes"))
        return {_bytes(member).decode() for member in members}

    async def retry(self, message_id: str, *, now: float) -> bool:
        return bool(await self._call(self._retry(args=[self.prefix, message_id, _number(now)])))

    async def redrive(self, route: str, *, now: float) -> int:
        dead = await self._call(self.client.zcard(f"{self.prefix}i:{route}:dead"))
        total = 0
        for _ in range(dead // REDRIVE_CHUNK + 1):  # bounded: messages that die meanwhile wait for the next call
            moved = int(await self._call(self._redrive(args=[self.prefix, route, _number(now), str(REDRIVE_CHUNK)])))
            total += moved
            if moved < REDRIVE_CHUNK:
                break
        return total

    async def delete(self, message_id: str) -> bool:
        return bool(await self._call(self._delete(args=[self.prefix, message_id])))

    async def stats(self, *, now: float) -> dict[str, RouteStats]:
        routes = sorted(await self._routes())
        async with self.client.pipeline(transaction=False) as pipe:
            for route in routes:
                for status in Status:
                    pipe.zcard(f"{self.prefix}i:{route}:{status.value}")
                pipe.hget(f"{self.prefix}t:{route}", "bytes")
                pipe.zrange(f"{self.prefix}i:{route}:queued", 0, 0)
                pipe.zrange(f"{self.prefix}i:{route}:delivering", 0, 0)
            values = await self._call(pipe.execute())
        stats = {}
        width = len(Status) + 3
        for number, route in enumerate(routes):
            row = values[number * width:(number + 1) * width]
            counts = {status: int(count) for status, count in zip(Status, row, strict=False)}
            heads = sorted(member.decode() for members in row[len(Status) + 1:] for member in members)
            age = 0.0
            if heads:  # ids sort by time: the smallest is the oldest waiting message
                queued_at = await self._call(self.client.hget(f"{self.prefix}m:{heads[0]}", "queued_at"))
                if queued_at is not None:
                    age = max(0.0, now - float(queued_at))
            stats[route] = RouteStats(counts, int(row[len(Status)] or 0), age)
        return stats

    async def purge(self, route: str, *, before: float) -> int:
        total = 0
        for _ in range(1000):  # bounded; the next purge continues
            removed = int(await self._call(self._purge(args=[self.prefix, route, _number(before), str(PURGE_CHUNK)])))
            total += removed
            if removed < PURGE_CHUNK:
                break
        return total
