"""Training runs compared at a glance: one typed summary per run folder, sorted, and their validation curves.

A run folder is what `train` writes (see `submit.training`): `recipe.yaml` plus `metrics.json` (history of
validated epochs, best row, manifest fingerprint) and/or `last.pt` (the resumable state; read memory-mapped
for the completed epochs and, when metrics.json is missing, the history). A folder that is not a run is an
error when named directly; a parent folder of runs is scanned one level deep, and its other sub-folders are
skipped with a note. Times are the training seconds the epochs recorded (validation excluded).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import yaml

from submit import atomic, records
from submit.errors import SubmitError
from submit.metrics import METRIC_LABELS

SORTS = {"mAP": "best_mAP", "rank1": "best_rank1", "last-mAP": "last_mAP", "last-rank1": "last_rank1",
         "time": "train_seconds", "name": "name"}
ASCENDING = ("train_seconds", "name")
CURVE_METRICS = tuple((key, METRIC_LABELS[key]) for key in ("mAP", "rank1", "mINP"))


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One validated epoch of a run (metrics in [0, 1]; None when the epoch was not validated)."""

    epoch: int
    step: int
    mAP: float | None
    rank1: float | None
    mINP: float | None


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a run folder says about itself: recipe, progress, best/last scores, time, training data."""

    run_dir: str
    name: str
    recipe: str
    backbone: str
    epochs_done: int
    epochs_planned: int | None
    steps: int
    best_mAP: float | None
    best_rank1: float | None
    best_epoch: int | None
    last_mAP: float | None
    last_rank1: float | None
    train_seconds: float
    manifest: str | None
    validation: str | None
    curve: tuple[CurvePoint, ...]


@dataclasses.dataclass(frozen=True)
class RunsTable:
    """The runs found (sorted) and notes about folders skipped while scanning."""

    runs: tuple[RunSummary, ...]
    notes: tuple[str, ...]
    sort: str


def is_run(path: Path) -> bool:
    """A training run folder: recipe.yaml with metrics.json or last.pt beside it."""
    return (path / "recipe.yaml").is_file() and ((path / "metrics.json").is_file() or (path / "last.pt").is_file())


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Run folders named in `paths` (a run itself, or a parent scanned one level deep) and skip notes."""
    found: list[Path] = []
    notes: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise SubmitError(f"{path}: no such folder (expected a training run dir or a folder of runs)")
        if is_run(path):
            found.append(path)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        runs = [p for p in children if is_run(p)]
        if not runs:
            raise SubmitError(f"{path}: not a training run (no recipe.yaml with metrics.json or last.pt) "
                              "and no sub-folder is one")
        found.extend(runs)
        notes.extend(f"skipped {p}: not a training run" for p in children if p not in runs)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [next(p for p in found if p.resolve() == u) for u in unique], notes


@dataclasses.dataclass(frozen=True)
class _Row:
    """One history row as read (and checked) from metrics.json or last.pt."""

    epoch: int
    step: int
    mAP: float | None
    rank1: float | None
    mINP: float | None
    seconds: float


def read_run(path: str | Path) -> RunSummary:
    """Summarise one run folder; a damaged file, or a field of the wrong type in it, is one line naming the file
    and the field (`submit.records`): the run is refused, never summarised from half-read numbers."""
    path = Path(path)
    recipe = _read_yaml(path / "recipe.yaml")
    metrics = records.read_json(path / "metrics.json", "a JSON object with 'history'") \
        if (path / "metrics.json").is_file() else records.Record({}, path / "metrics.json")
    state, ckpt_history, ckpt_manifest = _read_last(path / "last.pt")
    history = [_row(r) for r in (metrics.records("history") if "history" in metrics else ckpt_history)]
    scored = [r for r in history if r.mAP is not None]
    best = max(scored, key=lambda r: r.mAP or 0.0) if scored else None
    last = scored[-1] if scored else None
    train = recipe.mapping("train") or records.Record({}, recipe.source, "train")
    backbone = recipe.mapping("backbone") or records.Record({}, recipe.source, "backbone")
    epochs_done = state.integer("epoch", minimum=0)
    steps = state.integer("step", minimum=0)
    return RunSummary(
        run_dir=str(path), name=path.name,
        recipe=metrics.text("recipe") or recipe.text("name") or path.name,
        backbone=backbone.text("name") or "?",
        epochs_done=max((r.epoch for r in history), default=0) if epochs_done is None else epochs_done,
        epochs_planned=train.integer("epochs"),
        steps=max((r.step for r in history), default=0) if steps is None else steps,
        best_mAP=_score(best, "mAP"), best_rank1=_score(best, "rank1"), best_epoch=None if best is None else best.epoch,
        last_mAP=_score(last, "mAP"), last_rank1=_score(last, "rank1"),
        train_seconds=float(sum(r.seconds for r in history)),
        manifest=metrics.text("manifest") or ckpt_manifest, validation=metrics.text("validation"),
        curve=_curve(history))


def _row(record: records.Record) -> _Row:
    """A history row's fields, checked: integers for epoch and step, numbers (NaN read as none) for scores."""
    return _Row(epoch=record.integer("epoch", 0, minimum=0) or 0, step=record.integer("step", 0, minimum=0) or 0,
                mAP=record.number("mAP", nonfinite_null=True), rank1=record.number("rank1", nonfinite_null=True),
                mINP=record.number("mINP", nonfinite_null=True),
                seconds=record.number("seconds", nonfinite_null=True, minimum=0.0) or 0.0)


def _curve(history: list[_Row]) -> tuple[CurvePoint, ...]:
    """Validated epochs in order; a row stopped mid-epoch gives way to the later row of the same epoch."""
    rows = {r.epoch: r for r in history if r.mAP is not None}
    return tuple(CurvePoint(e, r.step, r.mAP, r.rank1, r.mINP) for e, r in sorted(rows.items()))


def _score(row: _Row | None, key: str) -> float | None:
    return None if row is None else getattr(row, key)


def _read_yaml(path: Path) -> records.Record:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SubmitError(f"{path}: not readable YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise SubmitError(f"{path}: expected a recipe mapping")
    return records.Record(data, path)


def _read_last(path: Path) -> tuple[records.Record, list[records.Record], str | None]:
    """(state, history rows, manifest) of last.pt, memory-mapped, checked as metrics.json is; empty without one."""
    if not path.is_file():
        return records.Record({}, path, "state"), [], None
    from submit.run_folder import load_checkpoint  # lazy for start-up: torch, only for runs with a last.pt

    ckpt = records.Record(load_checkpoint(path, mmap=True), path)
    state = ckpt.mapping("state") or records.Record({}, path, "state")
    return state, ckpt.records("history"), ckpt.text("manifest")


def list_runs(paths: Sequence[str | Path], sort: str = "mAP") -> RunsTable:
    """Summaries of the runs in `paths`, sorted by `sort` (a key of `SORTS`; runs lacking it go last)."""
    if sort not in SORTS:
        raise SubmitError(f"--sort {sort!r}: expected one of {', '.join(SORTS)}")
    dirs, notes = find_runs(paths)
    runs = [read_run(d) for d in dirs]
    field = SORTS[sort]
    present = [r for r in runs if getattr(r, field) is not None]
    missing = [r for r in runs if getattr(r, field) is None]
    present.sort(key=lambda r: getattr(r, field), reverse=field not in ASCENDING)
    return RunsTable(tuple(present + missing), tuple(notes), sort)


def to_json(table: RunsTable) -> str:
    """The table for machines: {"sort", "runs": [...], "notes": [...]}; always JSON (a non-finite number is null)."""
    return records.dumps(dataclasses.asdict(table), indent=2)


def plot_curves(runs: Sequence[RunSummary], out: str | Path) -> Path:
    """PNG of mAP, rank-1 and mINP per validated epoch, one line per run (matplotlib, Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if not out.parent.is_dir():
        raise SubmitError(f"--plot {out}: folder {out.parent} does not exist")
    drawn = [r for r in runs if r.curve]
    if not drawn:
        raise SubmitError(f"--plot {out}: none of the runs has validation metrics to draw (data.split all?)")
    labels = _labels(drawn)
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4.2 * len(CURVE_METRICS), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], CURVE_METRICS):
        for run, label in zip(drawn, labels):
            points = [(p.epoch, 100 * getattr(p, key)) for p in run.curve if getattr(p, key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_title(f"validation {title}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{title} (%)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    try:
        with atomic.atomic_path(out) as tmp:  # submit.atomic: no half-written PNG, OSError one line
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return out


def _labels(runs: Sequence[RunSummary]) -> list[str]:
    """Folder names, with the parent folder added where two runs share a name."""
    names = [r.name for r in runs]
    return [f"{Path(r.run_dir).parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]
