"""OpenTelemetry traces, configured by the standard `OTEL_*` variables and off by default.

`configure()` reads:
- `OTEL_TRACES_EXPORTER`: `none` (default: tracing off, every helper here is a no-op and the FastAPI
  instrumentation is not installed), `console` (spans as JSON on stdout), or `otlp`;
- `OTEL_EXPORTER_OTLP_PROTOCOL` / `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`: `grpc` (default) or
  `http/protobuf`; `OTEL_EXPORTER_OTLP_ENDPOINT` and the other exporter variables are read by the exporter;
- `OTEL_SERVICE_NAME` (default `alit-serve`), `OTEL_RESOURCE_ATTRIBUTES`,
  `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (read by the SDK), `OTEL_SDK_DISABLED`.

The provider is this module's own (not the global one), so tests can configure it with an
in-memory exporter. A W3C `traceparent` from the caller becomes the parent of the request's span
(the FastAPI instrumentation extracts it). Every span of a request carries `alit.request_id`.
"""

from __future__ import annotations

import contextlib
import os
import time

from . import logs

ENABLED = False
_tracer = None
_provider = None
SERVICE_NAME = "alit-serve"
EXPORTERS = ("none", "console", "otlp")


def configure(exporter=None) -> bool:
    """Tracing on or off for this process, from the environment (or with `exporter`, e.g. an
    InMemorySpanExporter in tests). Returns whether it is on. Calling it again reconfigures."""
    global ENABLED, _tracer, _provider
    name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        name = "none"
    if name not in EXPORTERS:
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported here (use one of {', '.join(EXPORTERS)})")
    if exporter is None and name == "none":
        shutdown()
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    shutdown()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER (default parentbased_always_on)
    provider.add_span_processor(_request_id_processor())
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    _provider, _tracer, ENABLED = provider, provider.get_tracer("alit-serve"), True

    def ids():
        ctx = trace.get_current_span().get_span_context()
        return (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")) if ctx.is_valid else None

    logs.set_trace_ids(ids)
    return True


def _otlp_exporter():
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or http/protobuf")


def shutdown() -> None:
    """Flush and stop the provider (exports pending spans)."""
    global ENABLED, _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    ENABLED, _tracer, _provider = False, None, None
    logs.set_trace_ids(None)


def instrument(app) -> None:
    """FastAPI instrumentation (the request span, with the caller's traceparent as parent), when on."""
    if not ENABLED:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls="/metrics,/healthz,/readyz",
                                       exclude_spans=["receive", "send"])


def _request_id_processor():
    """A span processor putting the request ID on every span started while a request is served."""
    from opentelemetry.sdk.trace import SpanProcessor

    class RequestIdProcessor(SpanProcessor):
        def on_start(self, span, parent_context=None):
            rid = logs.REQUEST_ID.get()
            if rid is not None:
                span.set_attribute("alit.request_id", rid)

    return RequestIdProcessor()


def tag_request(request_id: str) -> None:
    """The request span starts before the request ID is known: tag it now."""
    if ENABLED:
        from opentelemetry import trace

        trace.get_current_span().set_attribute("alit.request_id", request_id)


@contextlib.contextmanager
def span(name: str, **attributes):
    """A child span of the current one; nothing at all when tracing is off. Yields the span or None."""
    if not ENABLED or _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=_clean(attributes)) as s:
        yield s


def past_span(name: str, start_s: float, end_s: float, events=(), **attributes) -> None:
    """A span for something already over (times: time.time() seconds), e.g. the queue wait the engine
    measured; `events`: (name, time.time() seconds, attributes) each."""
    if not ENABLED or _tracer is None:
        return
    s = _tracer.start_span(name, start_time=int(start_s * 1e9), attributes=_clean(attributes))
    for ev_name, at, attrs in events:
        s.add_event(ev_name, _clean(attrs), timestamp=int(at * 1e9))
    s.end(end_time=int(end_s * 1e9))


def inject_headers() -> dict[str, str]:
    """The current trace context as W3C headers (`traceparent`), to pass on to Triton; {} when off."""
    if not ENABLED:
        return {}
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def now() -> float:
    return time.time()


def _clean(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if v is not None}
