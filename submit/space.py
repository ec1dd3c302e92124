"""Search-space parameters for `tune`: a numeric range (optionally integer, optionally log-scaled) or a list of
choices. Registered post-processing steps (`reranking.STEPS`) and fusion rules (`ensembling.FUSIONS`) declare
their default space with them, and a spec's `tune:` block overrides it key by key; both are plain data, so the
spec stays torch-free and optuna is imported only by `tune` itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from submit.errors import SubmitError


@dataclass(frozen=True)
class Param:
    """One searched value: `choices`, or `low`..`high` (`integer` values, `log` scale)."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def check(self, where: str) -> Param:
        """This parameter, or a one-line error naming `where` when it is not a usable range or choice list."""
        if self.choices is not None:
            if self.low is not None or self.high is not None or not self.choices:
                raise SubmitError(f"{where}: give either a non-empty 'choices' list or 'low' and 'high'")
            return self
        if self.low is None or self.high is None or not self.low <= self.high:
            raise SubmitError(f"{where}: expected 'low' <= 'high' (or 'choices'), got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise SubmitError(f"{where}: a log-scaled range needs low > 0, got {self.low}")
        if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise SubmitError(f"{where}: an integer range needs whole bounds, got {self.low}..{self.high}")
        return self

    def encoded_choices(self) -> tuple[Any, ...]:
        """The choices as Optuna stores them: None, bool, int, float and str as they are, anything else (a list
        such as an image size) as its JSON text."""
        return tuple(self.encode(c) for c in self.choices or ())

    def decode(self, value: Any) -> Any:
        """A value Optuna drew or recorded for this parameter, back as the choice it stands for."""
        for choice, encoded in zip(self.choices or (), self.encoded_choices()):
            if not _plain(choice) and value == encoded:
                return choice
        return value

    def contains(self, value: Any) -> bool:
        """Whether `value` is one of the choices or lies in the range (a whole number for an integer range)."""
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        whole = not self.integer or float(value) == int(value)
        return whole and float(self.low or 0) <= float(value) <= float(self.high or 0)

    def encode(self, value: Any) -> Any:
        """`value` as Optuna stores it for this parameter (see `encoded_choices`)."""
        return value if _plain(value) else json.dumps(value)

    def text(self) -> str:
        """How the parameter reads in a table: `{128, 256}` or `3..30 (int, log)`."""
        if self.choices is not None:
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        kind = ", ".join(k for k, on in (("int", self.integer), ("log", self.log)) if on)
        return f"{self.low:g}..{self.high:g}" + (f" ({kind})" if kind else "")


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def integers(low: int, high: int, log: bool = False) -> Param:
    """An integer range."""
    return Param(float(low), float(high), integer=True, log=log)


def floats(low: float, high: float, log: bool = False) -> Param:
    """A real range."""
    return Param(float(low), float(high), log=log)


def choice(values: Sequence[Any]) -> Param:
    """One of `values`."""
    return Param(choices=tuple(values))
