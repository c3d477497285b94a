"""A JSON parser that refuses what the standard one lets through.

Oversized bodies get 413 before they are read; nesting deeper than MAX_JSON_DEPTH,
duplicate object keys, NaN/Infinity and invalid UTF-8 get 400 with a message naming them.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from rest_framework import exceptions, parsers


class PayloadTooLarge(exceptions.APIException):
    status_code = 413
    default_code = "payload_too_large"
    default_detail = "request body too large"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise exceptions.ParseError(f"JSON object has the key {key!r} twice")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise exceptions.ParseError(f"JSON value {name} is not allowed")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth, computed without recursion so hostile input cannot blow the stack."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


class StrictJSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.MAX_REQUEST_BODY_BYTES
        request = (parser_context or {}).get("request")
        length = request.META.get("CONTENT_LENGTH") if request is not None else None
        if length and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"request body is {int(length)} bytes; the limit is {limit}")
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise exceptions.ParseError("request body is not valid UTF-8") from None
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
        except RecursionError:
            raise exceptions.ParseError("JSON is nested too deeply") from None
        except ValueError as exc:
            raise exceptions.ParseError(f"request body is not valid JSON: {exc}") from None
        max_depth = settings.MAX_JSON_DEPTH
        if _depth(data, max_depth) > max_depth:
            raise exceptions.ParseError(f"JSON is nested deeper than {max_depth} levels")
        return data
