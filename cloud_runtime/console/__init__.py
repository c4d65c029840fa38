"""The operator's console: a live page, ``/metrics`` for Prometheus and a JSON status API (``docs/CONSOLE.md``).

:func:`start_console` serves a runtime's console on its own thread; ``views.py`` builds what it shows,
``metrics.py`` the Prometheus exposition, ``server.py`` the HTTP side (aiohttp), ``static/`` the page.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("edgefl.runtime")


def start_console(runtime):
    """Serve ``runtime``'s console as its ``cfg.console`` says; returns the server (``.url``, ``.stop()``) or
    None (disabled, or the address could not be bound: the run goes on without it, and ``report.json``'s
    ``run.console`` says why)."""
    from cloud_runtime.config import split_address
    from cloud_runtime.console.metrics import metrics_registry
    from cloud_runtime.console.server import ConsoleServer

    cfg = runtime.cfg.console
    if not cfg.enabled:
        runtime.console_info = {"enabled": False}
        return None
    host, port = split_address(cfg.address)
    token = cfg.token()  # read once (a file, or the environment)
    runtime.board.refresh(runtime, force=True)  # the first views, before anyone asks (called before serving)
    server = ConsoleServer(runtime.board, runtime.telemetry,
                           metrics_registry(runtime.board, runtime.telemetry, cfg.max_device_series), host, port,
                           token)
    try:
        url = server.start()
    except OSError as e:
        runtime.console_info = {"enabled": True, "address": cfg.address, "url": None, "error": str(e.strerror or e)}
        logger.error("console not started on %s: %s. The run goes on without it; set console.address (port 0: any "
                     "free port) or console.enabled: false", cfg.address, e.strerror or e)
        return None
    runtime.console_info = {"enabled": True, "address": cfg.address, "url": url, "token": token is not None}
    logger.info("console: %s  (Prometheus: %smetrics; JSON: %sapi/status)", url, url, url)
    return server
