"""API keys: rotation through the key file without a restart, per-key rate limit, OpenAPI scheme."""

from __future__ import annotations

import time

import httpx
import pytest

from service.api.auth import KeyStore, TokenBucket, parse_key_file


def _wait_for(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_rotating_a_key_in_the_file_takes_effect_without_a_restart(start_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# name key\nalice old-key-123\n")
    srv = start_server(api_keys_file=str(keys))
    pid = srv.proc.pid

    def status(key):
        return httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

    assert status("old-key-123") == 200 and status("new-key-456") == 401
    assert httpx.get(srv.url + "/v1/models").status_code == 401
    keys.write_text("alice new-key-456\n")  # rotation: the old key is gone, the new one is in
    assert _wait_for(lambda: status("new-key-456") == 200), "the new key was not picked up"
    assert status("old-key-123") == 401
    assert srv.proc.pid == pid and srv.proc.poll() is None  # same process, no restart
    # the per-key counter is labelled by the name, never the key
    text = httpx.get(srv.url + "/metrics").text
    assert 'alit_key_requests_total{key_name="alice",outcome="ok"}' in text
    assert "old-key" not in text and "new-key" not in text
    # a broken file keeps the keys read before (and the service up)
    keys.write_text("too many fields on this line\n")
    time.sleep(1.5)
    assert status("new-key-456") == 200
    # an empty file locks the API rather than opening it
    keys.write_text("")
    assert _wait_for(lambda: status("new-key-456") == 401)
    assert "new-key-456" not in srv.log.read_text() and "old-key-123" not in srv.log.read_text()


def test_rate_limit_answers_429_with_retry_after(start_server):
    srv = start_server(api_keys="k-one,k-two", rate_limit="0.5", rate_burst="2")
    h1, h2 = ({"Authorization": f"Bearer {k}"} for k in ("k-one", "k-two"))
    codes = [httpx.get(srv.url + "/v1/models", headers=h1).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = httpx.get(srv.url + "/v1/models", headers=h1)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 2
    assert httpx.get(srv.url + "/v1/models", headers=h2).status_code == 200  # another key has its own bucket
    assert srv.metric("alit_key_requests_total", key_name="env-1", outcome="rate_limited") == 2
    assert srv.metric("alit_key_requests_total", key_name="env-2", outcome="ok") == 1


def test_openapi_declares_the_bearer_scheme(start_server):
    srv = start_server(api_keys="k")
    spec = httpx.get(srv.url + "/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["api_key"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert {"api_key": []} in spec["paths"]["/v1/tokenize"]["post"]["security"]
    assert "429" in spec["paths"]["/v1/tokenize"]["post"]["responses"]


def test_token_bucket_and_key_file_parsing(tmp_path):
    b = TokenBucket(rate=2.0, burst=2)
    t = b.last
    assert b.take(t) == 0 and b.take(t) == 0
    assert b.take(t) == pytest.approx(0.5)
    assert b.take(t + 0.5) == 0  # one token back after 1/rate seconds
    keys = parse_key_file("# c\n\nbob  k1\nk2\n")
    assert [(n, k.get_secret_value()) for n, k in keys] == [("bob", "k1"), ("line-4", "k2")]
    assert "k1" not in repr(keys)  # held as secrets
    with pytest.raises(ValueError, match="line 1"):
        parse_key_file("a b c")
    f = tmp_path / "keys"
    f.write_text("x k1\n")
    store = KeyStore(["inline"], str(f))
    assert store.identify("k1") == "x" and store.identify("inline") == "env-1" and store.identify("nope") is None
    with pytest.raises(RuntimeError, match="ALIT_API_KEYS_FILE"):
        KeyStore([], str(tmp_path / "missing"))
