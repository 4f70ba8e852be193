"""Run the app under uvicorn: the port opens at once, a graceful drain on SIGTERM / SIGINT, a bounded exit.

Start-up: the weights are checked before the port opens (missing weights stop start-up with a
message naming what was tried); loading and warm-up then run in the background (`/healthz` 200,
`/readyz` 503 `starting`). A load that fails makes the process exit 1.

First signal: readiness turns 503 and new requests are refused (503 `draining`), while requests that
arrived before it, queued or computing, finish (up to `ALIT_DRAIN_SECONDS`); then uvicorn stops.
A second signal exits at once. Whatever happens, the process is gone `shutdown_bound(settings)`
seconds (`ALIT_DRAIN_SECONDS` + 10) after the first signal: the number grace periods must exceed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import uvicorn

from .. import logs, tracing
from ..settings import SHIPPED_WEIGHTS, Settings
from .app import create_app

log = logging.getLogger("alit.server")
SHUTDOWN_MARGIN_S = 10.0  # after the drain: uvicorn's connection close (5 s) and the engine's worker joins


def shutdown_bound(settings: Settings) -> float:
    """Worst-case seconds from the first shutdown signal to process exit (enforced by a watchdog)."""
    return settings.drain_seconds + SHUTDOWN_MARGIN_S


def models_problem(settings: Settings) -> str:
    """Why the configured models cannot be served ("" when they can): `ALIT_MODELS` malformed, or a
    spec naming no weights. Cheap checks before the port opens."""
    try:
        specs = settings.model_specs()
    except ValueError as e:
        return str(e)
    for name, spec in specs:
        problem = model_problem(spec, f"ALIT_MODELS {name}={spec}" if name else None)
        if problem:
            return problem
    return ""


def model_problem(spec: str, what: str | None = None) -> str:
    """Why `spec` cannot name weights ("" when it can): a cheap check before the port opens."""
    if spec.startswith("preset:"):
        return ""
    path = Path(spec)
    if path.is_file() or (path.is_dir() and any(any(path.glob(p)) for p in ("*.safetensors", "*.pth", "*.bin"))):
        return ""
    default = "the packaged default model (ALIT_MODEL unset)" if path == SHIPPED_WEIGHTS else f"ALIT_MODEL={spec}"
    what = what or default
    found = "a folder without a .safetensors, .pth or .bin file" if path.is_dir() else "no such file or folder"
    return (f"model weights not found: {what}; tried {path.resolve()}: {found}. Set ALIT_MODEL to a weights "
            "file or folder (or ALIT_MODELS=ID=PATH,...), or ALIT_MODEL=preset:NAME for random weights")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.fastapi_app = app
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        state = self.fastapi_app.state
        if not state.stopping:
            state.stopping = True
            bound = shutdown_bound(state.settings)
            watchdog = threading.Timer(bound, _exit_now, args=(bound,))
            watchdog.daemon = True
            watchdog.start()
        svc = state.svc
        if self._drain_task is not None or svc is None:
            return super().handle_exit(sig, frame)  # second signal, or nothing to drain: stop now
        svc.start_draining()  # readiness and new requests turn 503 now, before the task first runs
        log.info("signal %s: draining (up to %.0fs)", sig, svc.settings.drain_seconds)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain(svc))

    async def _drain(self, svc) -> None:
        if not await svc.drain(svc.settings.drain_seconds):
            log.warning("drain timeout: %d requests still in flight", svc.inflight)
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.fastapi_app.state.startup_error:  # the background load failed: stop serving
            return True
        return await super().on_tick(counter)


def _exit_now(bound: float) -> None:
    log.error("shutdown took longer than %.0fs: exiting now", bound)
    logging.shutdown()
    os._exit(1)


def serve(settings: Settings) -> None:
    problem = models_problem(settings)
    if problem:
        raise SystemExit(problem)
    logs.configure(settings.log_format, settings.log_level)
    tracing.configure()
    app = create_app(settings)
    # log_config=None: uvicorn's loggers keep the format set above; its access log is replaced by the
    # app's own (request ID and duration). loop/http "auto" pick uvloop and httptools (uvicorn[standard]).
    # The drain already waited for requests; what is left gets 5 s before uvicorn closes it.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        DrainingServer(config, app).run()
    finally:
        tracing.shutdown()  # export the spans still buffered
    if app.state.startup_error:
        raise SystemExit(f"start-up failed: {app.state.startup_error}")
