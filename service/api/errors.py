"""One error shape for every failure: `{"error": {"code", "message", "detail"}}`.

Client mistakes are 4xx naming the problem; overload is 503 with Retry-After; an expired deadline
is 504. A 500 only ever means a bug (or a failed inference step, which says so).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import DeadlineExceeded, EngineStopped, EngineUnavailable, QueueFull, StepFailed, TargetError
from ..imaging import ImageError
from ..logs import REQUEST_ID

log = logging.getLogger("alit.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, detail=None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.detail, self.headers = status, code, message, detail, headers


# What each ImageError code means in HTTP: limits are 413, formats 415, corrupt images 422.
IMAGE_ERROR_STATUS = {"empty_image": 422, "image_too_large": 413, "unsupported_image": 415, "invalid_image": 422}


class ClientGone(Exception):
    """The client closed the connection; its images were cancelled and left the engine."""


def error_body(code: str, message: str, detail=None) -> dict:
    return {"error": {"code": code, "message": message, "detail": detail, "request_id": REQUEST_ID.get()}}


def to_api_error(exc: Exception) -> ApiError:
    """Map any exception the API can meet to an ApiError (the one place that decides statuses)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TargetError):
        return ApiError(422, "invalid_tokens" if exc.field == "token_ids" else "invalid_target", str(exc),
                        {"field": exc.field})
    if isinstance(exc, ImageError):
        return ApiError(IMAGE_ERROR_STATUS[exc.code], exc.code, exc.message)
    if isinstance(exc, QueueFull):
        retry = max(1, math.ceil(exc.retry_after))
        return ApiError(503, "overloaded", str(exc), {"retry_after_s": retry}, {"Retry-After": str(retry)})
    if isinstance(exc, EngineStopped):
        return ApiError(503, "draining", str(exc), None, {"Retry-After": "5"})
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, "engine_unavailable", str(exc), None, {"Retry-After": "5"})
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", str(exc))
    if isinstance(exc, StepFailed):
        return ApiError(500, "inference_failed", str(exc))
    if isinstance(exc, ClientGone):  # nobody reads this answer; 499 as nginx logs it
        return ApiError(499, "client_closed_request", "the client closed the connection")
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, "internal_error", f"internal error ({type(exc).__name__}); this is a bug")


def error_response(exc: Exception) -> JSONResponse:
    e = to_api_error(exc)
    return JSONResponse(error_body(e.code, e.message, e.detail), status_code=e.status, headers=e.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return error_response(exc)

    for cls in (ApiError, TargetError, ImageError, QueueFull, EngineStopped, EngineUnavailable, DeadlineExceeded,
                StepFailed):
        app.add_exception_handler(cls, lambda request, exc: error_response(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"field": "", "message": "invalid request"}
        body = error_body("invalid_request", f"{first['field']}: {first['message']}", errors)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body": a client mistake like any other
            return JSONResponse(error_body("invalid_request", f"the request body cannot be parsed: {exc.detail}"),
                                status_code=422)
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "body_too_large",
                 415: "unsupported_media_type"}
        return JSONResponse(error_body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong API key", "model": None},
    404: {"description": "The request's `model` is not served (model_not_found; detail.served lists the ids)"},
    413: {"description": "Body or image too large"},
    415: {"description": "Not a supported image"},
    429: {"description": "The API key's rate limit is exceeded (Retry-After)"},
    422: {"description": "Invalid image, target (or one the model's family does not take), token ids, positions "
                        "or request field"},
    503: {"description": "Overloaded (Retry-After), draining, or the Triton engine unreachable"},
    504: {"description": "Deadline exceeded"},
}
