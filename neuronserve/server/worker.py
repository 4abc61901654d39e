"""The gunicorn worker class every group runs (gunicorn -k neuronserve.server.worker.Worker): uvicorn's, set up
for serving behind nginx."""
from __future__ import annotations

from uvicorn_worker import UvicornWorker


class Worker(UvicornWorker):
    """UvicornWorker without uvicorn's proxy-headers middleware: nginx in front sends X-Forwarded-For, but nothing
    in the app reads the client's address (no access log), and parsing the header on every request took 4 % of
    the event loop's CPU on a small model."""

    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "proxy_headers": False}
