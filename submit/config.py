"""Configs are data: YAML recipes loaded into typed, frozen dataclasses that reject unknown keys.

`load(cls, path)` / `from_mapping(cls, data, where)` work for any frozen dataclass tree, so every stage
(recipes here, ensemble specs in `ensembling`) validates its YAML the same way, with one-line errors
that name the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from submit.errors import SubmitError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file, bad syntax or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise SubmitError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SubmitError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise SubmitError(f"{path}: expected a YAML mapping at the top level")
    return data


def load(cls: type[T], path: str | Path) -> T:
    """Load YAML file `path` into dataclass `cls`, rejecting unknown keys and wrong types."""
    return from_mapping(cls, read_yaml(path), where=str(path))


def from_mapping(cls: type[T], data: Any, where: str, key: str = "") -> T:
    """Build dataclass `cls` from a mapping; errors read `WHERE: key a.b: expected ...`."""
    if not isinstance(data, dict):
        raise SubmitError(f"{where}: {_name(key)}expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SubmitError(
            f"{where}: unknown key {_join(key, unknown[0])!r} (allowed: {', '.join(sorted(fields))})"
        )
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], where, _join(key, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SubmitError(f"{where}: missing key {_join(key, name)!r}")
    return cls(**values)


def to_mapping(obj: Any) -> Any:
    """The plain-data (YAML/JSON-ready) form of a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _name(key: str) -> str:
    return f"key {key!r}: " if key else ""


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where, key)
            except SubmitError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise SubmitError(f"{where}: key {key!r}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SubmitError(f"{where}: key {key!r}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise SubmitError(f"{where}: key {key!r}: expected {len(args)} items, got {len(value)}")
            items = [_convert(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SubmitError(f"{where}: key {key!r}: expected a mapping, got {value!r}")
        return {k: _convert(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where, key)
    return _scalar(tp, value, where, key)


def _scalar(tp: Any, value: Any, where: str, key: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config type {tp!r} is not supported")
    raise SubmitError(f"{where}: key {key!r}: expected {tp.__name__}, got {value!r}")
