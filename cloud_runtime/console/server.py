"""The console's HTTP server: ``aiohttp`` on its own thread and event loop, read-only (``docs/CONSOLE.md``).

Routes (all ``GET``; any other method is answered 405):

- ``/``: the live console page (``static/index.html``, ``console.js``; uPlot vendored in ``static/vendor``);
- ``/api/status``, ``/api/devices``, ``/api/rounds``: the JSON the page itself reads;
- ``/metrics``: Prometheus exposition (``console/metrics.py``);
- ``/healthz``: ``ok`` (no token: for load balancers and probes).

With a token (``console.token_file`` or ``EDGEFL_CONSOLE_TOKEN``) every other route needs it: an
``Authorization: Bearer <token>`` header (Prometheus' ``authorization`` setting), or a browser's cookie,
set when the page is opened once as ``/?token=<token>``. Handlers only read what the serve thread
published (:class:`~cloud_runtime.console.views.StatusBoard`): nothing here can change the run.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import threading
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from cloud_runtime.console.views import WATCHED_S, QueryError, StatusBoard, query_devices
from cloud_runtime.telemetry import Telemetry

logger = logging.getLogger("edgefl.runtime")

STATIC = Path(__file__).parent / "static"
COOKIE = "edgefl_console"
SECURITY_HEADERS = {
    # the page loads nothing from elsewhere and runs no inline script: a device name or a rejection detail
    # (a sender's words) can never become code
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
}
EVENTS_SHOWN = 50


class ConsoleServer:
    """Serve ``board`` (views), ``telemetry`` (live phase, events) and ``metrics`` on ``host:port``."""

    def __init__(self, board: StatusBoard, telemetry: Telemetry, metrics: CollectorRegistry, host: str, port: int,
                 token: str | None = None):
        self.board, self.telemetry, self.metrics = board, telemetry, metrics
        self.host, self.port, self.token = host, port, token
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> str:
        """Bind (raises OSError when the address is taken or not local) and serve on a daemon thread;
        returns the console's URL."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        port = sock.getsockname()[1]
        host = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        self.url = f"http://{host}:{port}/"
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(sock, ready), name="console", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.url

    def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self.app(), access_log=None)  # a page polling every 2 s must not flood the log
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, sock).start())
            ready.set()
            loop.run_forever()
        finally:
            ready.set()
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # -- the application ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=1024)  # nothing is ever uploaded
        app.router.add_get("/", self.index)
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/api/devices", self.api_devices)
        app.router.add_get("/api/rounds", self.api_rounds)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_static("/static", STATIC, show_index=False, follow_symlinks=False)
        app.on_response_prepare.append(_secure_headers)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.token is None or request.path == "/healthz":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        supplied = header[7:].strip() if header.startswith("Bearer ") else request.cookies.get(COOKIE)
        query = request.query.get("token")
        if query is not None and _same(query, self.token):  # a browser opens /?token=...: remembered in a cookie,
            response = web.HTTPFound(request.rel_url.with_query({k: v for k, v in request.query.items() if k != "token"}))  # and dropped from the address bar
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict", path="/",
                                secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https")
            raise response
        if supplied is None or not _same(supplied, self.token):
            return web.json_response({"error": "this console needs its token: 'Authorization: Bearer <token>', or "
                                      "open /?token=<token> once in a browser"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="edgefl console"'})
        return await handler(request)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def views(self) -> dict:
        """The published views. When nobody read them lately they may be old: wait up to about a second for
        the serve thread to rebuild them (it does between messages; while it computes, the last ones are
        answered, with their ``as_of``)."""
        before, idle = self.board.as_of, time.monotonic() - self.board.last_read >= WATCHED_S
        self.board.read()
        if idle or not before:
            for _ in range(20):
                if self.board.as_of != before:
                    break
                await asyncio.sleep(0.05)
        return self.board.views

    async def api_status(self, request: web.Request) -> web.Response:
        views = await self.views()
        return _json({**views["status"], "phase": dict(self.telemetry.phase), "as_of": self.board.as_of,
                      "events": self.telemetry.recent(EVENTS_SHOWN)})

    async def api_devices(self, request: web.Request) -> web.Response:
        views = await self.views()
        try:
            page = query_devices(views["devices"], request.query)
        except QueryError as e:
            return web.json_response({"error": str(e)}, status=400)
        return _json({**page, "as_of": self.board.as_of})

    async def api_rounds(self, request: web.Request) -> web.Response:
        views = await self.views()
        return _json({"rounds": views["rounds"], "as_of": self.board.as_of})

    async def metrics_page(self, request: web.Request) -> web.Response:
        await self.views()
        encoder, content_type = choose_encoder(request.headers.get("Accept"))
        return web.Response(body=encoder(self.metrics), headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def _json(value) -> web.Response:
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError:  # a NaN loss, say: JSON has no NaN, the page shows null
        text = json.dumps(_finite(value), allow_nan=False)
    return web.Response(text=text, content_type="application/json")


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
