"""Closed-loop load with wrk (Debian's `wrk`): C connections, each sends its next request when the answer came.

wrk is used rather than a Python client because on a 2-core host the client competes with the servers for the
same CPUs, and wrk spends a few microseconds per request where an asyncio client spends tens. A generated Lua
script gives each wrk thread its own target (the baseline has one port per core and no front, so its clients
spread themselves over the ports, as the original benchmark's did), cycles through pre-formatted requests
(one per model copy for the baseline), and prints one JSON line with the counts and latency percentiles.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: str = ""
    content_type: str = ""


@dataclass(frozen=True)
class Target:
    """One server address and the requests each connection to it cycles through."""

    url: str                        # http://host:port
    requests: tuple[Request, ...]


@dataclass
class Result:
    """One load level as wrk saw it. Latencies in seconds, over every completed response."""

    concurrency: int
    duration_s: float
    completed: int
    errors: dict[str, int]          # connect, read, write, status (non-2xx/3xx), timeout
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    mean: float | None

    @property
    def ok(self) -> int:
        return self.completed - self.errors.get("status", 0)

    @property
    def throughput(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0


def _lua_str(s: str) -> str:
    """A Lua string literal: UTF-8 bytes, anything but plain ASCII as a three-digit decimal escape."""
    safe = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 /?=&%_.:-{}\"+,")
    return "'" + "".join(chr(b) if b in safe else f"\\{b:03d}" for b in s.encode()) + "'"


def lua_script(targets: list[Target]) -> str:
    """The wrk script: thread i loads targets[i % len(targets)], cycling through its requests."""
    entries = []
    for t in targets:
        parts = urlsplit(t.url)
        reqs = []
        for r in t.requests:
            headers = "{" + (f"['Content-Type']={_lua_str(r.content_type)}" if r.content_type else "") + "}"
            reqs.append(f"{{{_lua_str(r.method)}, {_lua_str(r.path)}, {headers}, {_lua_str(r.body)}}}")
        entries.append(f"{{host={_lua_str(parts.hostname)}, port={_lua_str(str(parts.port or 80))}, "
                       f"reqs={{{', '.join(reqs)}}}}}")
    return _LUA.replace("@TARGETS@", ",\n  ".join(entries))


_LUA = r"""
local targets = {
  @TARGETS@
}
local created = 0

function setup(thread)
  local i = created % #targets + 1
  created = created + 1
  local t = targets[i]
  thread.addr = wrk.lookup(t.host, t.port)[1]
  thread:set("target", i)
end

function init(args)
  local t = targets[target]
  reqs = {}
  for k, r in ipairs(t.reqs) do
    local headers = r[3]
    headers["Host"] = t.host .. ":" .. t.port
    reqs[k] = wrk.format(r[1], r[2], headers, r[4] ~= "" and r[4] or nil)
  end
  nreq = #reqs
  at = 0
end

function request()
  at = at % nreq + 1
  return reqs[at]
end

function done(summary, latency, requests)
  local e = summary.errors
  local out = string.format(
    '{"duration_us": %d, "requests": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d}, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean)
  io.write("WRK-RESULT " .. out .. "\n")
end
"""


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed: apt-get install wrk (`make bench` installs it)")
    return found


def parse_output(text: str, concurrency: int) -> Result:
    line = next((ln for ln in text.splitlines() if ln.startswith("WRK-RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{text[-2000:]}")
    d = json.loads(line[len("WRK-RESULT "):])
    completed = d["requests"]

    def s(key):
        return d[key] / 1e6 if completed else None

    return Result(concurrency=concurrency, duration_s=d["duration_us"] / 1e6, completed=completed,
                  errors={k: v for k, v in d["errors"].items() if v}, p50=s("p50_us"), p90=s("p90_us"),
                  p99=s("p99_us"), max=s("max_us"), mean=s("mean_us"))


def run(targets: list[Target], concurrency: int, duration_s: float, *, timeout_s: float = 60.0,
        threads: int | None = None) -> Result:
    """One closed-loop level: `concurrency` connections for `duration_s` seconds."""
    if concurrency < 1:
        raise ValueError("concurrency is at least 1")
    # a wrk thread talks to one address: one thread per target (two for a single front), never more threads
    # than connections (at concurrency 1 only the first target is loaded: a lone client)
    threads = min(concurrency, threads or (len(targets) if len(targets) > 1 else 2))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua_script(targets))
        script = f.name
    try:
        argv = [wrk_binary(), "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(duration_s))}s",
                "--timeout", f"{timeout_s:g}s", "-s", script, targets[0].url]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    finally:
        Path(script).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed (rc {proc.returncode}): {proc.stderr.strip() or proc.stdout[-500:]}")
    return parse_output(proc.stdout, concurrency)
