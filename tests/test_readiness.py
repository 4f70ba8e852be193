"""/readyz reports the engine's own reason when it is not ready: a failing worker's last error.

The app is the real one (in-process, real engine on the fixture model). The only stand-in is the
failure itself: the worker's scheduler step is replaced by one that fails its images and raises,
as a step that fails outside any model call does (a lost device, a bug), since no real input makes
a whole step fail (a failing model call is retried on halves and fails only its image)."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from conftest import FIXTURE
from service.api.app import create_app
from service.engine import StepFailed
from service.settings import Settings


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_readyz_names_a_failing_workers_last_error_and_recovers():
    settings = Settings(model=str(FIXTURE / "checkpoint.pth"), devices="cpu", warmup=False, demo_page=False)
    ids = {"token_ids": [k % 200 for k in range(32)]}
    with TestClient(create_app(settings)) as client:
        # the model loads in the background: `starting` first, then ready
        assert _wait(lambda: client.get("/readyz").status_code == 200, timeout=60)
        worker = client.app.state.svc.default.engine.workers[0]  # type: ignore[attr-defined]
        real_step = worker.scheduler.step

        def failing_step(new_jobs, waiting=0):
            for j in new_jobs:
                j.fail(StepFailed("the step failed"))
            raise RuntimeError("simulated: device lost")

        worker.scheduler.step = failing_step
        try:
            for _ in range(3):
                assert client.post("/v1/reconstruct", json=ids).status_code == 500
            assert _wait(lambda: worker.consecutive_failures >= 3)
            r = client.get("/readyz")
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "unhealthy"
            assert "last error: RuntimeError: simulated: device lost" in err["message"], err
            # a step that raises before it touched its images (a bug): they are answered, not lost
            def broken_step(new_jobs, waiting=0):
                raise TypeError("simulated: a bug before any image")

            worker.scheduler.step = broken_step
            r = client.post("/v1/reconstruct", json=ids)
            assert r.status_code == 500 and "a bug before any image" in r.text, r.text
        finally:
            worker.scheduler.step = real_step
        assert client.post("/v1/reconstruct", json=ids).status_code == 200  # a good step resets it
        assert _wait(lambda: client.get("/readyz").status_code == 200)
