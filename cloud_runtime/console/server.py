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
from yarl import URL
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
MAX_CONNECTIONS = 64      # open at once; more are closed on arrival
HEADER_TIMEOUT_S = 10.0   # a request's headers must be complete this soon after its first byte


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
        # a page polling every 2 s must not flood the log (access_log=None); a stop waits for requests briefly
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0, keepalive_timeout=15.0)
        server = None
        try:
            loop.run_until_complete(runner.setup())
            gate = _Gate(loop)
            server = loop.run_until_complete(loop.create_server(lambda: _Guarded(runner.server(), gate), sock=sock))
            ready.set()
            loop.run_forever()
        finally:
            ready.set()
            if server is not None:
                server.close()
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # -- the application ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=1024)  # nothing is ever uploaded
        for path, handler in (("/", self.index), ("/healthz", _healthz), ("/api/status", self.api_status),
                              ("/api/devices", self.api_devices), ("/api/rounds", self.api_rounds),
                              ("/metrics", self.metrics_page), ("/static/{name:.+}", _static)):
            app.router.add_get(path, handler, allow_head=False)
        app.on_response_prepare.append(_secure_headers)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.token is None or request.path == "/healthz":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        supplied = header[7:].strip() if header[:7].lower() == "bearer " else request.cookies.get(COOKIE)
        query = request.query.get("token")
        if query is not None and _same(query, self.token):  # a browser opens /?token=...: remembered in a cookie,
            rest = {k: v for k, v in request.query.items() if k != "token"}  # and dropped from the address bar
            response = web.HTTPFound(URL.build(path="/" + request.path.lstrip("/"), query=rest))  # never //host
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


# the page's files, listed once: a request names one of them or gets 404 (no paths are joined, so nothing
# outside static/ can be named, however the name is written)
STATIC_FILES = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


async def _static(request: web.Request) -> web.StreamResponse:
    path = STATIC_FILES.get(request.match_info["name"])
    if path is None or path.suffix not in STATIC_TYPES:
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Content-Type": STATIC_TYPES[path.suffix], "Cache-Control": "no-cache"})


class _Gate:
    """How many connections are open (one event loop: no lock)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.open = loop, 0


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol behind two limits, so that slow or idle clients cannot hold the runtime's sockets and
    file descriptors: at most :data:`MAX_CONNECTIONS` at once (more are closed at once), and a request's
    headers must be complete within :data:`HEADER_TIMEOUT_S` of its first byte (aiohttp has no such timeout;
    idle keep-alive connections are closed by its ``keepalive_timeout``)."""

    def __init__(self, inner: asyncio.Protocol, gate: _Gate):
        self.inner, self.gate = inner, gate
        self.transport = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""
        self.counted = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.gate.open >= MAX_CONNECTIONS:
            transport.abort()
            return
        self.gate.open += 1
        self.counted = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.tail + data
        end = buffer.rfind(b"\r\n\r\n")
        rest = buffer if end < 0 else buffer[end + 4:]
        if end >= 0 and self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if rest and self.timer is None:  # a request has begun: its headers must follow in time
            self.timer = self.gate.loop.call_later(HEADER_TIMEOUT_S, self.transport.abort)
        self.tail = rest[-3:]
        self.inner.data_received(data)

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.counted:
            self.gate.open -= 1
            self.counted = False
            self.inner.connection_lost(exc)

    def eof_received(self):
        return self.inner.eof_received() if self.counted else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"


def _same(a: str, b: str) -> bool:
    """Constant-time comparison (the configured token is printable ASCII: ``ConsoleConfig.check``)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


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
