"""`neuronserve up`: the rendered stack run in the foreground, for the demo, the tests and containers.

The same files `render` writes for systemd are written under a scratch root; each group runs its unit's exact
command (Plan.argv) with its unit's environment, and nginx runs in the foreground with a main config whose pid,
logs and temp paths all lie under the layout's state directory, so the host's nginx is never touched.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, IO

from neuronserve.errors import ServiceError
from neuronserve.layout import Layout
from neuronserve.plan import Plan, loopback
from neuronserve.measure.probe import wait_ready
from neuronserve.render import front_access_log, njs_module, render_files, template_env, write_files

# what a systemd service also gets from outside its unit; everything else comes from the group's env
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
LOG_TAIL_LINES = 30


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log: IO[bytes]


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if not found:
        raise ServiceError("nginx is not installed (Debian/Ubuntu: apt-get install nginx; RHEL: dnf install nginx)")
    return found


def front_main_conf(layout: Layout) -> Path:
    return layout.state_dir / "nginx.conf"


def render_front_main(layout: Layout) -> str:
    """nginx's main config for `up`: everything under the state directory, the front conf included."""
    user = pwd.getpwuid(0).pw_name if os.geteuid() == 0 else None
    return template_env(layout).get_template("nginx-main.conf.j2").render(
        state_dir=str(layout.state_dir), front_conf=str(layout.nginx_conf), user=user, njs_module=njs_module(),
        worker_processes=min(4, len(os.sched_getaffinity(0))))


def nginx_argv(layout: Layout, *extra: str) -> list[str]:
    return [nginx_binary(), "-p", str(layout.state_dir), "-c", str(front_main_conf(layout)),
            "-e", str(layout.state_dir / "nginx-error.log"), *extra]


def prepare_front(layout: Layout) -> None:
    """Write the main config, make the paths nginx writes to, and check the whole config with `nginx -t`."""
    for d in (layout.state_dir / "nginx-temp", front_access_log(layout).parent):
        d.mkdir(parents=True, exist_ok=True)
    write_files({front_main_conf(layout): render_front_main(layout)})
    result = subprocess.run(nginx_argv(layout, "-t", "-q"), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    if result.returncode != 0:
        problem = "\n".join(line for line in result.stderr.splitlines() if line.strip()) or f"rc {result.returncode}"
        raise ServiceError(f"nginx rejects the generated config ({front_main_conf(layout)}):\n{problem}")


def front_url_for(listen: str) -> str:
    """A URL a local client uses for nginx.listen ('0.0.0.0:8080', '[::]:8080', '8080', 'host:port')."""
    return f"http://{loopback(listen)}"


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gunicorn and nginx do
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port_block(count: int, start: int | None = None) -> int:
    """A base port with `count` consecutive free ports on 127.0.0.1 (groups listen on base_port + i).

    From `start` upwards when given (the demo's familiar 8080/8100), else wherever the kernel hands out a port.
    """
    candidates = range(start, 65000 - count) if start is not None else iter(lambda: _ephemeral(), None)
    for tries, base in enumerate(candidates):
        if tries >= 500:
            break
        if base + count <= 65000 and not any(_port_in_use("127.0.0.1", p) for p in range(base, base + count)):
            return base
    raise ServiceError(f"no {count} consecutive free port(s) on 127.0.0.1" + (f" from {start}" if start else ""))


def local_ports(groups: int, start: int | None = None) -> dict[str, dict]:
    """Free loopback ports for a stack of `groups` on one host, as config sections: {"server": {base_port,
    grpc_base_port}, "nginx": {listen, grpc_listen}}, all from one block of consecutive free ports."""
    base = free_port_block(2 * groups + 2, start)
    return {"server": {"base_port": base + 2, "grpc_base_port": base + 2 + groups},
            "nginx": {"listen": f"127.0.0.1:{base}", "grpc_listen": f"127.0.0.1:{base + 1}"}}


def _ephemeral() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Stack:
    """Every group of a plan plus the nginx front, as child processes of this one.

        with Stack(plan, layout) as stack:
            stack.wait_ready(300)
            httpx.post(stack.front_url + "/v2/models/emb/infer", ...)

    Leaving the block (or `stop()`) stops everything: SIGTERM, then SIGKILL to each process group after `grace_s`.
    """

    def __init__(self, plan: Plan, layout: Layout, *, nginx: bool | None = None, grace_s: float | None = None,
                 env: dict[str, str] | None = None):
        """`env`: more environment for every process (the bench points PYTHONPATH at another checkout)."""
        self.plan, self.layout, self.env = plan, layout, env or {}
        self.nginx = plan.config.nginx.enabled if nginx is None else nginx
        if self.nginx and not plan.config.nginx.enabled:
            raise ServiceError("nginx.enabled is false in the config: there is no front to start")
        self.grace_s = plan.config.server.graceful_timeout_s + 5 if grace_s is None else grace_s
        self.procs: list[_Proc] = []

    # ---------------------------------------------------------------- addresses and logs

    @property
    def group_urls(self) -> dict[str, str]:
        return {g.name: f"http://{g.address}" for g in self.plan.groups}

    @property
    def front_url(self) -> str | None:
        return front_url_for(self.plan.config.nginx.listen) if self.nginx else None

    @property
    def grpc_front(self) -> str | None:
        """host:port of the front's gRPC listener."""
        listen = self.plan.config.nginx.grpc_listen
        return loopback(listen) if self.nginx and listen else None

    @property
    def log_dir(self) -> Path:
        return self.layout.state_dir / "logs"

    def log_path(self, name: str) -> Path:
        """A group's stdout+stderr, or nginx's ('nginx')."""
        return self.log_dir / f"{name}.log"

    # ---------------------------------------------------------------- start, wait, stop

    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._check_ports()
        write_files(render_files(self.plan, self.layout))
        if self.nginx:
            prepare_front(self.layout)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        base = {**{k: os.environ[k] for k in PASS_ENV if k in os.environ}, **self.env}
        try:
            for g in self.plan.groups:
                self._spawn(g.name, self.plan.argv(g, self.layout), {**base, **self.plan.env(g, self.layout)})
            if self.nginx:
                self._spawn("nginx", nginx_argv(self.layout, "-g", "daemon off;"), base)
        except BaseException:
            self.stop()
            raise

    def _check_ports(self) -> None:
        wanted = [(g.name, "127.0.0.1", g.port) for g in self.plan.groups]
        wanted += [(f"{g.name} gRPC", "127.0.0.1", g.grpc_port) for g in self.plan.groups if g.grpc_port]
        if self.nginx:
            for listen in filter(None, (self.plan.config.nginx.listen, self.plan.config.nginx.grpc_listen)):
                host, _, port = listen.rpartition(":")
                wanted.append(("nginx", host.strip("[]") or "0.0.0.0", int(port)))
        busy = [f"{host}:{port} ({name})" for name, host, port in wanted if _port_in_use(host, port)]
        if busy:
            raise ServiceError(f"port(s) already in use: {', '.join(busy)}; stop what holds them, or change "
                               "server.base_port, server.grpc_base_port, nginx.listen or nginx.grpc_listen")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log_path = self.log_path(name)
        log = open(log_path, "ab")
        try:
            # own session: stop() can signal the whole process tree (gunicorn master + worker)
            popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.layout.state_dir, start_new_session=True)
        except OSError as e:
            log.close()
            raise ServiceError(f"cannot start {name} ({argv[0]}): {e.strerror or e}") from None
        self.procs.append(_Proc(name, popen, log_path, log))

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit code) of every process that is no longer running."""
        return [(p.name, p.popen.returncode) for p in self.procs if p.popen.poll() is not None]

    def _died(self, name: str, rc: int, what: str) -> ServiceError:
        return ServiceError(f"{name} exited with code {rc} {what}; last lines of {self.log_path(name)}:\n"
                            f"{_tail(self.log_path(name))}")

    def wait_ready(self, timeout: float = 300.0, *, progress: Callable[[str], None] | None = None) -> None:
        """Block until every group answers 200 on /v2/health/ready, then the front does too.

        Raises ServiceError, with the log tail of the culprit, when a process exits or time runs out.
        """
        def check() -> None:
            for name, rc in self.exited():
                raise self._died(name, rc, "before it was ready")

        urls = dict(self.group_urls)
        if self.nginx:
            urls["nginx"] = self.front_url
        pending = wait_ready(urls, timeout, check=check, progress=progress, last="nginx")
        if pending:
            tails = "\n".join(f"--- {n}: {self.log_path(n)}\n{_tail(self.log_path(n), 10)}" for n in pending)
            raise ServiceError(f"not ready after {timeout:g} s: {', '.join(pending)}\n{tails}")

    def stop(self) -> None:
        """SIGTERM every process (gunicorn and nginx both stop gracefully on it), SIGKILL what is left."""
        running = [p for p in self.procs if p.popen.poll() is None]
        for p in running:
            _signal_group(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for p in running:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            # the leader may be gone while a child it forked lingers in its group
            _signal_group(p.popen, signal.SIGKILL)
            p.popen.wait()
            p.log.close()
        self.procs = []

    def supervise(self, poll_s: float = 0.5) -> None:
        """Block while everything runs; raise ServiceError when a process exits on its own."""
        while True:
            for name, rc in self.exited():
                raise self._died(name, rc, "while serving")
            time.sleep(poll_s)


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)     # the process was started as its own group leader
    except (ProcessLookupError, PermissionError):
        pass


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def run(plan: Plan, layout: Layout, *, ready_timeout: float = 600.0, out: Callable[[str], None] = print) -> None:
    """`neuronserve up`: start, wait until ready, print where everything is, serve until Ctrl-C or SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)   # containers stop with SIGTERM
    try:
        with Stack(plan, layout) as stack:
            out(f"starting {len(plan.groups)} group(s) on {plan.host.backend}; logs in {stack.log_dir}")
            stack.wait_ready(ready_timeout, progress=lambda line: out(f"  {line}"))
            out(f"{'GROUP':<24} {'CORES':<10} {'URL':<24} LOG")
            for g in plan.groups:
                out(f"{g.name:<24} {g.core_list:<10} {stack.group_urls[g.name]:<24} {stack.log_path(g.name)}")
            if stack.front_url:
                out(f"front: {stack.front_url} (nginx, log {stack.log_path('nginx')})")
            out("serving; Ctrl-C stops everything")
            stack.supervise()
    except KeyboardInterrupt:
        out("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
