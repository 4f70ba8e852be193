"""The FastAPI application: wiring of model, engine, cache and routes; lifecycle; body limits."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import tracing
from ..cache import make_cache
from ..engine import Engine, EngineInterface, Limits, Target
from ..imaging import ImageLimits
from ..metrics import Metrics
from ..model.checkpoint import LoadedModel
from ..model.registry import resolve
from ..settings import Settings, engine_settings, model_id
from . import errors
from .auth import KeyStore
from .cached_tokenize import TokenizePipeline
from .draining import stamp_arrival
from .intake import DecodeBudget, Intake
from .request_log import RequestLog
from .routes import router

log = logging.getLogger("alit.api")
ENDPOINTS = {"/v1/tokenize", "/v1/reconstruct", "/tokenize", "/reconstruct", "/v1/models", "/healthz", "/readyz",
             "/metrics", "/", "/openapi.json", "/docs"}


@dataclass
class ServedModel:
    """One served model: its engine (its own workers and scheduler on every device), its cached
    tokenize path and its image intake (preprocessing at its input size)."""

    id: str
    loaded: LoadedModel
    engine: EngineInterface
    pipeline: TokenizePipeline
    intake: Intake

    @property
    def ref(self) -> dict:
        """How responses name it."""
        return {"id": self.id, "family": self.loaded.family.name, "fingerprint": self.loaded.fingerprint}

    @property
    def limits(self) -> Limits:
        return self.engine.limits


@dataclass
class ServiceState:
    settings: Settings
    models: dict[str, ServedModel]  # by id, the default first
    cache: object
    default_target: Target
    metrics: Metrics
    draining: bool = False
    drain_started: float = float("inf")
    inflight: int = 0

    @property
    def default(self) -> ServedModel:
        return next(iter(self.models.values()))

    def model(self, name: str | None) -> ServedModel:
        """The served model a request names (None: the default), else 404 `model_not_found`."""
        if name is None:
            return self.default
        found = self.models.get(name)
        if found is None:
            served = list(self.models)
            raise errors.ApiError(404, "model_not_found", f"model {name!r} is not served here; served: "
                                  f"{', '.join(served)}", {"field": "model", "served": served})
        return found

    @property
    def engines(self) -> list[EngineInterface]:
        return [m.engine for m in self.models.values()]

    @property
    def ready(self) -> bool:
        """Every model's engine started, warm, healthy and accepting."""
        return all(e.ready for e in self.engines)

    @property
    def live(self) -> bool:
        return all(e.live for e in self.engines)

    @property
    def busy(self) -> bool:
        return any(e.busy for e in self.engines)

    @property
    def problem(self) -> str:
        """Why not ready, model by model ("" when ready)."""
        return "; ".join(f"{m.id}: {m.engine.problem}" for m in self.models.values() if m.engine.problem)

    def shutdown(self) -> None:
        for e in self.engines:
            e.shutdown()

    def start_draining(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()

    async def drain(self, timeout: float) -> bool:
        """After a shutdown signal: refuse new requests, let the ones received before it finish
        (they may still hand work to an engine: a tokenize, then its reconstruction), then drain
        every engine (`engine.drain`: it takes no more work, finishes what it holds, and fails what
        is left at the timeout, so those requests are answered 503 `draining`). A dead engine
        worker ends the wait at once: its requests could never finish.
        True when everything finished within `timeout` seconds."""
        self.start_draining()
        deadline = time.monotonic() + timeout
        await asyncio.sleep(0.05)  # let requests that were just accepted register
        while self.inflight > 0 and self.live and time.monotonic() < deadline:  # HTTP requests
            await asyncio.sleep(0.05)
        done = await asyncio.gather(*(e.drain(max(0.0, deadline - time.monotonic())) for e in self.engines))
        return all(done) and self.inflight == 0


def build_state(settings: Settings) -> ServiceState:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    loaded = [(name, resolve(spec, heads=settings.heads)) for name, spec in settings.model_specs()]
    for _, lm in loaded:
        lm.model.retry_stricter = settings.retry_stricter  # conditioned families; the rest ignore it
    limits = [lm.limits for _, lm in loaded]
    metrics = Metrics(max_probes=max(li.max_probes for li in limits), max_batch=settings.max_batch,
                      token_buckets=tuple(sorted({b for li in limits for b in li.token_buckets()})))
    cache = make_cache(settings.redis_url, prefix=settings.cache_prefix, ttl_s=settings.cache_ttl_s,
                       max_entries=settings.cache_max_entries)
    cache.on_error = metrics.cache_errors.inc
    metrics.cache_available.set_function(lambda: 1.0 if cache.available else 0.0)
    budget = DecodeBudget(settings.decode_memory_mb * 1024 * 1024, metrics.decode_inflight)  # shared by all models
    image_limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    models: dict[str, ServedModel] = {}
    for name, lm in loaded:
        mid = name or model_id(lm)
        if mid in models:
            raise ValueError(f"two models would be served as {mid!r}: name them with ALIT_MODELS=ID=SPEC,...")
        metrics.model_info.labels(mid).info({"id": mid, "family": lm.family.name, "fingerprint": lm.fingerprint,
                                             "image_size": str(lm.limits.img_size),  # no paths: /metrics is public
                                             "max_tokens": str(lm.limits.max_tokens)})
        engine = _engine(settings, lm, metrics.observer(mid), triton_model=name or "alit")
        metrics.devices = sorted({*metrics.devices, *(w.device for w in engine.workers)})
        pipeline = TokenizePipeline(engine, cache, lm.limits.variant(settings.halting), observer=metrics,
                                    lease_ttl_s=settings.cache_lease_s)
        intake = Intake(image_limits, lm.limits.img_size, settings.decode_scale, budget, keyer=pipeline.key,
                        memo_entries=settings.input_memo_entries, resample=lm.limits.resample)
        models[mid] = ServedModel(mid, lm, engine, pipeline, intake)
    return ServiceState(settings, models, cache, Target(max_l1=settings.default_max_l1), metrics)


def _engine(settings: Settings, loaded: LoadedModel, observer, triton_model: str) -> EngineInterface:
    """A model's engine: in-process workers, or (ALIT_ENGINE=triton) the Triton model of that name."""
    if settings.engine == "triton":  # Triton tokenizes; this process keeps cache, auth, limits, /reconstruct
        from ..engine.triton_client import TritonEngine

        local = engine_settings(settings, devices="cpu")
        local.warmup = False
        return TritonEngine(loaded, settings.triton_url, model_name=triton_model, local=local,
                            observer=observer).start()
    in_process = Engine(loaded, engine_settings(settings), observer=observer).start()
    if settings.fault_injection:  # tests only; the in-process engine's model calls
        in_process.set_fault_hook(_inject_fault)
    return in_process


def _load_in_background(app: FastAPI, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
    """Build the service state off the event loop; publish it (or the failure) on the loop."""
    try:
        svc = build_state(settings)
    except Exception as e:  # start-up failed: the server exits non-zero with this message
        log.exception("start-up failed")
        loop.call_soon_threadsafe(setattr, app.state, "startup_error", f"{type(e).__name__}: {e}")
        return

    def publish():
        if app.state.stopping:  # a shutdown signal arrived while loading: do not start serving
            threading.Thread(target=svc.shutdown, daemon=True).start()
            return
        app.state.svc = svc
        for m in svc.models.values():
            log.info("ready: model %s (%s, %s)", m.id, m.loaded.family.name, m.loaded.fingerprint[:16])

    loop.call_soon_threadsafe(publish)


def _inject_fault(jobs) -> None:
    """ALIT_FAULT_INJECTION (tests only): every model call holding a job tagged "fault" raises."""
    if any(j.tag == "fault" for j in jobs):
        raise RuntimeError("injected fault (X-Alit-Fault: step)")


class BodyTooLarge(StarletteHTTPException):
    """Raised while a streamed body is read; an HTTPException so every layer passes it through."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes")


class RequestGuard:
    """Pure ASGI middleware: body size limit (declared or streamed), in-flight count, arrival time."""

    def __init__(self, app, fastapi_app: FastAPI):
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        svc = getattr(self.fastapi_app.state, "svc", None)
        limit = self.fastapi_app.state.settings.max_body_bytes
        stamp_arrival(scope)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            if svc is not None:
                svc.metrics.request(scope.get("path", "") if scope.get("path") in ENDPOINTS else "other", 413, 0.0)
            return await _send_413(send, limit)
        received, status = 0, None
        started = time.perf_counter()

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return msg

        async def guarded_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        if svc is not None:
            svc.inflight += 1
        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if status is None:
                status = 413
                await _send_413(send, limit)
        finally:
            if svc is not None:
                svc.inflight -= 1
                path = scope.get("path", "")
                svc.metrics.request(path if path in ENDPOINTS else "other", status or 500,
                                    time.perf_counter() - started)


async def _send_413(send, limit: int) -> None:
    body = json.dumps(errors.error_body("body_too_large", f"request body exceeds {limit} bytes")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The port opens at once: the model loads and warms on a daemon thread (so a shutdown during
        # start-up never waits for it); /readyz says `starting` until app.state.svc is set.
        loop = asyncio.get_running_loop()
        threading.Thread(target=_load_in_background, args=(app, settings, loop), name="alit-load", daemon=True).start()
        try:
            yield
        finally:
            svc = app.state.svc
            if svc is not None:
                svc.shutdown()
                await svc.cache.close()

    app = FastAPI(
        title="alit-serve", version="0.1.0", lifespan=lifespan,
        description="Adaptive-length image tokenization (ALIT): images in, the shortest token sequence "
                    "meeting each image's quality target out; tokens in, images out.",
    )
    app.state.settings = settings
    app.state.svc = None  # set by the background load; None = starting
    app.state.startup_error = ""  # why the background load failed ("" while fine)
    app.state.stopping = False  # set by the server on the first shutdown signal
    app.state.keys = KeyStore.from_settings(settings)
    errors.install(app)
    app.include_router(router)
    if settings.demo_page:
        from .demo import router as demo_router

        app.include_router(demo_router)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Timeout", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(RequestGuard, fastapi_app=app)
    app.add_middleware(RequestLog, access=settings.access_log)  # outermost of ours: the ID covers every answer
    tracing.instrument(app)  # the request span (when OTEL_TRACES_EXPORTER is set), outside everything else
    _publish_manual_schemas(app)
    return app


def _publish_manual_schemas(app: FastAPI) -> None:
    """/v1/tokenize parses its body by content type, so FastAPI cannot see its two body models
    (multipart form and JSON); their schemas are generated from the pydantic models and added."""
    from fastapi.openapi.utils import get_openapi

    from .routes import BODY_MODELS

    def openapi():
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            comps = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in BODY_MODELS:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(schema.pop("$defs", {}))
                comps[model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # how FastAPI documents extending the schema
