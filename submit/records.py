"""One validating reader for the toolkit's own files: each field is read by name, with the type it must have.

The toolkit reads back what it wrote earlier: a run's `metrics.json` and `last.pt` fields (`runs`), an exported
ONNX file's metadata (`export`), the weights cache's sha256 record (`weight_sources`). Such a file may have been
damaged, hand-edited or written by another version, so nothing is taken on trust: a `Record` wraps the mapping
read from one file and hands out typed fields (`number`, `integer`, `text`, `json_value`, nested `mapping` and
`records`); a field of the wrong type is one `SubmitError` naming the file and the field's path in it,

    RUN/metrics.json: history[1].epoch: expected an integer, got 'two'

never a traceback from deep inside the caller. Non-finite numbers: JSON as Python writes it may hold NaN
(`json.dumps` default); `number(..., nonfinite_null=True)` reads it as absent (None), and `dumps` writes every
non-finite float as null, so the toolkit's own JSON output is always JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

from submit.errors import SubmitError

_SHOWN = 40  # characters of a bad value shown in an error
MISSING: Any = object()  # a getter's default that makes the field required


def show(value: Any) -> str:
    """A bad value as an error shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Record:
    """A mapping read from one of our files (`source`), at `where` inside it; typed getters name both on error."""

    def __init__(self, data: Mapping[str, Any], source: str | Path, where: str = "") -> None:
        self.data = data
        self.source = str(source)
        self.where = where

    def field(self, key: str | int) -> str:
        """The path of `key` in the file, e.g. `history[2].mAP`."""
        if isinstance(key, int):
            return f"{self.where}[{key}]"
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str | int, expected: str, value: Any = MISSING) -> SubmitError:
        """`SOURCE: FIELD: expected ..., got ...` (the value left out when there is none)."""
        got = "" if value is MISSING else f", got {show(value)}"
        return SubmitError(f"{self.source}: {self.field(key)}: expected {expected}{got}")

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value (unchecked: for what the caller checks itself)."""
        return self.data.get(key, default)

    def _value(self, key: str, default: Any, expected: str) -> Any:
        """The raw value of `key`; a required field (`default` MISSING) that is absent or null is refused."""
        if key not in self.data:
            if default is MISSING:
                raise self.error(key, f"{expected} (the field is missing)")
            return default
        value = self.data[key]
        if value is None and default is MISSING:
            raise self.error(key, expected, value)
        return value

    @staticmethod
    def _or_null(expected: str, default: Any) -> str:
        return expected if default is MISSING else f"{expected} or null"

    def number(self, key: str, default: Any = None, *, nonfinite_null: bool = False,
               minimum: float | None = None) -> float | None:
        """A finite number (null or absent: `default`; MISSING makes it required); NaN or inf is None with
        `nonfinite_null`, else refused."""
        value = self._value(key, default, "a number")
        if value is None:
            return None
        if not _is_number(value):
            raise self.error(key, self._or_null("a number", default), value)
        if not math.isfinite(value):
            if nonfinite_null:
                return None
            raise self.error(key, "a finite number", value)
        if minimum is not None and value < minimum:
            raise self.error(key, f"a number >= {minimum:g}", value)
        return float(value)

    def integer(self, key: str, default: Any = None, *, minimum: int | None = None) -> int | None:
        """An integer (null or absent: `default`; MISSING makes it required); a bool, a fraction or a string is
        refused."""
        value = self._value(key, default, "an integer")
        if value is None:
            return None
        if not _is_int(value):
            raise self.error(key, self._or_null("an integer", default), value)
        if minimum is not None and value < minimum:
            raise self.error(key, f"an integer >= {minimum}", value)
        return int(value)

    def text(self, key: str, default: Any = None) -> str | None:
        """A string (null or absent: `default`; MISSING makes it required)."""
        value = self._value(key, default, "a string")
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, self._or_null("a string", default), value)
        return value

    def mapping(self, key: str) -> Record | None:
        """A nested mapping as a Record; None when it is null or absent."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.error(key, "a mapping", value)
        return Record(value, self.source, self.field(key))

    def records(self, key: str, default: Any = ()) -> list[Record]:
        """A list of mappings, each a Record (`history[3]`); null or absent: `default` (empty)."""
        value = self._value(key, default, "a list")
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise self.error(key, "a list of mappings", value)
        inner = Record({}, self.source, self.field(key))
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise inner.error(i, "a mapping", item)
            out.append(Record(item, self.source, inner.field(i)))
        return out

    def json_value(self, key: str, expected: str, default: Any = MISSING) -> Any:
        """A string field holding JSON (ONNX metadata_props): its decoded value; absent: `default`."""
        if key not in self.data and default is not MISSING:
            return default
        raw = self._value(key, MISSING, expected)
        if not isinstance(raw, str):
            raise self.error(key, f"{expected} as JSON text", raw)
        try:
            return json.loads(raw)
        except ValueError:
            raise self.error(key, f"{expected} as JSON text", raw) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)


def read_json(path: str | Path, what: str = "a JSON object") -> Record:
    """A JSON file of ours whose top level is an object; one line naming the file when it is not."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise SubmitError(f"{path}: not readable JSON ({type(exc).__name__}); expected {what}") from None
    if not isinstance(data, dict):
        raise SubmitError(f"{path}: expected {what}, got a JSON {type(data).__name__}")
    return Record(data, path)


def finite(obj: Any) -> Any:
    """`obj` (dicts, lists, tuples, scalars) with every NaN or infinite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """JSON text that is always JSON: non-finite floats written as null (never NaN or Infinity)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
