"""The output rows: one per input image, the same whichever way it was run (locally or on Ray).

| column | type | |
|---|---|---|
| source | string | the shard / Parquet file the image came from; null for image files |
| key | string | the image's name in its source (see sources.py) |
| model | string | the model's id (as `/v1/models` names it) |
| fingerprint | string | the model weights' fingerprint |
| target | string | the target, as JSON (`{"max_l1": 0.07}`) |
| token_ids | list<int32> | the tokens `/v1/tokenize` returns; null on error |
| positions | list<int32> | each id's position (families whose tokens carry one: KARL); else null |
| num_tokens | int32 | |
| iterations | int32 | probes run to reach the answer (ALIT: iterations; KARL: passes) |
| l1, psnr | float64 | measured quality of the returned tokens (null when not measured) |
| target_met | bool | |
| error_code, error | string | null, or why this image has no tokens (the API's code and message) |
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from ..engine import TokenizeResult

SCHEMA = pa.schema([
    pa.field("source", pa.string()),
    pa.field("key", pa.string()),
    pa.field("model", pa.string()),
    pa.field("fingerprint", pa.string()),
    pa.field("target", pa.string()),
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("positions", pa.list_(pa.int32())),
    pa.field("num_tokens", pa.int32()),
    pa.field("iterations", pa.int32()),
    pa.field("l1", pa.float64()),
    pa.field("psnr", pa.float64()),
    pa.field("target_met", pa.bool_()),
    pa.field("error_code", pa.string()),
    pa.field("error", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)


def target_json(target: dict[str, Any]) -> str:
    return json.dumps(target, sort_keys=True)


def result_row(base: dict[str, Any], source: str | None, key: str, r: TokenizeResult) -> dict[str, Any]:
    """The row of a tokenized image (`base`: model, fingerprint, target)."""
    return {**base, "source": source, "key": key, "token_ids": r.token_ids.tolist(),
            "positions": None if r.positions is None else r.positions.tolist(),
            "num_tokens": r.num_tokens, "iterations": r.iterations, "l1": r.l1, "psnr": r.psnr,
            "target_met": r.target_met, "error_code": None, "error": None}


def error_row(base: dict[str, Any], source: str | None, key: str | None, code: str, message: str) -> dict[str, Any]:
    """The row of an image that has no tokens, and why (key None: an unreadable source, never written)."""
    return {**base, "source": source, "key": key, "token_ids": None, "positions": None, "num_tokens": None,
            "iterations": None, "l1": None, "psnr": None, "target_met": None, "error_code": code, "error": message}


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)
