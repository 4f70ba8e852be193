"""Test-only slowdowns, loaded by a server process whose PYTHONPATH starts with this folder.

ALIT_TEST_LOAD_GATE=PATH: model loading blocks until PATH exists (a slow-loading model whose end the
test decides). ALIT_TEST_STEP_DELAY_S=S: every encoder iteration (ALIT.advance) takes S seconds
longer (a slow computation, so a test can act while one is in flight). ALIT_TEST_WORKER_EXIT=1: a
worker thread's first encoder iteration ends the thread. Nothing else changes.
"""

import os
import time

if os.environ.get("ALIT_TEST_LOAD_GATE"):
    import service.model.registry as _registry

    _resolve = _registry.resolve

    def _gated_resolve(*args, **kw):
        gate = os.environ["ALIT_TEST_LOAD_GATE"]
        while not os.path.exists(gate):
            time.sleep(0.05)
        return _resolve(*args, **kw)

    _registry.resolve = _gated_resolve

if os.environ.get("ALIT_TEST_STEP_DELAY_S"):
    from service.model.alit import ALIT as _ALIT

    _advance = _ALIT.advance
    _delay = float(os.environ["ALIT_TEST_STEP_DELAY_S"])

    def _slow_advance(self, *args, **kw):
        time.sleep(_delay)
        return _advance(self, *args, **kw)

    _ALIT.advance = _slow_advance

if os.environ.get("ALIT_TEST_WORKER_EXIT"):  # a worker thread ends on its first step (a dead worker)
    import threading

    from service.model.alit import ALIT as _ALIT2

    _advance2 = _ALIT2.advance

    def _exiting_advance(self, *args, **kw):
        if threading.current_thread().name.startswith("alit-worker"):
            raise SystemExit("test: this worker thread ends")  # not an Exception: nothing catches it
        return _advance2(self, *args, **kw)

    _ALIT2.advance = _exiting_advance
