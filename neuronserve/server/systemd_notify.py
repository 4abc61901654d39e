"""The worker's side of systemd's notify protocol (sd_notify(3)): READY=1, STATUS=, STOPPING=1, WATCHDOG=1.

Group units are Type=notify with NotifyAccess=all. gunicorn's master is the unit's main process, but only the
worker knows when every copy passed its warm-up and whether its event loop still turns. gunicorn's master would
send READY=1 itself as soon as it has bound its socket, so the gunicorn config's `on_starting` hook (run in the
master before that) hands the socket's address to the worker under another name. Without a socket (`neuronserve
up`, tests) every call does nothing.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("neuronserve.server")

WORKER_SOCKET = "NEURONSERVE_NOTIFY_SOCKET"


def on_starting(server) -> None:
    """gunicorn hook, in the master: keep NOTIFY_SOCKET from gunicorn's own READY=1, pass it to the worker."""
    address = os.environ.pop("NOTIFY_SOCKET", None)
    if address:
        os.environ[WORKER_SOCKET] = address


class Notifier:
    def __init__(self, address: str | None = None, watchdog_s: float | None = None):
        self.address = address
        # systemd restarts the unit when no WATCHDOG=1 came for this long
        self.watchdog_s = watchdog_s
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ=os.environ) -> "Notifier":
        """From the unit's environment. WATCHDOG_PID is not checked: it names gunicorn's master, and the
        worker's pings count for the unit as NotifyAccess=all."""
        address = environ.get(WORKER_SOCKET) or environ.get("NOTIFY_SOCKET") or None
        usec = environ.get("WATCHDOG_USEC", "")
        return cls(address, int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else None)

    @property
    def active(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> None:
        """Send `KEY=value` lines in one datagram; a lost message costs a status line, never the worker."""
        if not self.address:
            return
        # an abstract socket's name starts with '@' in the variable and with a NUL byte on the wire
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode("utf-8", "replace"), target)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", self.address, e)

    def ready(self, status: str) -> None:
        self.send("READY=1", _status(status))

    def status(self, status: str) -> None:
        self.send(_status(status))

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", _status(status))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> str:
    # one datagram line per assignment: a newline inside the text would start a bogus one
    return "STATUS=" + " ".join(text.split())
