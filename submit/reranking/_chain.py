"""The post-processing registry `STEPS` and the one chain that runs its steps (`run_chain`; `postprocess` wraps it).

A step is a function `(query_feats, gallery_feats, **params)` returning new (queries, gallery) features, or, for a
distance step (k_reciprocal), the final (Q, G) distances. Its one line in `STEPS` is what the ensemble spec's
`postprocess: [{op, params}]` validates against, what `postprocess`'s short names and the score-table labels come
from, and what `run_chain` dispatches on.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from submit.errors import SubmitError
from submit.reranking._checks import _as_features, _pair, _unit
from submit.reranking._expansion import cosine_distance, database_augmentation, query_expansion
from submit.reranking._kreciprocal import k_reciprocal
from submit.reranking._whitening import pca_whitening
from submit.space import Param, choice, floats, integers

RUNTIME = ("train_feats", "timings")  # step arguments the caller of a chain supplies; a chain never sets them


@dataclass(frozen=True)
class Step:
    """A registered step: its function, its short name (for `postprocess`), its score-table label and its kind."""

    fn: Callable[..., Any]
    short: str
    label: str
    distances: bool = False  # returns (Q, G) distances instead of features, so it must be the last step
    space: dict[str, Param] = field(default_factory=dict)  # what `tune` searches by default, per parameter

    def parameters(self) -> list[str]:
        """The parameters a chain may set: the function's keyword parameters after the two feature matrices."""
        return [name for name in list(inspect.signature(self.fn).parameters)[2:] if name not in RUNTIME]

    def defaults(self) -> dict[str, Any]:
        """The function's own default of each parameter a chain may set (where it has one)."""
        params = inspect.signature(self.fn).parameters
        return {name: params[name].default for name in self.parameters()
                if params[name].default is not inspect.Parameter.empty}

    def takes(self, argument: str) -> bool:
        """Whether the function accepts the runtime argument `argument` (e.g. `train_feats`)."""
        return argument in inspect.signature(self.fn).parameters


STEPS: dict[str, Step] = {
    "query_expansion": Step(query_expansion, "qe", "QE", space={"k": integers(1, 10), "alpha": floats(0.5, 6)}),
    "database_augmentation": Step(database_augmentation, "dba", "DBA",
                                  space={"k": integers(1, 10), "alpha": floats(0.5, 6)}),
    "pca_whitening": Step(pca_whitening, "whiten", "PCA-whiten",
                          space={"dim": integers(32, 512, log=True), "fit_on": choice(["train", "query+gallery"])}),
    "k_reciprocal": Step(k_reciprocal, "rerank", "re-rank", distances=True,
                         space={"k1": integers(3, 30), "k2": integers(1, 10), "lambda_value": floats(0.0, 0.9)}),
}


class Stage(NamedTuple):
    """The chain after one step: its label ("+ QE + re-rank"), the features, and the distances of a distance step
    (None after a feature step: rank the features by cosine distance)."""

    label: str
    query: np.ndarray
    gallery: np.ndarray
    distances: np.ndarray | None


def run_chain(query_feats: np.ndarray, gallery_feats: np.ndarray, steps: Sequence[tuple[str, Mapping[str, Any]]],
              train_feats: Any = None) -> Iterator[Stage]:
    """Apply registered steps `(name in STEPS, params)` in order, yielding the stage after each.

    `train_feats` (an array, or a function returning one) reaches the steps that take it (fitted steps such as
    pca_whitening with fit_on: train). Features are used as given (normally unit rows).
    """
    check_chain(steps)
    q, g, label = query_feats, gallery_feats, ""
    for name, params in steps:
        step = STEPS[name]
        label += f" + {step.label}"
        extra = {"train_feats": train_feats} if step.takes("train_feats") else {}
        out = step.fn(q, g, **params, **extra)
        if step.distances:
            yield Stage(label.strip(), q, g, np.asarray(out, dtype=np.float32))
            return
        q, g = out
        yield Stage(label.strip(), q, g, None)


def postprocess(query_feats: np.ndarray, gallery_feats: np.ndarray,
                steps: Sequence[dict[str, dict[str, Any]]] = (), train_feats: Any = None) -> np.ndarray:
    """Run a chain of steps and return (Q, G) float32 distances.

    Each step is a one-key dict: ``{"dba": {"k": 5}}``, ``{"qe": {"k": 1, "alpha": 3}}``,
    ``{"whiten": {"dim": 64, "fit_on": "train"}}`` or ``{"rerank": {"k1": 20, "k2": 6, "lambda": 0.3}}``
    (the `STEPS` names and ``lambda_value`` work too). Features (and `train_feats`, the training split's features
    for fit_on: train) are L2-normalised first; "rerank" must come last; without it the result is the cosine
    distance.
    """
    q, g = _pair(query_feats, gallery_feats)
    q, g = _unit(q), _unit(g)
    train = None if train_feats is None else _unit(_as_features(train_feats, "train_feats"))
    written = [_parse_step(step, i) for i, step in enumerate(steps)]
    chain = [(step_named(name) or name, params) for name, params in written]
    check_chain(chain, [name for name, _ in written])
    last = None
    for last in run_chain(q, g, chain, train):
        pass
    if last is None:
        return cosine_distance(q, g)
    return last.distances if last.distances is not None else cosine_distance(last.query, last.gallery)


def step_named(name: str) -> str | None:
    """The `STEPS` name of a step given by its name or its short name (None: no such step)."""
    if name in STEPS:
        return name
    return next((long for long, step in STEPS.items() if step.short == name), None)


def check_chain(steps: Sequence[tuple[str, Mapping[str, Any]]], written: Sequence[str] | None = None) -> None:
    """Each step registered, with parameters its function takes, and a distance step only last; one-line errors
    name `steps[i]` and the step as written (`written[i]`, e.g. a short name)."""
    known = [n for name, step in STEPS.items() for n in (step.short, name)]
    for i, (name, params) in enumerate(steps):
        shown = written[i] if written else name
        if name not in STEPS:
            raise SubmitError(f"steps[{i}]: unknown step {shown!r} (known: {', '.join(known)})")
        allowed = STEPS[name].parameters()
        for key in params:
            if key not in allowed:
                raise SubmitError(f"steps[{i}].{shown}.{key}: not a parameter of {shown} "
                                  f"(allowed: {', '.join(allowed)})")
        if STEPS[name].distances and i != len(steps) - 1:
            raise SubmitError(f"steps[{i}]: {shown!r} returns distances, so it must be the last step")


def _parse_step(step: Any, i: int) -> tuple[str, dict[str, Any]]:
    """One `postprocess` step as (name as written, keyword parameters): a one-key mapping of a mapping."""
    if not isinstance(step, dict) or len(step) != 1:
        raise SubmitError(f"steps[{i}]: expected a one-key mapping like {{'rerank': {{'k1': 20}}}}, got {step!r}")
    (name, params), = step.items()
    if params is not None and not isinstance(params, dict):
        raise SubmitError(f"steps[{i}].{name}: expected a mapping of parameters, got {params!r}")
    params = dict(params or {})
    if "lambda" in params:
        params["lambda_value"] = params.pop("lambda")
    return name, params
