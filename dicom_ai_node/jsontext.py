"""JSON text of what the node records for every received instance (its routing header, its journal record).

orjson writes a CT header (~80 keywords) in ~1 us where the standard library takes ~17 us, and reads it back
~4x faster; per instance that is ~8 % of the receive loop's CPU (benchmarks/RESULTS.md, Ingest). The text is
compact JSON either way; non-ASCII characters are written as UTF-8 rather than as \\u escapes, which every
JSON reader (SQLite's json_extract included) reads the same.
"""
from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> str:
    """Compact JSON text of `value`. What orjson refuses (a lone surrogate in a string, a key that is not a
    string, an integer beyond 64 bits) is written by the standard library instead, as before."""
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value, separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    """The value of JSON text (ValueError when it is not JSON)."""
    return orjson.loads(text)
