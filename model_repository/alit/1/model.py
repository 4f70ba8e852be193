"""Triton Python backend for every model family (ALIT, KARL, ...): a thin adapter over the project's
model and engine. The same code serves each model directory of the repository (`karl/1` is a link
to `alit/1`); nothing here depends on the family, which comes with the weights.

Settings are the service's own (`service.settings.Settings`: the `ALIT_*` variables and their
defaults, so both sides load the same weights by default); a non-empty `config.pbtxt` parameter
overrides the setting of the same name.

Which weights a Triton model serves is picked by its Triton name (`args["model_name"]`, its folder):
1. the `ALIT_MODELS` entry whose id is that name (`ALIT_MODELS=alit=SPEC,karl=SPEC`: the one variable
   that also configures the FastAPI front, whose model `karl` asks Triton's model `karl`);
2. else its `model` parameter in config.pbtxt;
3. else `ALIT_MODEL` (else the service's default, the packaged `service/weights/`).
So with `ALIT_MODEL` alone every Triton model of the repository serves those same weights (only
`alit` is asked for by a single-model front).

Responses: TOKEN_IDS and POSITIONS (each id's position, for families whose tokens carry one, KARL;
empty otherwise) of the probe named by PROBE (its key: ALIT's iteration, KARL's budget * 32 + quality
bin), with ALL_ITERATIONS one response per probe as it completes, then the answer.

Triton's Python stub ignores PYTHONPATH when it builds sys.path, so the environment's
site-packages and the project root come from ALIT_PYTHONPATH (set by `alit-serve triton`; in a
container, point it at the image's site-packages and the project).
"""

import contextlib
import functools
import json
import math
import os
import sys
import time

for _p in reversed([os.path.dirname(os.path.abspath(__file__)),
                    *[p for p in os.environ.get("ALIT_PYTHONPATH", "").split(os.pathsep) if p]]):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from service.engine import Engine, EngineError, Target, TargetError, parse_target  # noqa: E402
from service.engine.jobs import Job, TokenizeJob  # noqa: E402
from service.imaging import ImageError, load_for_model, preprocess  # noqa: E402
from service.model.registry import resolve  # noqa: E402
from service.settings import engine_settings, settings_with  # noqa: E402

TARGET_INPUTS = {"MAX_L1": "max_l1", "MIN_PSNR": "min_psnr", "TOKENS": "tokens", "MAX_TOKENS": "max_tokens"}
CANCEL_POLL_S = 0.1  # how often a running image asks Triton whether its client cancelled


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.name = args["model_name"]  # the model's folder in the repository: alit, karl, ...
        if not pb_utils.using_decoupled_model_transaction_policy(cfg):
            raise pb_utils.TritonModelException(f"model {self.name!r} needs model_transaction_policy "
                                                "{ decoupled: true }")
        try:
            # config.pbtxt parameters override the service's settings of the same name
            settings = settings_with({k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()})
            spec = weights_for(self.name, settings)
        except ValueError as e:  # pydantic's ValidationError included: a clear load error in Triton's log
            raise pb_utils.TritonModelException(f"{self.name}: invalid settings: {e}") from None
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        self.loaded = resolve(spec, heads=settings.heads)
        self.loaded.model.retry_stricter = settings.retry_stricter  # as the front sets it (conditioned families)
        print(f"alit: Triton model {self.name!r} serves {self.loaded.source} (family {self.loaded.family.name}, "
              f"fingerprint {self.loaded.fingerprint[:12]})", file=sys.stderr)
        self.engine = Engine(self.loaded, engine_settings(settings, devices=device),
                             observer=_observer(self.name, self.loaded.limits, settings.max_batch)).start()
        self.default_target = Target(max_l1=settings.default_max_l1)
        self.size = self.loaded.limits.img_size
        self.resample = self.loaded.limits.resample  # the family's resize filter
        self.fingerprint = np.array([[self.loaded.fingerprint.encode()]], dtype=object)

    # ----- request -> job ----------------------------------------------------------------------------
    def _job(self, request, sender) -> TokenizeJob:
        image = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS")
        if (image is None) == (pixels is None):
            raise ValueError("send exactly one of IMAGE (encoded bytes) or PIXELS (UINT8 HxWx3)")
        if image is not None:
            arr = image.as_numpy()
            if arr.shape[0] != 1:
                raise ValueError(f"one image per request (batch dimension 1), got {arr.shape[0]}")
            pixels_in = load_for_model(bytes(arr.reshape(-1)[0]), self.size, resample=self.resample)
        else:
            arr = pixels.as_numpy()
            if arr.shape[0] != 1:
                raise ValueError(f"one image per request (batch dimension 1), got {arr.shape[0]}")
            from PIL import Image

            pixels_in = preprocess(Image.fromarray(np.ascontiguousarray(arr[0]), mode="RGB"), self.size,
                                   self.resample)
        spec = {}
        for name, field in TARGET_INPUTS.items():
            t = pb_utils.get_input_tensor_by_name(request, name)
            v = None if t is None else t.as_numpy().reshape(-1)[0].item()
            unset = v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, int) and v == 0)
            if not unset:  # NaN (FP32) / 0 (INT32) mean "not set", like an absent input (see config.pbtxt)
                spec[field] = v
        target = parse_target(spec, self.engine.limits, self.default_target)
        every = pb_utils.get_input_tensor_by_name(request, "ALL_ITERATIONS")
        job = TokenizeJob(image=pixels_in, target=target, still_wanted=_not_cancelled(sender))
        if every is not None and bool(every.as_numpy().reshape(-1)[0]):
            job.progress = self._progress(sender)
        return job

    def _progress(self, sender):
        """One response per probe as it completes (on the engine's worker thread): its tokens, key and
        quality; ITERATIONS counts the probes run so far (ALIT: the iteration, as before PROBE existed)."""
        count = 0

        def send(rec) -> None:
            nonlocal count
            count += 1
            sender.send(pb_utils.InferenceResponse(output_tensors=self._outputs(
                rec.token_ids, rec.positions, count, rec.iteration, rec.l1, rec.psnr, False, final=False)))

        return send

    # ----- responses ------------------------------------------------------------------------------------
    @staticmethod
    def _error(sender, message: str) -> None:
        with contextlib.suppress(pb_utils.TritonModelException):  # the client is gone (cancelled): nobody to tell
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _respond(self, sender, future) -> None:
        """Runs on the engine's worker thread the moment an image halts."""
        if future.cancelled():
            return self._error(sender, "cancelled")
        exc = future.exception()
        if exc is not None:
            return self._error(sender, f"{type(exc).__name__}: {exc}")
        r = future.result()
        outputs = self._outputs(r.token_ids, r.positions, r.iterations, r.selected_iteration, r.l1, r.psnr,
                                r.target_met, final=True)
        sender.send(pb_utils.InferenceResponse(output_tensors=outputs),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _outputs(self, token_ids, positions, iterations, probe, l1, psnr, target_met, final: bool) -> list:
        """ITERATIONS: probes run (so far, for per-probe responses); PROBE: the key of the probe whose
        tokens these are; POSITIONS: empty when the family's tokens carry none."""
        nan = float("nan")
        pos = np.zeros(0, np.int32) if positions is None else positions.astype(np.int32)
        return [
            pb_utils.Tensor("MODEL_FINGERPRINT", self.fingerprint),
            pb_utils.Tensor("TOKEN_IDS", token_ids.astype(np.int32)[None, :]),
            pb_utils.Tensor("POSITIONS", pos[None, :]),
            pb_utils.Tensor("PROBE", np.array([[probe]], np.int32)),
            pb_utils.Tensor("NUM_TOKENS", np.array([[token_ids.shape[0]]], np.int32)),
            pb_utils.Tensor("ITERATIONS", np.array([[iterations]], np.int32)),
            pb_utils.Tensor("L1", np.array([[nan if l1 is None else l1]], np.float32)),
            pb_utils.Tensor("PSNR", np.array([[nan if psnr is None else psnr]], np.float32)),
            pb_utils.Tensor("TARGET_MET", np.array([[target_met]], bool)),
            pb_utils.Tensor("IS_FINAL", np.array([[final]], bool)),
        ]

    def execute(self, requests):
        """Hand every request's image to the engine and return; responses follow as images halt."""
        jobs: list[Job] = []
        senders = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                jobs.append(self._job(request, sender))
            except (ImageError, TargetError, ValueError) as e:  # a target this family cannot honour included
                self._error(sender, f"invalid request to model {self.name!r}: {e}")
                continue
            senders.append(sender)
        if not jobs:
            return None
        try:
            self.engine.submit(jobs)  # all or none: QueueFull when the queue is full, EngineStopped when draining
        except EngineError as e:
            for s in senders:
                self._error(s, str(e))
            return None
        for queued, sender in zip(jobs, senders):
            queued.future.add_done_callback(functools.partial(self._respond, sender))
        return None

    def finalize(self):
        self.engine.shutdown()


def weights_for(name: str, settings) -> str:
    """The weights spec the Triton model called `name` serves: the `ALIT_MODELS` entry of that id, else
    `settings.model` (its `model` parameter, else `ALIT_MODEL`, else the service's default). ValueError
    when `ALIT_MODELS` is malformed."""
    return dict(settings.model_specs()).get(name) or settings.model


def _observer(model: str, limits, max_batch: int):
    """The engine's metrics on Triton's /metrics (labelled with this Triton model's name); none when
    Triton runs with metrics off."""
    try:
        from triton_metrics import TritonMetrics

        return TritonMetrics(model, limits.max_probes, max_batch, limits.token_buckets())
    except Exception as e:  # pb_utils refuses custom metrics under --allow-metrics=false
        print(f"alit: engine metrics disabled ({e})", file=sys.stderr)
        return None


def _not_cancelled(sender):
    """A still_wanted predicate for the engine: asks Triton (at most every CANCEL_POLL_S) whether the
    client cancelled, so an abandoned image leaves the batch instead of running to its last iteration."""
    last, wanted = 0.0, True

    def check() -> bool:
        nonlocal last, wanted
        now = time.monotonic()
        if wanted and now - last >= CANCEL_POLL_S:
            last, wanted = now, not sender.is_cancelled()
        return wanted

    return check
