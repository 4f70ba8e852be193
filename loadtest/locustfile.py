"""Locust load for alit-serve: /tokenize (multipart and JSON, mixed targets) and /reconstruct.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000
Environment: ALIT_LOAD_REPEAT_RATIO (default 0.5) is the share of requests that reuse an image of a
small hot set (cache hits); the rest are fresh random crops (misses). ALIT_API_KEY adds auth.
"""

from __future__ import annotations

import base64
import os
import random
import sys
from pathlib import Path

from locust import HttpUser, between, task

sys.path.insert(0, str(Path(__file__).parent))
import corpus  # noqa: E402

REPEAT = float(os.environ.get("ALIT_LOAD_REPEAT_RATIO", "0.5"))
BASE = corpus.corpus(n_crops=24, seed=0)
HOT = [corpus.png(img) for _, img in BASE]
PHOTOS = [img for name, img in BASE if "@" not in name and not name.startswith(("flat", "noise"))]
TARGETS = [{"max_l1": "0.1"}, {"max_l1": "0.2"}, {"max_l1": "0.05", "max_tokens": "192"}, {"min_psnr": "20"},
           {"tokens": "64"}, {"tokens": "128"}, {"tokens": "256"}]


def pick_image(rng: random.Random) -> bytes:
    if rng.random() < REPEAT:
        return rng.choice(HOT)
    return corpus.png(corpus.random_crop(rng.choice(PHOTOS), rng))


class AlitUser(HttpUser):
    wait_time = between(0.05, 0.3)

    def on_start(self):
        self.rng = random.Random()
        key = os.environ.get("ALIT_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.last_ids: list[int] | None = None

    def _check(self, r):
        if r.status_code == 200:
            r.success()
            return r.json()
        if r.status_code == 503:
            r.failure("503 overloaded")
        else:
            r.failure(f"{r.status_code} {r.text[:80]}")
        return None

    @task(4)
    def tokenize_multipart(self):
        with self.client.post("/v1/tokenize", files={"file": ("img.png", pick_image(self.rng), "image/png")},
                              data=self.rng.choice(TARGETS), name="/v1/tokenize [multipart]", catch_response=True) as r:
            body = self._check(r)
            if body:
                self.last_ids = body["results"][0]["token_ids"]

    @task(2)
    def tokenize_json(self):
        target = {k: float(v) if "." in v else int(v) for k, v in self.rng.choice(TARGETS).items()}
        payload = {"images": [{"image": base64.b64encode(pick_image(self.rng)).decode(), "target": target}]}
        with self.client.post("/v1/tokenize", json=payload, name="/v1/tokenize [json]", catch_response=True) as r:
            self._check(r)

    @task(1)
    def reconstruct(self):
        if not self.last_ids:
            return
        with self.client.post("/v1/reconstruct", json={"token_ids": self.last_ids}, headers={"Accept": "image/png"},
                              name="/v1/reconstruct", catch_response=True) as r:
            self._check(r)
