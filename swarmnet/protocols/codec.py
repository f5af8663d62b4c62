"""Typed msgpack bodies: dataclass ⇄ map, with strict field and type checks on the way in.

Shared by DHT records and wire messages so that every byte from the network becomes a typed,
validated object before any code looks at it.

Compatibility: a field added to an existing message or record carries
`metadata={"omit_if_default": True}` and is left out of the body while it has its default, so
peers of the previous version still accept what does not use it. Wire messages are otherwise
strict (unknown fields are a protocol error); DHT records are decoded with `allow_unknown`, so a
newer peer's record, with fields this version does not know, is still read (see `dht/records.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any


def to_body(obj: Any) -> dict:
    """A dataclass instance as a msgpack-ready map (nested dataclasses become maps); fields marked
    `omit_if_default` are left out while they hold their default."""
    return {
        f.name: _plain(getattr(obj, f.name))
        for f in dataclasses.fields(obj)
        if not (f.metadata.get("omit_if_default") and getattr(obj, f.name) == f.default)
    }


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_body(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@functools.cache
def _layout(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """Type hints and fields of a message class, computed once (`get_type_hints` is slow and
    every record and message decode needs them)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def from_body(cls: type, body: Any, error: type[Exception], *, allow_unknown: bool = False) -> Any:
    """Builds `cls` from a decoded map; raises `error` on missing fields, wrong types, and unknown
    fields unless `allow_unknown` (then they are ignored: a newer sender's additions)."""
    name = getattr(cls, "KIND", cls.__name__)
    if not isinstance(body, dict):
        raise error(f"{name} must be a map")
    hints, fields = _layout(cls)
    if not all(isinstance(k, str) for k in body):
        raise error(f"{name}: field names must be strings")
    unknown = set() if allow_unknown else set(body) - set(fields)
    missing = {
        n
        for n, f in fields.items()
        if n not in body and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    if unknown or missing:
        raise error(f"{name}: unknown fields {sorted(map(repr, unknown))}, missing fields {sorted(missing)}")
    kwargs = {}
    for key, value in body.items():
        if key in fields:
            kwargs[key] = _check(hints[key], value, f"{name}.{key}", error, allow_unknown)
    return cls(**kwargs)


def _check(hint: Any, value: Any, where: str, error: type[Exception], allow_unknown: bool = False) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _check(arg, value, where, error, allow_unknown)
            except error:
                continue
        raise error(f"{where} has wrong type {type(value).__name__}")
    if dataclasses.is_dataclass(hint):
        return from_body(hint, value, error, allow_unknown=allow_unknown)
    ok: bool
    if hint is type(None):
        ok = value is None
    elif origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise error(f"{where} must be a list")
        return [_check(item, v, where, error, allow_unknown) for v in value]
    elif origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise error(f"{where} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(args[0], v, where, error, allow_unknown) for v in value)
        if len(args) != len(value):
            raise error(f"{where} must have {len(args)} items")
        return tuple(_check(a, v, where, error, allow_unknown) for a, v in zip(args, value))
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            value = float(value)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is dict or hint is dict:
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise error(f"{where} has wrong type {type(value).__name__}")
    return value
