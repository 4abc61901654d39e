"""What a client or a neighbour on the network can reach, and what ends up in logs, on the real stack.

Bearer-token auth (401), the per-client rate limit (429) and the token never reaching a log are in
test_nginx_front.py; unit hardening (systemd-analyze security) in tests/unit/test_render.py and tests/systemd/.
"""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import httpx
import pytest

LISTEN = "0A"       # TCP_LISTEN in /proc/net/tcp*


def listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held open by one of `pids`."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != LISTEN or fields[9] not in inodes:
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


def tree(pid: int) -> list[int]:
    """The process and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except OSError:
            pass
    return out


def non_loopback_address() -> str | None:
    """An IPv4 address of this host other than 127.x, if it has one (the route a packet out would take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))         # TEST-NET-1: nothing is sent by a UDP connect
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")     # gRPC's sockets are dual-stack: 127.0.0.1 v4-mapped


def test_groups_listen_on_the_loopback_only(stack):
    for proc in stack.procs:
        sockets = listening(tree(proc.popen.pid))
        if proc.name == "nginx":
            fronts = (stack.plan.config.nginx.listen, stack.plan.config.nginx.grpc_listen)
            assert sockets == {(host, int(port)) for host, _, port in (f.rpartition(":") for f in fronts)}, sockets
        else:
            group = stack.plan.group(proc.name)
            assert {port for _, port in sockets} == {group.port, group.grpc_port}, (proc.name, sockets)
            assert all(host in LOOPBACK for host, _ in sockets), (proc.name, sockets)


def test_a_group_is_unreachable_from_another_address(stack):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this host has no address besides the loopback")
    for group in stack.plan.groups:
        for port in (group.port, group.grpc_port):
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=5).close()


def test_the_front_shows_no_version_nor_internals(stack):
    r = httpx.get(stack.front_url + "/v2/health/ready", timeout=10)
    assert r.status_code == 200 and r.headers["server"] == "nginx"      # server_tokens off
    for path in ("/openapi.json", "/docs", "/metrics", "/v2/models/emb/../../../etc/passwd", "/nginx_status"):
        r = httpx.get(stack.front_url + path, timeout=10)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert "openapi" not in r.text and "root:" not in r.text


def test_request_content_never_reaches_a_log(stack):
    marker = f"private-{uuid.uuid4().hex}"
    ok = httpx.post(stack.front_url + "/models/emb", json={"inputs": f"my {marker} text"}, timeout=30)
    refused = httpx.post(stack.front_url + "/v2/models/emb/infer", timeout=30, json={"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": [f"{marker} " * 40000]}]})
    bad = httpx.post(stack.front_url + "/models/emb", content=f'{{"inputs": ["{marker}", 5]}}', timeout=30)
    assert ok.status_code == 200 and refused.status_code == 413 and bad.status_code == 422
    logs = sorted(stack.layout.state_dir.rglob("*.log"))
    assert len(logs) >= 4           # nginx's error log, the front's access log, one per group
    for path in logs:
        assert marker not in path.read_text(errors="replace"), path
