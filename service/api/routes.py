"""HTTP endpoints: /v1/tokenize, /v1/reconstruct, /v1/models, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import Any, cast

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import tracing
from ..engine import DeadlineExceeded, IterationRecord, Target
from ..imaging import to_png
from ..metrics import starting_exposition
from ..model.registry import preset_name_of
from .auth import require_key
from .cached_tokenize import Outcome
from .draining import not_draining
from .errors import ERROR_RESPONSES, ApiError, ClientGone, error_body, to_api_error
from .schemas import (
    ErrorResponse,
    ModelList,
    ReconstructJSON,
    ReconstructResponse,
    TargetSpec,
    TokenizeForm,
    TokenizeJSON,
    TokenizeResponse,
)

router = APIRouter()
log = logging.getLogger("alit.api")
ERRORS: dict[int | str, dict[str, Any]] = {code: {**v, "model": ErrorResponse} for code, v in ERROR_RESPONSES.items()}
TOKENIZE_BODY = {  # the route reads its body by content type, so FastAPI cannot infer it; both are pydantic models
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/TokenizeForm"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/TokenizeJSON"}},
        },
    }
}
BODY_MODELS = (TokenizeForm, TokenizeJSON)  # published in components/schemas by app.py


def _state(request: Request):
    svc = request.app.state.svc
    if svc is None:  # the model is still loading (the port opens before it is ready)
        raise ApiError(503, "starting", "the model is loading; retry shortly", None, {"Retry-After": "5"})
    return svc


# ----- parsing ---------------------------------------------------------------------------------------


def _deadline(request: Request) -> float:
    svc = _state(request)
    timeout = svc.settings.request_timeout_s
    raw = request.headers.get("x-request-timeout")
    if raw is not None:
        try:
            asked = float(raw)
        except ValueError:
            raise ApiError(422, "invalid_request", f"X-Request-Timeout must be a number of seconds, got {raw!r}",
                           {"field": "X-Request-Timeout"}) from None
        if not asked > 0:
            raise ApiError(422, "invalid_request", "X-Request-Timeout must be positive", {"field": "X-Request-Timeout"})
        timeout = min(timeout, asked)  # a client may shorten the deadline, not extend it
    return time.monotonic() + timeout


_FLAG = TypeAdapter(bool)


def _query_flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value in (None, ""):
        return False
    try:
        return _FLAG.validate_python(value)
    except ValidationError:
        raise ApiError(422, "invalid_request", f"{name}: expected true or false, got {value!r}",
                       {"field": name}) from None


def _form_error(e: ValidationError) -> ApiError:
    """The first problem of a multipart form, named by its field (a target field's is `invalid_target`)."""
    err = e.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or "file"
    if err.get("type") == "extra_forbidden":
        known = ", ".join(TokenizeForm.model_fields)
        return ApiError(422, "invalid_request", f"{field}: unknown form field (known: {known})", {"field": field})
    if field == "file":
        return ApiError(422, "invalid_request", "file: a multipart field named 'file' holding the image is required",
                        {"field": "file"})
    code = "invalid_target" if field in TargetSpec.model_fields else "invalid_request"
    return ApiError(422, code, f"{field}: {err.get('msg')}, got {err.get('input')!r}", {"field": field})


def _json_error(e: ValidationError) -> ApiError:
    errs = e.errors()
    field = ".".join(str(p) for p in errs[0].get("loc", ()))
    return ApiError(422, "invalid_request", f"{field}: {errs[0].get('msg')}",
                    [{"field": ".".join(str(p) for p in x.get("loc", ())), "message": x.get("msg")} for x in errs])


async def _parse_tokenize(request: Request) -> tuple[list[tuple[bytes, dict]], bool, bool, bool, str | None]:
    """(images as (bytes, target dict), include_reconstruction, all_iterations, stream, model)."""
    svc = _state(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=16)
        except StarletteHTTPException as e:
            if e.status_code == 413:
                raise
            raise ApiError(422, "invalid_request", f"malformed multipart body: {e.detail}") from None
        except Exception as e:
            raise ApiError(422, "invalid_request", f"malformed multipart body: {e}") from None
        try:  # an empty field is an absent one
            body = TokenizeForm.model_validate({k: v for k, v in form.items() if v != ""})
        except ValidationError as e:
            raise _form_error(e) from None
        data = await body.file.read()
        stream = body.stream or _query_flag(request, "stream")
        return [(data, body.target())], body.include_reconstruction, body.all_iterations, stream, body.model
    if ctype in ("application/json", ""):
        try:
            parsed = TokenizeJSON.model_validate_json(await request.body())
        except ValidationError as e:
            raise _json_error(e) from None
        if len(parsed.images) > svc.settings.max_batch_images:
            raise ApiError(413, "too_many_images", f"images: {len(parsed.images)} images; the limit per request is "
                           f"{svc.settings.max_batch_images}", {"field": "images"})
        items = []
        for i, item in enumerate(parsed.images):
            try:
                data = base64.b64decode(item.image, validate=True)
            except (binascii.Error, ValueError):
                field = f"images.{i}.image"
                raise ApiError(422, "invalid_base64", f"{field}: not valid base64", {"field": field}) from None
            items.append((data, item.target.model_dump(exclude_none=True) if item.target else {}))
        stream = parsed.stream or _query_flag(request, "stream")
        return items, parsed.include_reconstruction, parsed.all_iterations, stream, parsed.model
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {ctype!r} is not accepted: send multipart/form-data (field 'file') or "
                   "application/json")


# ----- tokenize --------------------------------------------------------------------------------------


def _iteration_json(model, rec: IterationRecord) -> dict:
    out = {"iteration": rec.iteration, "num_tokens": int(rec.token_ids.shape[0]),
           "token_ids": rec.token_ids.tolist(), "l1": rec.l1, "psnr": rec.psnr}
    if rec.positions is not None:
        out["positions"] = rec.positions.tolist()
    probe = model.limits.describe(rec.iteration)
    if probe:
        out["probe"] = probe
    return out


async def _result_json(model, out: Outcome, target: Target, include_reconstruction: bool, all_iterations: bool,
                       started: float, deadline: float) -> dict:
    rec = out.record
    res = {
        "token_ids": rec.token_ids.tolist(), "num_tokens": int(rec.token_ids.shape[0]),
        **({"positions": rec.positions.tolist()} if rec.positions is not None else {}),
        "iterations": out.iterations, "l1": rec.l1, "psnr": rec.psnr, "target_met": out.target_met,
        "cached": out.cached, "target": target.to_dict(),
        "timings": {"queue_ms": out.queue_s * 1e3, "compute_ms": out.compute_s * 1e3,
                    "total_ms": (time.monotonic() - started) * 1e3},
    }
    if include_reconstruction:
        with tracing.span("reconstruct", **{"alit.num_tokens": int(rec.token_ids.shape[0])}):
            (pixels,) = await model.engine.reconstruct([rec.token_ids], deadline=deadline, positions=[rec.positions])
        res["reconstruction_png"] = base64.b64encode(to_png(pixels)).decode()
    if all_iterations:
        res["all_iterations"] = [_iteration_json(model, r) for r in out.trajectory]
    return res


@router.post("/v1/tokenize", response_model=TokenizeResponse, tags=["tokenize"], openapi_extra=TOKENIZE_BODY,
             responses={**ERRORS, 200: {"content": {"application/x-ndjson": {}}, "description":
                        "JSON result, or with stream=true NDJSON events: `iteration` per iteration, then `result`"}},
             dependencies=[Depends(require_key), Depends(not_draining)])
async def tokenize(request: Request):
    """Tokenize images: the shortest token sequence whose reconstruction meets each image's target.

    Send one image as multipart/form-data (`file` plus optional target fields) or a batch as JSON
    with base64 images. `stream=true` answers with newline-delimited JSON events as iterations finish.
    """
    svc = _state(request)
    started = time.monotonic()
    deadline = _deadline(request)
    items, include_rec, all_iters, stream, name = await _parse_tokenize(request)
    model = svc.model(name)
    prepared = await model.intake.prepare(items, model.limits, svc.default_target)
    tag = "fault" if svc.settings.fault_injection and request.headers.get("x-alit-fault") == "step" else None
    if stream:
        return StreamingResponse(_stream(model, prepared, include_rec, all_iters, started, deadline),
                                 media_type="application/x-ndjson")

    async def one(img, target, key):
        out = await model.pipeline.tokenize(img, target, deadline, tag=tag, key=key)
        return await _result_json(model, out, target, include_rec, all_iters, started, deadline)

    results = await _unless_disconnected(request, asyncio.gather(*(one(*p) for p in prepared),
                                                                  return_exceptions=True), deadline)
    for r in results:  # the first failure decides the response; the rest finished or were cancelled
        if isinstance(r, BaseException):
            raise r
    return JSONResponse({"model": model.ref, "results": results})


DEADLINE_GRACE_S = 1.0  # past the deadline, time for the engine's own deadline answer to arrive


async def _unless_disconnected(request: Request, awaitable, deadline: float | None = None, poll_s: float = 0.25):
    """Await `awaitable`, cancelling it when the client goes away, so its images free their slots
    at the next engine step instead of computing for nobody — or once `deadline` (plus a grace) has
    passed, answered 504: no request outlives its deadline, whatever it is waiting on."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
            if deadline is not None and time.monotonic() > deadline + DEADLINE_GRACE_S:
                svc = request.app.state.svc
                log.warning("no answer by the request's deadline: cancelled (engines: %s, work held: %s)",
                            svc.problem or "ready", svc.busy)
                raise DeadlineExceeded("no answer within the request's deadline (ALIT_REQUEST_TIMEOUT_S or "
                                       "X-Request-Timeout)")
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(_retrieve)  # a cancelled gather ends with an exception nobody else reads


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def _stream(model, prepared, include_rec, all_iters, started, deadline):
    """NDJSON: `iteration` events as each image's iterations complete, then its `result`."""
    events: asyncio.Queue = asyncio.Queue()

    async def one(index: int, img, target, key):
        def progress(rec: IterationRecord):
            events.put_nowait({"event": "iteration", "index": index, **_iteration_json(model, rec)})

        try:
            out = await model.pipeline.tokenize(img, target, deadline, progress=progress, key=key)
            res = await _result_json(model, out, target, include_rec, all_iters, started, deadline)
            events.put_nowait({"event": "result", "index": index, "model": model.ref, **res})
        except Exception as e:
            err = to_api_error(e)
            events.put_nowait({"event": "error", "index": index, "status": err.status,
                               **error_body(err.code, err.message, err.detail)})

    tasks = [asyncio.create_task(one(i, *p)) for i, p in enumerate(prepared)]
    try:
        remaining = len(tasks)
        while remaining:
            ev = await events.get()
            if ev["event"] in ("result", "error"):
                remaining -= 1
            yield (json.dumps(ev) + "\n").encode()
    finally:
        for t in tasks:
            t.cancel()


# ----- reconstruct ----------------------------------------------------------------------------------


@router.post("/v1/reconstruct", response_model=ReconstructResponse, tags=["reconstruct"],
             responses={**ERRORS, 200: {"content": {"image/png": {}}, "description":
                        "JSON with base64 PNGs, or the PNG itself for one sequence with `Accept: image/png`"}},
             dependencies=[Depends(require_key), Depends(not_draining)])
async def reconstruct(body: ReconstructJSON, request: Request):
    """Token ids -> images. One sequence or a batch, of the lengths the model accepts (ALIT: a multiple
    of the tokens per iteration); for a model whose tokens carry positions (KARL), `positions` as
    `/v1/tokenize` returned them (absent: 0, 1, 2, ...)."""
    svc = _state(request)
    deadline = _deadline(request)
    model = svc.model(body.model)
    ids = body.token_ids
    single = not ids or not isinstance(ids[0], list)
    seqs = [cast(list[int], ids)] if single else cast(list[list[int]], ids)
    positions = _positions(body.positions, single, len(seqs))
    if len(seqs) > svc.settings.max_batch_images:
        raise ApiError(413, "too_many_images", f"token_ids: {len(seqs)} sequences; the limit per request is "
                       f"{svc.settings.max_batch_images}", {"field": "token_ids"})
    with tracing.span("reconstruct", **{"alit.sequences": len(seqs)}):
        pixels = await model.engine.reconstruct(seqs, deadline=deadline, positions=positions)  # validated there
    pngs = await asyncio.to_thread(lambda: [to_png(p) for p in pixels])
    if single and "image/png" in request.headers.get("accept", ""):
        return Response(pngs[0], media_type="image/png")
    return {"model": model.ref,
            "images": [{"num_tokens": len(s), "png": base64.b64encode(p).decode()} for s, p in zip(seqs, pngs)]}


def _positions(positions, single: bool, n: int) -> list | None:
    """A reconstruct body's `positions` as one list (or None) per sequence, shaped like `token_ids`."""
    if positions is None:
        return None
    nested = bool(positions) and isinstance(positions[0], list)
    if nested == single or (not single and len(positions) != n):
        raise ApiError(422, "invalid_request", "positions: must have the shape of token_ids (one list of positions "
                       "per sequence)", {"field": "positions"})
    return [positions] if single else list(positions)


# ----- models, health --------------------------------------------------------------------------------


@router.get("/v1/models", response_model=ModelList, tags=["models"],
            dependencies=[Depends(require_key), Depends(not_draining)])
async def models(request: Request):
    """Every served model: its family, limits and the targets it accepts (the first is the default)."""
    svc = _state(request)
    return {"object": "list", "data": [_model_info(svc, m, i == 0) for i, m in enumerate(svc.models.values())]}


def _model_info(svc, m, default: bool) -> dict:
    lm, li = m.loaded, m.limits
    return {
        "id": m.id, "family": lm.family.name, "default": default, "fingerprint": lm.fingerprint,
        "preset": preset_name_of(lm.config), "source": lm.source, "image_size": li.img_size,
        "max_tokens": li.max_tokens, "codebook_size": li.codebook_size, "accepts": list(li.accepts),
        "probe_name": list(li.probe_name),
        "token_positions": li.positional, "default_target": TargetSpec(**svc.default_target.to_dict()),
        "halting": svc.settings.halting if li.halting_applies() else None, **li.info(),
    }


@router.get("/metrics", tags=["ops"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format"}})
async def metrics(request: Request):
    """Prometheus metrics (see the README's metrics table); while the model loads, the process
    collectors only."""
    svc = request.app.state.svc
    body = svc.metrics.exposition() if svc is not None else starting_exposition()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", tags=["ops"], responses={503: {"model": ErrorResponse}})
async def healthz(request: Request):
    """Liveness: 200 from the moment the port opens (also while the model loads); 503 once a worker
    thread has died or start-up failed, so the orchestrator restarts the process."""
    state = request.app.state
    if state.startup_error:
        return JSONResponse(error_body("unhealthy", f"start-up failed: {state.startup_error}"), status_code=503)
    if state.svc is not None and not state.svc.live:
        why = state.svc.problem or "a worker thread died"
        return JSONResponse(error_body("unhealthy", why), status_code=503)
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], responses={503: {"model": ErrorResponse}})
async def readyz(request: Request):
    """Model loaded, workers warm and healthy, not draining."""
    svc = getattr(request.app.state, "svc", None)
    if svc is None:
        error = request.app.state.startup_error
        why = f"start-up failed: {error}" if error else "the model is loading"
        return JSONResponse(error_body("starting", why), status_code=503)
    if svc.draining:
        return JSONResponse(error_body("draining", "shutting down; finishing in-flight requests"), status_code=503)
    if not svc.ready:
        # each model's engine says why: a worker warming up, failing (with its last error) or dead; Triton unreachable
        why = svc.problem or "the engine is not ready"
        return JSONResponse(error_body("unhealthy", why), status_code=503)
    return {"status": "ready", "model": svc.default.ref, "models": [m.ref for m in svc.models.values()],
            "cache": {"backend": svc.cache.backend, "available": svc.cache.available}}


# unversioned aliases, as the mission names them (same handlers, same documentation)
router.add_api_route("/tokenize", tokenize, methods=["POST"], name="tokenize_unversioned", tags=["tokenize"],
                     response_model=TokenizeResponse, openapi_extra=TOKENIZE_BODY,
                     dependencies=[Depends(require_key), Depends(not_draining)],
                     responses={**ERRORS, 200: {"content": {"application/x-ndjson": {}}}})
router.add_api_route("/reconstruct", reconstruct, methods=["POST"], name="reconstruct_unversioned",
                     tags=["reconstruct"],
                     response_model=ReconstructResponse, dependencies=[Depends(require_key), Depends(not_draining)],
                     responses={**ERRORS, 200: {"content": {"image/png": {}}}})
