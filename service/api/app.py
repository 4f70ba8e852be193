"""The FastAPI application: model lifecycle and the service's health endpoints."""

from __future__ import annotations

from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from ..config import Settings
from ..model.presets import preset_name_of
from ..model.registry import resolve


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        app.state.loaded = resolve(settings.model, heads=settings.heads)
        yield
        app.state.loaded = None

    app = FastAPI(title="alit-serve", version="0.1.0", lifespan=lifespan,
                  description="Adaptive-length image tokenization (ALIT) as a service.")
    app.state.loaded = None

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz():
        """The model is loaded and the service can take work."""
        if app.state.loaded is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "model": app.state.loaded.fingerprint[:16]}

    @app.get("/v1/models", tags=["models"])
    async def models() -> dict:
        lm = app.state.loaded
        c = lm.config
        return {"data": [{
            "id": preset_name_of(c) or "custom",
            "fingerprint": lm.fingerprint,
            "source": lm.source,
            "image_size": c.img_size,
            "tokens_per_iteration": c.tokens_per_iter,
            "max_tokens": c.max_tokens,
            "codebook_size": c.vq_codebook_size,
        }]}

    return app
