"""Refusing requests that arrive after a shutdown signal, while those received before it finish.

The contract between two parts: `RequestGuard` (the outermost middleware, `app.py`) stamps every
request's arrival time with `stamp_arrival` before anything else runs, and the `not_draining`
dependency compares that stamp with the moment draining started. Both go through this module, so
the key they share is written in one place; a request without a stamp (the guard missing) counts as
arriving now, i.e. it is refused while draining rather than slipping through.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

from fastapi import Request

from .errors import ApiError

_ARRIVED = "alit_arrived"  # key in the ASGI scope's "state" dict


def stamp_arrival(scope: MutableMapping[str, Any]) -> None:
    """Record when the request arrived (time.monotonic())."""
    scope.setdefault("state", {})[_ARRIVED] = time.monotonic()


def arrival(request: Request) -> float:
    return request.scope.get("state", {}).get(_ARRIVED, time.monotonic())


async def not_draining(request: Request) -> None:
    """A route dependency: after a shutdown signal, new requests get 503 `draining`; earlier ones finish."""
    svc = request.app.state.svc
    if svc is not None and svc.draining and arrival(request) >= svc.drain_started:
        raise ApiError(503, "draining", "the server is shutting down; retry on another replica", None,
                       {"Retry-After": "5"})
