"""Closed-loop load with wrk (Debian's `wrk`): C connections, each sends its next request when the answer came.

wrk is used rather than a Python client because on a 2-core host the client competes with the servers for the
same CPUs, and wrk spends a few microseconds per request where an asyncio client spends tens. A generated Lua
script gives each wrk thread its own target (the baseline has one port per core and no front, so its clients
spread themselves over the ports, as the original benchmark's did), cycles through pre-formatted requests
(one per model copy for the baseline), and prints one JSON line with the counts and latency percentiles.

Throughput is counted in a window that leaves out the level's first `ramp_s` seconds. wrk's own figure,
completions over the whole run, is biased low in a closed loop against a batching server: nothing completes until
the first batch does (0.6 to 1.4 s for BERT-base on a CPU), a dead start that the in-process ceiling does not
have. Each wrk thread therefore notes, on its own clock (LuaJIT's ffi: wrk's Lua API has none), the responses
that complete inside the window; `done()` adds them up over the threads. wrk's latency percentiles still cover
every response of the run, the ramp included.

A batching server answers in bursts of a batch, and a plain count over the window moves by a whole burst when
one falls just inside or just outside an edge: four BERT-base items in about a hundred, 4 %. So the rate is the
least-squares slope of the cumulative count over the window instead, which weighs a completion d seconds from the
window's middle by 6 (W^2/4 - d^2) / W^3: these weights add up to the rate for any steady stream, and fall to
zero at the edges, where the bursts no longer matter. The plain count is kept beside it.
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
    """One load level as wrk saw it. Latencies in seconds, over every completed response of the run.

    The counts come twice: over wrk's whole run (`completed`, `errors`, `duration_s`), and over the measured
    window, from `ramp_s` after the level's start to its nominal end (`window_*`; first_s and last_s are the
    first and last completion in it, seconds after the start)."""

    concurrency: int
    duration_s: float
    completed: int
    errors: dict[str, int]          # connect, read, write, status (non-2xx/3xx), timeout
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    mean: float | None
    started: float                  # the level's start, on time.monotonic()'s clock (CLOCK_MONOTONIC)
    ramp_s: float
    window_s: float
    window_completed: int
    window_status_errors: int
    window_rate: float              # answered requests per second: the count's slope over the window
    first_s: float | None
    last_s: float | None

    @property
    def ok(self) -> int:
        return self.completed - self.errors.get("status", 0)

    @property
    def throughput(self) -> float:
        """Answered requests per second in the measured window."""
        return self.window_rate

    @property
    def throughput_whole(self) -> float:
        """wrk's own figure, over the whole run: biased low by the time to the first completion."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0


def _lua_str(s: str) -> str:
    """A Lua string literal: UTF-8 bytes, anything but plain ASCII as a three-digit decimal escape."""
    safe = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 /?=&%_.:-{}\"+,")
    return "'" + "".join(chr(b) if b in safe else f"\\{b:03d}" for b in s.encode()) + "'"


def lua_script(targets: list[Target], ramp_s: float = 0.0, end_s: float = 1.0) -> str:
    """The wrk script: thread i loads targets[i % len(targets)], cycling through its requests, and counts the
    responses that complete between ramp_s and end_s seconds after the level's start."""
    if not 0 <= ramp_s < end_s:
        raise ValueError(f"the measured window needs 0 <= ramp ({ramp_s:g} s) < end ({end_s:g} s)")
    entries = []
    for t in targets:
        parts = urlsplit(t.url)
        reqs = []
        for r in t.requests:
            headers = "{" + (f"['Content-Type']={_lua_str(r.content_type)}" if r.content_type else "") + "}"
            reqs.append(f"{{{_lua_str(r.method)}, {_lua_str(r.path)}, {headers}, {_lua_str(r.body)}}}")
        entries.append(f"{{host={_lua_str(parts.hostname)}, port={_lua_str(str(parts.port or 80))}, "
                       f"reqs={{{', '.join(reqs)}}}}}")
    return (_LUA.replace("@TARGETS@", ",\n  ".join(entries))
            .replace("@RAMP@", repr(float(ramp_s))).replace("@END@", repr(float(end_s))))


_LUA = r"""
local targets = {
  @TARGETS@
}
local ramp, level_end = @RAMP@, @END@

-- every Lua state (main and one per thread) gets its own clock; CLOCK_MONOTONIC (1) is one clock for the process
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local threads = {}

-- wrk calls setup (main state), then the thread's init, then starts the thread, one thread after the other, and
-- only then starts its own duration: the first setup is the level's start, and every thread runs past
-- start + level_end
function setup(thread)
  if #threads == 0 then started = now() end
  local i = #threads % #targets + 1
  table.insert(threads, thread)
  local t = targets[i]
  thread.addr = wrk.lookup(t.host, t.port)[1]
  thread:set("target", i)
  thread:set("started", started)
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
  -- The window is fixed in time, [start + ramp, start + level_end], rather than closed at the last completion: a
  -- saturated batching server answers in bursts of a batch, so a window that ends at a completion holds that
  -- burst but not the idle time before the next one, and overstates the rate by up to a batch time over the
  -- window. For the same reason it opens at a set time, not at the first completion.
  from, to = started + ramp, started + level_end
  -- the slope's weights (see bench/wrk.py): 6 (W^2/4 - d^2) / W^3
  middle, quarter, scale = (from + to) / 2, (to - from) ^ 2 / 4, 6 / (to - from) ^ 3
  counted, bad, first, last, rate = 0, 0, 0, 0, 0
end

function request()
  at = at % nreq + 1
  return reqs[at]
end

function response(status, headers, body)
  local t = now()
  if t >= from and t <= to then
    if counted == 0 then first = t end
    counted, last = counted + 1, t
    if status > 399 then
      bad = bad + 1                            -- wrk's own "status" error
    else
      local d = t - middle
      rate = rate + scale * (quarter - d * d)
    end
  end
end

local function num(x)
  return x and string.format("%.6f", x) or "null"
end

function done(summary, latency, requests)
  local n, nbad, rate, lo, hi = 0, 0, 0, nil, nil
  for _, thread in ipairs(threads) do
    local c = thread:get("counted")
    if c > 0 then
      local f, l = thread:get("first") - started, thread:get("last") - started
      n, nbad, rate = n + c, nbad + thread:get("bad"), rate + thread:get("rate")
      lo, hi = math.min(lo or f, f), math.max(hi or l, l)
    end
  end
  local e = summary.errors
  local out = string.format(
    '{"duration_us": %d, "requests": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d}, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, ' ..
    '"window": {"started": %s, "from_s": %s, "to_s": %s, "requests": %d, "status": %d, "rate": %.6f, ' ..
    '"first_s": %s, "last_s": %s}}',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    num(started), num(ramp), num(level_end), n, nbad, rate, num(lo), num(hi))
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

    w = d["window"]
    return Result(concurrency=concurrency, duration_s=d["duration_us"] / 1e6, completed=completed,
                  errors={k: v for k, v in d["errors"].items() if v}, p50=s("p50_us"), p90=s("p90_us"),
                  p99=s("p99_us"), max=s("max_us"), mean=s("mean_us"), started=w["started"],
                  ramp_s=w["from_s"],
                  window_s=w["to_s"] - w["from_s"], window_completed=w["requests"], window_status_errors=w["status"],
                  window_rate=w["rate"], first_s=w["first_s"], last_s=w["last_s"])


def run(targets: list[Target], concurrency: int, duration_s: float, *, ramp_s: float = 0.0,
        timeout_s: float = 60.0, threads: int | None = None) -> Result:
    """One closed-loop level: `concurrency` connections for `duration_s` seconds (whole seconds: wrk's -d),
    throughput counted from `ramp_s` on."""
    if concurrency < 1:
        raise ValueError("concurrency is at least 1")
    seconds = max(1, round(duration_s))
    script_text = lua_script(targets, ramp_s, seconds)
    # a wrk thread talks to one address: one thread per target (two for a single front), never more threads
    # than connections (at concurrency 1 only the first target is loaded: a lone client)
    threads = min(concurrency, threads or (len(targets) if len(targets) > 1 else 2))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script_text)
        script = f.name
    try:
        argv = [wrk_binary(), "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds}s",
                "--timeout", f"{timeout_s:g}s", "-s", script, targets[0].url]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    finally:
        Path(script).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed (rc {proc.returncode}): {proc.stderr.strip() or proc.stdout[-500:]}")
    return parse_output(proc.stdout, concurrency)
