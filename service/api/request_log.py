"""Who a request is and what became of it: the `X-Request-ID` it carries and its access-log line.

Pure ASGI middleware, the outermost of the app's own: takes the caller's `X-Request-ID` when it is
1-128 characters of `A-Z a-z 0-9 . _ : -` (else makes one), holds it in `logs.REQUEST_ID` for the
request's duration (so every log line, error body and span of the request carries it), echoes it
on the response (errors included), and writes one access-log line: method, path, status, duration.
"""

from __future__ import annotations

import logging
import os
import re
import time

from .. import logs, tracing
from . import errors

HEADER = b"x-request-id"
_VALID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
access_log = logging.getLogger("alit.access")


def new_request_id() -> str:
    return os.urandom(16).hex()


class RequestLog:
    def __init__(self, app, access: bool = True):
        self.app = app
        self.access = access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = None
        for k, v in scope["headers"]:
            if k == HEADER:
                given = v
                break
        rid = given.decode() if given is not None and _VALID.fullmatch(given) else new_request_id()
        token = logs.REQUEST_ID.set(rid)
        tracing.tag_request(rid)
        raw = rid.encode()
        status, responded = 500, False
        t0 = time.perf_counter()

        async def send_with_id(msg):
            nonlocal status, responded
            if msg["type"] == "http.response.start":
                responded, status = True, msg["status"]
                msg["headers"] = [*msg.get("headers", ()), (HEADER, raw)]
            await send(msg)

        try:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:  # a bug: answered here, inside the request's context, with its ID
                if responded:
                    raise
                await errors.error_response(exc)(scope, receive, send_with_id)
        finally:
            if self.access and access_log.isEnabledFor(logging.INFO):
                ms = (time.perf_counter() - t0) * 1e3
                method, path = scope.get("method", ""), scope.get("path", "")
                access_log.info("%s %s %d %.1fms", method, path, status, ms,
                                extra={"method": method, "path": path, "status": status, "duration_ms": round(ms, 2)})
            logs.REQUEST_ID.reset(token)
