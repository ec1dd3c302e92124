"""Configs are data: YAML recipes loaded into typed, frozen dataclasses that reject unknown keys.

`load(cls, path)` / `from_mapping(cls, data, where)` work for any frozen dataclass tree, so every stage
(recipes here, ensemble specs in `ensembling`) validates its YAML the same way, with one-line errors
that name the file and the dotted key. Numeric fields declare their allowed range where they are defined
(`lr: float = bounded(4e-5, gt=0)`, `hflip: float = probability(0.5)`) and a name field its registry
(`loss: str = registered("infonce", lambda: LOSSES)`); floats are always finite.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypeVar, Union

import yaml

from submit.errors import SubmitError

T = TypeVar("T")


def read_text(path: str | Path, what: str) -> str:
    """A text input file's content (UTF-8, a leading byte-order mark dropped, as editors on Windows save it);
    one-line errors for a binary (non-UTF-8) or unreadable file."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SubmitError(f"{path}: not a {what} (not UTF-8 text)") from None
    except IsADirectoryError:
        raise SubmitError(f"{path}: is a folder; expected a {what}") from None
    except OSError as exc:
        raise SubmitError(f"{path}: cannot read ({exc.strerror or exc})") from None


def require_file(path: str | Path, what: str, missing: str = "file not found") -> Path:
    """`path` if it is a file; one-line errors for a folder in its place or nothing there."""
    path = Path(path)
    if path.is_dir():
        raise SubmitError(f"{path}: is a folder; expected a {what}")
    if not path.is_file():
        raise SubmitError(f"{path}: {missing}")
    return path


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """Construct a mapping, raising ConstructorError on a repeated key."""
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat and is resolved below
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file, bad syntax, a repeated key or a non-mapping."""
    path = require_file(path, "YAML file")
    try:
        data = yaml.load(read_text(path, "YAML file"), Loader=_StrictLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", "") or ""
        if problem.endswith("appears twice"):
            raise SubmitError(f"{path}: {problem}{where}; expected each key once") from None
        raise SubmitError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise SubmitError(f"{path}: expected a YAML mapping at the top level")
    return data


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (each item, for a tuple): bounds inclusive unless marked open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        lo_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        hi_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _num(value: float | None) -> str:
    """A bound as users write it: integers in full, floats short (1e-05, 0.5)."""
    return str(value) if value is None or isinstance(value, int) else f"{value:g}"


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field whose number (or each number of a tuple) must lie in the range; checked at load."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("give one lower bound (ge or gt) and one upper bound (le or lt)")
    rng = Range(gt if gt is not None else ge, lt if lt is not None else le, gt is not None, lt is not None)
    return dataclasses.field(default=default, metadata={"range": rng})


def probability(default: float) -> Any:
    """A field holding a probability, in [0, 1]."""
    return bounded(default, ge=0.0, le=1.0)


def registered(default: str, registry: Callable[[], Mapping[str, Any]]) -> Any:
    """A str field whose value must be a key of a registry dict (given as a function returning it, so the
    registry's module is imported only when a value is checked); checked at load like a range."""
    return dataclasses.field(default=default, metadata={"registry": registry})


def check_registered(field: dataclasses.Field, value: Any, where: str, key: str) -> None:
    """Refuse a loaded value that its field's registry does not hold."""
    registry = field.metadata.get("registry")
    if registry is not None and value not in registry():
        raise SubmitError(f"{where}: key {key!r}: expected one of {list(registry())}, got {value!r}")


def check_range(field: dataclasses.Field, value: Any, where: str, key: str) -> None:
    """Refuse a loaded value outside the range its field declares (None means unset and is allowed)."""
    rng = field.metadata.get("range")
    if rng is None or value is None:
        return
    items = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
    for i, item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and item not in rng:
            name = key if i is None else f"{key}[{i}]"
            raise SubmitError(f"{where}: key {name!r}: expected {rng}, got {item!r}")


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
            check_range(field, values[name], where, _join(key, name))
            check_registered(field, values[name], where, _join(key, name))
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
        specific = [e for e in errors if not getattr(e, "type_mismatch", False)]  # e.g. inf: "finite", not "int"
        raise (specific or errors)[0]
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
            if not math.isfinite(value):
                raise SubmitError(f"{where}: key {key!r}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config type {tp!r} is not supported")
    exc = SubmitError(f"{where}: key {key!r}: expected {tp.__name__}, got {value!r}")
    exc.type_mismatch = True  # type: ignore[attr-defined]  # a union reports another option's error first
    raise exc
