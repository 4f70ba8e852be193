"""Python client for a running alit-serve (httpx; sync `Client` and async `AsyncClient`).

    from service.client import Client
    with Client("http://localhost:8000") as c:
        r = c.tokenize("photo.jpg", max_l1=0.05)       # dict: token_ids, num_tokens, l1, ...
        png = c.reconstruct(r["token_ids"])             # PNG bytes
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx


class AlitError(Exception):
    """An error answer from the server: HTTP status plus the service's error code and message."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.detail = status, code, message, detail


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        raise AlitError(resp.status_code, err["code"], err["message"], err.get("detail"))
    except (ValueError, KeyError, TypeError):
        raise AlitError(resp.status_code, "http_error", resp.text[:200]) from None


def _image_bytes(image: str | Path | bytes) -> bytes:
    return image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


def _tokenize_body(image, target: dict, include_reconstruction: bool, all_iterations: bool, stream: bool,
                   model: str | None = None) -> dict:
    model = target.pop("model", None) or model
    body = {"images": [{"image": base64.b64encode(_image_bytes(image)).decode(),
                        "target": {k: v for k, v in target.items() if v is not None} or None}],
            "include_reconstruction": include_reconstruction, "all_iterations": all_iterations, "stream": stream}
    return {**body, "model": model} if model else body


def _reconstruct_body(token_ids: list[int], positions: list[int] | None, model: str | None) -> dict:
    body: dict = {"token_ids": list(map(int, token_ids))}
    if positions is not None:
        body["positions"] = list(map(int, positions))
    if model:
        body["model"] = model
    return body


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def tokenize(self, image, *, max_l1: float | None = None, min_psnr: float | None = None,
                 tokens: int | None = None, max_tokens: int | None = None,
                 include_reconstruction: bool = False, all_iterations: bool = False, model: str | None = None) -> dict:
        """One image's result; `model` names a served model (absent: the server's default)."""
        target = {"max_l1": max_l1, "min_psnr": min_psnr, "tokens": tokens, "max_tokens": max_tokens}
        body = _tokenize_body(image, target, include_reconstruction, all_iterations, False, model)
        r = self._http.post("/v1/tokenize", json=body)
        _raise_for(r)
        return r.json()["results"][0]

    def tokenize_stream(self, image, **target) -> Iterator[dict]:
        """Yield the server's NDJSON events: one per iteration, then the result (`model=` names a model)."""
        with self._http.stream("POST", "/v1/tokenize", json=_tokenize_body(image, target, False, False, True)) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            for line in r.iter_lines():
                if line:
                    yield json.loads(line)

    def reconstruct(self, token_ids: list[int], positions: list[int] | None = None, model: str | None = None) -> bytes:
        """A PNG of the tokens (with the positions /v1/tokenize returned, for KARL)."""
        r = self._http.post("/v1/reconstruct", json=_reconstruct_body(token_ids, positions, model),
                            headers={"Accept": "image/png"})
        _raise_for(r)
        return r.content

    def models(self) -> dict:
        r = self._http.get("/v1/models")
        _raise_for(r)
        return r.json()


class AsyncClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def tokenize(self, image, *, max_l1: float | None = None, min_psnr: float | None = None,
                       tokens: int | None = None, max_tokens: int | None = None,
                       include_reconstruction: bool = False, all_iterations: bool = False,
                       model: str | None = None) -> dict:
        target = {"max_l1": max_l1, "min_psnr": min_psnr, "tokens": tokens, "max_tokens": max_tokens}
        r = await self._http.post("/v1/tokenize", json=_tokenize_body(image, target, include_reconstruction,
                                                                      all_iterations, False, model))
        _raise_for(r)
        return r.json()["results"][0]

    async def tokenize_stream(self, image, **target) -> AsyncIterator[dict]:
        body = _tokenize_body(image, target, False, False, True)
        async with self._http.stream("POST", "/v1/tokenize", json=body) as r:
            if r.status_code >= 400:
                await r.aread()
                _raise_for(r)
            async for line in r.aiter_lines():
                if line:
                    yield json.loads(line)

    async def reconstruct(self, token_ids: list[int], positions: list[int] | None = None,
                          model: str | None = None) -> bytes:
        r = await self._http.post("/v1/reconstruct", json=_reconstruct_body(token_ids, positions, model),
                                  headers={"Accept": "image/png"})
        _raise_for(r)
        return r.content
