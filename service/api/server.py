"""Run the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

First signal: readiness turns 503 and new requests are refused (503 `draining`), while requests that
arrived before it, queued or computing, finish (up to `ALIT_DRAIN_SECONDS`); then uvicorn stops.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from .. import logs, tracing
from ..settings import Settings
from .app import create_app

log = logging.getLogger("alit.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.fastapi_app = app
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        svc = getattr(self.fastapi_app.state, "svc", None)
        if self._drain_task is not None or svc is None:
            return super().handle_exit(sig, frame)  # second signal, or nothing to drain: stop now
        svc.start_draining()  # readiness and new requests turn 503 now, before the task first runs
        log.info("signal %s: draining (up to %.0fs)", sig, svc.settings.drain_seconds)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain(svc))

    async def _drain(self, svc) -> None:
        if not await svc.drain(svc.settings.drain_seconds):
            log.warning("drain timeout: %d requests still in flight", svc.inflight)
        self.should_exit = True


def serve(settings: Settings) -> None:
    logs.configure(settings.log_format, settings.log_level)
    tracing.configure()
    app = create_app(settings)
    # log_config=None: uvicorn's loggers keep the format set above; its access log is replaced by the
    # app's own (request ID and duration). loop/http "auto" pick uvloop and httptools (uvicorn[standard]).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=max(1, int(settings.drain_seconds)))
    try:
        DrainingServer(config, app).run()
    finally:
        tracing.shutdown()  # export the spans still buffered
