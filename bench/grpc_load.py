"""A closed-loop KServe v2 gRPC load (wrk speaks only HTTP/1.1): `concurrency` calls always in flight, each a
pre-serialized ModelInferRequest, in a process of its own so its CPU stays out of the stack's and its event loop
out of the bench's. Reports what wrk.Result reports, counted the same way: completions in the window from
`ramp_s` after the start to the nominal end.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time

from bench.wrk import Result


def run(address: str, body: bytes, concurrency: int, duration_s: float, *, ramp_s: float = 0.0,
        timeout_s: float = 60.0) -> Result:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_run, (address, body, concurrency, duration_s, ramp_s, timeout_s))


def _run(address: str, body: bytes, concurrency: int, duration_s: float, ramp_s: float, timeout_s: float) -> Result:
    return asyncio.run(_load(address, body, concurrency, duration_s, ramp_s, timeout_s))


async def _load(address, body, concurrency, duration_s, ramp_s, timeout_s) -> Result:
    import grpc

    from neuronserve.server import grpc_messages as pb

    started = time.monotonic()
    end = started + duration_s
    done: list[tuple[float, float, bool]] = []      # (completion time, latency, ok)
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{pb.SERVICE}/ModelInfer")     # bytes in, bytes out

        async def client(i: int) -> None:
            await asyncio.sleep(ramp_s * i / concurrency)
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    await call(body, timeout=timeout_s)
                    ok = True
                except grpc.aio.AioRpcError as e:
                    ok = False
                    kind = "timeout" if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "status"
                    errors[kind] = errors.get(kind, 0) + 1
                t1 = time.monotonic()
                done.append((t1 - started, t1 - t0, ok))

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    latencies = sorted(lat for _, lat, _ in done)

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    window = [(t, ok) for t, _, ok in done if ramp_s <= t <= duration_s]
    window_s = max(duration_s - ramp_s, 1e-9)
    return Result(concurrency=concurrency, duration_s=elapsed, completed=len(done), errors=errors,
                  p50=pct(0.5), p90=pct(0.9), p99=pct(0.99), max=latencies[-1] if latencies else None,
                  mean=statistics.fmean(latencies) if latencies else None, started=started, ramp_s=ramp_s,
                  window_s=window_s, window_completed=len(window),
                  window_status_errors=sum(not ok for _, ok in window),
                  window_rate=sum(ok for _, ok in window) / window_s,
                  first_s=window[0][0] if window else None, last_s=window[-1][0] if window else None)
