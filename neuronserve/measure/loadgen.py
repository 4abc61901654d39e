"""A cheap HTTP/1.1 load client: asyncio streams, keep-alive, pre-encoded requests, minimal response parsing.

On a small host the client competes with the server for CPU, so it does as little as it can per request:
the request bytes are built once, a response is read as a head plus Content-Length (or chunked) body and
only its status code is looked at, and latencies go into a plain list. `run_closed` and `run_open` return
a `Measurement` with the client's own CPU time over the measured window, so its cost can be reported.

Two ways to load:
- closed loop: N connections, each sends its next request when the previous answer arrives;
- open loop: requests arrive at a fixed mean rate with exponential gaps (Poisson arrivals), whatever the
  server's speed; latency counts from the scheduled arrival, so a slow server cannot hide its queue
  ("coordinated omission"). Arrivals wait for a free connection (at most `connections` in flight) and past
  `backlog` waiting requests are dropped and counted as "client backlog" errors, so memory stays bounded.

Both always stop: after `ramp_s + duration_s`, or after `count` measured requests but never later than
`ramp_s + max_duration_s`. Requests started during the ramp are sent but not measured.
"""
from __future__ import annotations

import asyncio
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from neuronserve.errors import NeuronserveError


class LoadError(NeuronserveError):
    """The load cannot start: a bad URL, or nothing listens there."""


@dataclass(frozen=True)
class Target:
    """One server address and the exact bytes of the request sent to it."""

    host: str
    port: int
    raw: bytes

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


def split_url(url: str) -> tuple[str, int, str]:
    """http://host:port/path -> (host, port, path). Only plain HTTP: the client talks to 127.0.0.1 or the front."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise LoadError(f"{url!r}: expected http://host[:port][/path]")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


def make_target(url: str, method: str = "GET", body: bytes = b"", headers: dict[str, str] | None = None) -> Target:
    host, port, path = split_url(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive"]
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return Target(host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


class Connection:
    """One keep-alive connection to a target; reconnects transparently after the server closes it."""

    def __init__(self, target: Target):
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port)
        self.writer.write(self.target.raw)
        status, body, keep = await read_response(self.reader)
        if not keep:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Read one response: (status, body, keep-alive). Understands Content-Length, chunked and read-to-close."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
    status = int(head[9:12])
    lower = head.lower()
    keep = b"\r\nconnection: close" not in lower and not head.startswith(b"HTTP/1.0")
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        body = await reader.readexactly(int(lower[at + 17:end]))
    elif b"\r\ntransfer-encoding: chunked" in lower:
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")      # no trailers are sent by our servers
                break
            chunks.append(await reader.readexactly(size + 2))
        body = b"".join(c[:-2] for c in chunks)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body, keep = await reader.read(), False
    return status, body, keep


class ProtocolError(Exception):
    pass


def error_kind(exc: BaseException) -> str:
    """A short, stable name for why a request failed: the key of `errors by kind`."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (ConnectionError, asyncio.IncompleteReadError, OSError)):
        return "connection"
    return "protocol"


@dataclass
class Measurement:
    """Raw results of one load level, before statistics."""

    latencies: list[float] = field(default_factory=list)   # seconds, successful (2xx) measured requests
    errors: list[str] = field(default_factory=list)        # one kind per failed measured request
    window_s: float = 0.0              # ramp end -> last measured completion
    sent: int = 0                      # every request sent, ramp included
    cpu_s: float = 0.0                 # this process' user+system CPU over the measured window
    ramp_hook_result: object = None    # what `on_ramp_end` returned


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Window:
    """Bookkeeping shared by both loops: measured or not, when to stop, the CPU and time marks."""

    def __init__(self, ramp_s: float, duration_s: float | None, count: int | None, max_duration_s: float,
                 on_ramp_end: Callable[[], Awaitable[object]] | None):
        if duration_s is None and count is None:
            raise LoadError("give a duration or a request count")
        now = time.monotonic()
        self.ramp_end = now + ramp_s
        self.stop_at = self.ramp_end + (duration_s if duration_s is not None else max_duration_s)
        self.count = count
        self.issued = 0
        self.last_done = self.ramp_end
        self.cpu_start: float | None = None
        self.m = Measurement()
        self.hook = on_ramp_end
        self.hook_task: asyncio.Task | None = None

    def admit(self, now: float) -> bool | None:
        """None: stop sending. True: send and measure. False: send, ramp only."""
        if now >= self.stop_at:
            return None
        if now < self.ramp_end:
            return False
        if self.cpu_start is None:
            self.cpu_start = _cpu()
            if self.hook:
                self.hook_task = asyncio.ensure_future(self.hook())
        if self.count is not None:
            if self.issued >= self.count:
                return None
            self.issued += 1
        return True

    def record(self, start: float, status: int | None, kind: str | None) -> None:
        end = time.monotonic()
        self.last_done = max(self.last_done, end)
        if status is not None and 200 <= status < 300:
            self.m.latencies.append(end - start)
        else:
            self.m.errors.append(kind or f"http {status}")

    async def finish(self) -> Measurement:
        self.m.cpu_s = _cpu() - self.cpu_start if self.cpu_start is not None else 0.0
        self.m.window_s = self.last_done - self.ramp_end
        if self.hook_task is not None:
            self.m.ramp_hook_result = await self.hook_task
        return self.m


if hasattr(asyncio, "timeout"):
    async def _within(aw: Awaitable, timeout: float):
        async with asyncio.timeout(timeout):     # 3.11+: no extra task per request, unlike wait_for
            return await aw
else:
    _within = asyncio.wait_for


async def _timed_request(conn: Connection, timeout: float) -> tuple[int | None, str | None]:
    try:
        status, _ = await _within(conn.request(), timeout)
        return status, None
    except Exception as e:
        conn.close()
        return None, error_kind(e)


async def run_closed(targets: list[Target], concurrency: int, *, duration_s: float | None = None,
                     count: int | None = None, ramp_s: float = 1.0, timeout_s: float = 30.0,
                     max_duration_s: float = 600.0,
                     on_ramp_end: Callable[[], Awaitable[object]] | None = None) -> Measurement:
    """Closed loop: `concurrency` connections, spread over `targets`, each always one request in flight."""
    if concurrency < 1:
        raise LoadError("concurrency is at least 1")
    w = _Window(ramp_s, duration_s, count, max_duration_s, on_ramp_end)

    async def worker(i: int) -> None:
        conn = Connection(targets[i % len(targets)])
        try:
            while True:
                start = time.monotonic()
                measured = w.admit(start)
                if measured is None:
                    return
                w.m.sent += 1
                status, kind = await _timed_request(conn, timeout_s)
                if measured:
                    w.record(start, status, kind)
                elif status is None:
                    await asyncio.sleep(0.05)   # nothing listens yet: don't spin through the ramp
        finally:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return await w.finish()


async def run_open(targets: list[Target], rate: float, *, duration_s: float | None = None,
                   count: int | None = None, ramp_s: float = 1.0, timeout_s: float = 30.0,
                   max_duration_s: float = 600.0, connections: int = 64, backlog: int = 1024, seed: int = 0,
                   on_ramp_end: Callable[[], Awaitable[object]] | None = None) -> Measurement:
    """Open loop: Poisson arrivals at `rate` per second over at most `connections` keep-alive connections."""
    if rate <= 0:
        raise LoadError("rate must be positive")
    w = _Window(ramp_s, duration_s, count, max_duration_s, on_ramp_end)
    rng = random.Random(seed)
    per_target = max(1, -(-connections // len(targets)))
    pools: list[asyncio.LifoQueue] = []
    for t in targets:
        q: asyncio.LifoQueue = asyncio.LifoQueue()
        for _ in range(per_target):
            q.put_nowait(Connection(t))
        pools.append(q)
    waiting = 0
    pending: set[asyncio.Task] = set()

    async def one(scheduled: float, pool: asyncio.LifoQueue, measured: bool) -> None:
        nonlocal waiting
        waiting += 1
        conn = await pool.get()
        waiting -= 1
        try:
            status, kind = await _timed_request(conn, timeout_s)
        finally:
            pool.put_nowait(conn)
        if measured:
            w.record(scheduled, status, kind)

    next_at = time.monotonic()
    i = 0
    while True:
        next_at += rng.expovariate(rate)
        delay = next_at - time.monotonic()
        # behind schedule: still yield, so that answers are read while the arrivals catch up
        await asyncio.sleep(max(delay, 0.0))
        measured = w.admit(next_at)
        if measured is None:
            break
        w.m.sent += 1
        if waiting >= backlog:
            if measured:
                w.m.errors.append("client backlog")
            continue
        # uvloop's timers may fire up to a millisecond early: never count from before the request left
        task = asyncio.ensure_future(one(min(next_at, time.monotonic()), pools[i % len(pools)], measured))
        pending.add(task)
        task.add_done_callback(pending.discard)
        i += 1
    if pending:
        await asyncio.gather(*pending)
    for q in pools:
        while not q.empty():
            q.get_nowait().close()
    return await w.finish()


async def fetch(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """One GET on its own connection (for /metrics and readiness), inside the running loop."""
    conn = Connection(make_target(url))
    try:
        return await _within(conn.request(), timeout_s)
    finally:
        conn.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it comes with uvicorn[standard]): less client CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro):
    """Run one load coroutine to completion on a fresh (uv)loop."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
