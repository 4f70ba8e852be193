"""API keys: `Authorization: Bearer <key>` (an HTTPBearer scheme, so OpenAPI documents it), keys from
`ALIT_API_KEYS` and/or a key file re-read when it changes, and an optional per-key rate limit.

Key file (`ALIT_API_KEYS_FILE`): one key per line, `NAME KEY` (a line with only a key is named
`line-N`); blank lines and `#` comments are ignored. The name labels the key's metrics and logs; the
key itself is held as a secret and never logged. The file is checked at most once a second (its
mtime, size and inode), so rotating a key is: add the new line, move callers over, delete the old
line — no restart. When the file is set, authentication is on even if it lists no key (an empty
file locks the API rather than opening it); an unreadable file keeps the last keys that were read.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from .errors import ApiError

log = logging.getLogger("alit.auth")
bearer = HTTPBearer(auto_error=False, scheme_name="api_key",
                    description="An API key, when keys are configured (ALIT_API_KEYS or ALIT_API_KEYS_FILE)")
CHECK_EVERY_S = 1.0


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: int
    tokens: float = field(init=False)
    last: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.tokens = float(self.burst)

    def take(self, now: float) -> float:
        """0 when a request may go now (a token is spent), else the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def parse_key_file(text: str) -> list[tuple[str, SecretStr]]:
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ValueError(f"line {n}: expected `NAME KEY` or `KEY`")
        name, key = (parts[0], parts[1]) if len(parts) == 2 else (f"line-{n}", parts[0])
        keys.append((name, SecretStr(key)))
    return keys


class KeyStore:
    def __init__(self, inline: list[str], path: str | None = None, rate: float | None = None, burst: int = 20):
        self.inline = [(f"env-{i + 1}", SecretStr(k)) for i, k in enumerate(inline)]
        self.path = path
        self.rate, self.burst = rate, burst
        self._from_file: list[tuple[str, SecretStr]] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()
        if path is not None:
            self._load(initial=True)

    @classmethod
    def from_settings(cls, s) -> KeyStore:
        return cls(s.key_list(), s.api_keys_file, s.rate_limit, s.rate_burst)

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self.inline)

    def _load(self, initial: bool = False) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            with open(self.path) as f:
                keys = parse_key_file(f.read())
        except (OSError, ValueError) as e:
            if initial:
                raise RuntimeError(f"ALIT_API_KEYS_FILE {self.path}: {e}") from None
            log.warning("API key file %s not re-read (%s); keeping the %d keys read before", self.path, e,
                        len(self._from_file))
            return
        self._from_file, self._stamp = keys, stamp
        log.info("API keys loaded from %s: %s", self.path, ", ".join(n for n, _ in keys) or "none")

    def keys(self) -> list[tuple[str, SecretStr]]:
        if self.path is not None:
            now = time.monotonic()
            if now - self._checked >= CHECK_EVERY_S:
                self._checked = now
                self._load()
        return self.inline + self._from_file

    def identify(self, token: str) -> str | None:
        """The name of the key `token` is, or None. Every key is compared (constant time per key)."""
        given, found = token.encode(), None
        for name, key in self.keys():
            if hmac.compare_digest(given, key.get_secret_value().encode()) and found is None:
                found = name
        return found

    def retry_after(self, name: str) -> float:
        """0 when the key may send a request now, else the seconds to wait (rate limit)."""
        if self.rate is None:
            return 0.0
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is None:
                bucket = self._buckets[name] = TokenBucket(self.rate, self.burst)
            return bucket.take(time.monotonic())


async def require_key(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    store: KeyStore = request.app.state.keys
    if not store.enabled:
        return
    if creds is None or not creds.credentials:
        raise ApiError(401, "unauthorized", "missing API key: send `Authorization: Bearer <key>`",
                       headers={"WWW-Authenticate": "Bearer"})
    name = store.identify(creds.credentials.strip())
    if name is None:
        raise ApiError(401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    wait = store.retry_after(name)
    svc = request.app.state.svc
    if svc is not None:
        svc.metrics.key_request(name, "rate_limited" if wait else "ok")
    if wait:
        retry = max(1, math.ceil(wait))
        raise ApiError(429, "rate_limited", f"rate limit of {store.rate:g} requests/s for key {name!r} exceeded",
                       {"retry_after_s": retry, "key_name": name}, {"Retry-After": str(retry)})
