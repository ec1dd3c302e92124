"""Tune an ensemble's settings on held-out TRAIN identities, never on the test or challenge split.

`tune` makes K held-out folds of the prepared DATA_DIR (`holdout.write_holdout_folds`: identities drawn from
TRAIN, query and gallery from different sequences, as in the real test split), trains the spec's members on
each fold's remaining identities (`training.train_members` into WORK/runs/foldK; finished runs are reused),
embeds each fold once (the on-disk feature cache), then lets Optuna's TPE sampler search the post-processing
and fusion settings (`search_space`: each registered step's and fusion rule's default space, the member
weights, then the spec's `tune:` block) for the best mean held-out mAP over the folds.

The study lives in a database (default `sqlite:///WORK/study.db`): a killed run resumes where it stopped
(finished trials are kept; the trial that was running is failed by Optuna's heartbeat and not counted), and
several `tune` processes given the same `--study` URL share the work until the study holds `trials` finished
trials. The result: the spec with the best values (`out`, paths rewritten for its folder, a comment block
saying where the values come from), WORK/trials.csv and three pictures (optimisation history, parameter
importances, slice plot).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from submit import atomic, holdout, predict, reranking, training
from submit.ensembling import FUSIONS, RUNS_PLACEHOLDER, EnsembleSpec, load_spec, resolve_spec_path
from submit.errors import SubmitError
from submit.manifest import fingerprint, read_manifest, select
from submit.metrics import evaluate_distances
from submit.space import Param, choice, floats

log = logging.getLogger(__name__)
HEARTBEAT_S = 30  # a trial whose process stops beating for 2 x this long is failed and not counted
WEIGHT_RANGE = floats(0.0, 2.0)  # member weights (the first member keeps its own: fusion is scale-free)


@dataclass
class Fold:
    """One held-out fold, ready to score: its members' features and training-split features on demand."""

    data_dir: Path
    spec: EnsembleSpec
    feats: list[tuple[np.ndarray, np.ndarray]]
    trains: list[Callable[[], np.ndarray]]
    query_pids: np.ndarray
    gallery_pids: np.ndarray

    def score(self, spec: EnsembleSpec) -> float:
        """Held-out mAP (0..1) of `spec`'s settings on this fold's cached features."""
        dist = predict.ensemble_distances(spec, self.feats, self.trains)
        return float(evaluate_distances(dist, self.query_pids, self.gallery_pids)["mAP"])


@dataclass(frozen=True)
class TuneResult:
    """What a `tune` run did: where things are, the best trial and the leading trials."""

    out: Path
    work_dir: Path
    study: str
    storage: str
    finished: int  # complete + pruned trials in the study
    complete: int
    best_trial: int
    best_value: float  # mean held-out mAP (0..1) over the folds
    fold_values: tuple[float, ...]
    best_params: dict[str, Any]
    leaders: list[dict[str, Any]]  # the best trials: number, value, spread, params
    pictures: list[Path]
    notes: list[str]


# ---- the search space ---------------------------------------------------------------------------------


def search_space(spec: EnsembleSpec) -> dict[str, Param]:
    """Spec key -> searched range: each step's registered space, the fusion rule (2+ members), member weights
    (2+ members, unless `tune.weights: false`), then the spec's `tune.space` (replacing or adding), minus
    `tune.fixed`. A fusion rule's own parameters (`reliability_k`) are searched only when that rule is drawn."""
    space: dict[str, Param] = {}
    for i, step in enumerate(spec.postprocess):
        for name, param in reranking.STEPS[step.op].space.items():
            space[f"postprocess[{i}].{name}"] = param
    if len(spec.members) > 1:
        space["fusion"] = choice(["mean"] if spec.fused_chain else list(FUSIONS))
        if spec.tune.weights:
            space.update({f"members[{i}].weight": WEIGHT_RANGE for i in range(1, len(spec.members))})
    space.update(spec.tune.space)
    conditional = {key for rule in FUSIONS.values() for key in getattr(rule, "space", {})}  # see fusion_space
    return {key: param for key, param in space.items() if key not in spec.tune.fixed and key not in conditional}


def fusion_space(spec: EnsembleSpec, rule: str) -> dict[str, Param]:
    """The parameters of fusion rule `rule` that are searched when it is drawn (its registered space, the spec's
    `tune.space` overriding), minus `tune.fixed`."""
    own = getattr(FUSIONS.get(rule), "space", {})
    return {key: spec.tune.space.get(key, param) for key, param in own.items() if key not in spec.tune.fixed}


def suggest(trial: Any, spec: EnsembleSpec, space: dict[str, Param]) -> dict[str, Any]:
    """Draw a value for every key of `space` (and of the drawn fusion rule's own space) from an Optuna trial."""
    values = {key: _draw(trial, key, param) for key, param in space.items()}
    rule = values.get("fusion", spec.fusion)
    values.update({key: _draw(trial, key, param) for key, param in fusion_space(spec, rule).items()})
    return values


def _draw(trial: Any, key: str, param: Param) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(key, list(param.choices))
    low, high = float(param.low or 0), float(param.high or 0)
    if param.integer:
        return trial.suggest_int(key, int(low), int(high), log=param.log)
    return trial.suggest_float(key, low, high, log=param.log)


def apply_values(spec: EnsembleSpec, values: dict[str, Any]) -> EnsembleSpec:
    """`spec` with `values` (spec key -> value, as `search_space` names them) put in place."""
    steps = list(spec.postprocess)
    members = list(spec.members)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("fusion", "reliability_k"):
            changes[key] = value
        elif key.startswith("postprocess["):
            i, name = predict.key_index(key), key.split(".", 1)[1]
            steps[i] = dataclasses.replace(steps[i], params={**steps[i].params, name: value})
        elif key.startswith("members["):
            i = predict.key_index(key)
            members[i] = dataclasses.replace(members[i], weight=float(value))
        else:
            raise SubmitError(f"tune: {key!r} is not a tunable key")
    return dataclasses.replace(spec, postprocess=tuple(steps), members=tuple(members), **changes)


# ---- folds ----------------------------------------------------------------------------------------------


def fold_dirs(data_dir: str | Path, work_dir: Path, n_ids: int | None, folds: int, seed: int) -> list[Path]:
    """The held-out folders to tune on: written from a prepared DATA_DIR (`n_ids` given), or DATA_DIR itself when
    it is already a held-out folder. A prepared folder without `--holdout` is refused: its test split is real."""
    if n_ids is None:
        holdout.check_tuning_dir(data_dir)  # one line: no record, so its test split is the real one
        if folds != 1:
            raise SubmitError(f"--folds {folds}: {data_dir} is one held-out folder already; pass --holdout N and a "
                              "prepared DATA_DIR to make several")
        return [Path(data_dir)]
    if holdout.holdout_record(data_dir) is not None:
        raise SubmitError(f"--data {data_dir}: already a held-out folder; pass the prepared DATA_DIR it came from "
                          "with --holdout, or leave --holdout out to tune on this folder")
    dirs = holdout.write_holdout_folds(data_dir, work_dir / "folds", n_ids, seed, folds)
    for path in dirs:
        holdout.check_tuning_dir(path)
    return dirs


def prepare_fold(spec_file: Path, data_dir: Path, runs_dir: Path, device: str | None, workers: int,
                 progress: bool) -> Fold:
    """Train the spec's members with a `train` block on this fold (reusing finished runs), check that no other
    member trained on a held-out identity, and embed the fold's held-out queries and gallery once."""
    record = holdout.check_tuning_dir(data_dir)
    loose = load_spec(spec_file, runs_dir, require_runs=False)
    for m in loose.members:
        if m.train is not None and not Path(m.run or "").is_relative_to(runs_dir.resolve()):
            raise SubmitError(f"{spec_file}: member {m.name}: tune trains members into its own runs folder; write "
                              f"its run as '{RUNS_PLACEHOLDER}/{Path(m.run or '').name}'")
    if any(m.train is not None for m in loose.members):
        training.train_members(spec_file, data_dir, runs_dir, device=device, progress=progress, skip_finished=True)
    spec = load_spec(spec_file, runs_dir)
    manifest = read_manifest(data_dir)
    _refuse_foreign_members(spec, fingerprint(manifest), record, spec_file)
    query, gallery = select(manifest, "test", "query"), select(manifest, "test", "gallery")
    feats = predict.member_feature_pairs(spec, data_dir, query, gallery, device, workers, progress)
    trains = [predict.train_features(m, data_dir, device, workers, progress) for m in spec.members]
    return Fold(data_dir, spec, feats, trains, query["pid"].to_numpy(), gallery["pid"].to_numpy())


def _refuse_foreign_members(spec: EnsembleSpec, fold_manifest: str, record: holdout.HoldoutRecord,
                            spec_file: Path) -> None:
    """A run (or ONNX) member must have trained on this fold's manifest, which holds no held-out identity."""
    for name, fp in predict.trained_manifests(spec).items():
        if fp != fold_manifest:
            seen = f"manifest {fp[:12]}" if fp else "an unrecorded manifest"
            raise SubmitError(f"{spec_file}: member {name} was trained on {seen}, not on the held-out fold "
                              f"{record.fold} ({fold_manifest[:12]}), so it may have seen held-out identities; "
                              "give it a `train` block so tune trains it on the fold")


# ---- the study -------------------------------------------------------------------------------------------


def open_study(storage: str, name: str, setup: dict[str, Any], seed: int, fresh_seed: bool) -> Any:
    """The Optuna study `name` in `storage`, created or loaded; a study made for another setup is refused."""
    import optuna  # lazy for start-up: optuna imports sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}  # writers wait their turn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: experimental
            store = optuna.storages.RDBStorage(storage, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                               grace_period=2 * HEARTBEAT_S)
    except Exception as exc:  # sqlalchemy's errors for a bad URL, an unreadable or foreign file
        raise SubmitError(f"--study {storage}: cannot open the study database ({str(exc).splitlines()[0]})") from None
    sampler = optuna.samplers.TPESampler(seed=seed if fresh_seed else (seed * 1_000_003 + os.getpid()) % 2**32)
    study = optuna.create_study(storage=store, study_name=name, direction="maximize", sampler=sampler,
                                load_if_exists=True)
    recorded = study.user_attrs.get("setup")
    if recorded is None:
        study.set_user_attr("setup", setup)
    elif recorded != setup:
        diff = sorted(k for k in set(recorded) | set(setup) if recorded.get(k) != setup.get(k))
        raise SubmitError(f"--study {storage}: study {name!r} was made with another {', '.join(diff)}; "
                          "pass the same options, or another --study")
    return study


def finished_trials(study: Any) -> tuple[int, int]:
    """(complete + pruned, complete) trials of the study."""
    from optuna.trial import TrialState  # lazy for start-up: optuna

    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete = states.count(TrialState.COMPLETE)
    return complete + states.count(TrialState.PRUNED), complete


def objective(folds: list[Fold], space: dict[str, Param]) -> Callable[[Any], float]:
    """Optuna's objective: draw the settings, score them on every fold, return the mean held-out mAP (0..1).

    Settings a step refuses (a whitening dimension above the features' rank, a k above the gallery) prune the
    trial with the step's one-line reason, so the sampler learns to avoid them."""
    import optuna  # lazy for start-up: optuna

    def run(trial: Any) -> float:
        values = suggest(trial, folds[0].spec, space)
        trial.set_user_attr("pid", os.getpid())  # which process ran it (several may share a study)
        try:
            scores = [fold.score(apply_values(fold.spec, values)) for fold in folds]
        except SubmitError as exc:
            trial.set_user_attr("refused", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("fold_mAP", scores)
        return float(np.mean(scores))
    return run


# ---- the command -----------------------------------------------------------------------------------------


def tune(spec_path: str | Path, data_dir: str | Path, out: str | Path, holdout_ids: int | None = 60,
         folds: int = 1, holdout_seed: int = 0, trials: int = 200, study: str | None = None, jobs: int = 1,
         timeout: float | None = None, seed: int = 0, work_dir: str | Path | None = None, device: str | None = None,
         workers: int = 2, progress: bool = True) -> TuneResult:
    """Search the spec's settings on held-out TRAIN identities and write the tuned spec to `out` (module docstring).

    Resumes the study when it exists (same setup), and stops once it holds `trials` finished trials, after
    `timeout` seconds, or both; `jobs` threads run trials in this process."""
    out = Path(out)
    atomic.check_file_target(out)
    if trials < 1 or jobs < 1 or folds < 1:
        raise SubmitError(f"--trials {trials} / --jobs {jobs} / --folds {folds}: expected whole numbers >= 1")
    spec_file = resolve_spec_path(spec_path)
    base = load_spec(spec_file, runs_dir=".", require_runs=False)
    space = search_space(base)
    if not space and not fusion_space(base, base.fusion):
        raise SubmitError(f"{spec_file}: nothing to tune (no post-processing steps, one member, every key fixed)")
    work = Path(work_dir) if work_dir is not None else out.parent / "tune"
    dirs = fold_dirs(data_dir, work, holdout_ids, folds, holdout_seed)
    prepared = [prepare_fold(spec_file, d, work / "runs" / d.name, device, workers, progress) for d in dirs]
    storage = study or f"sqlite:///{(work / 'study.db').resolve()}"
    name = f"{spec_file.stem}-{'-'.join(d.name for d in dirs)}"[:200]
    setup = {"spec": str(spec_file.resolve()), "folds": [str(d.resolve()) for d in dirs],
             "space": {k: p.text() for k, p in space.items()}}
    work.mkdir(parents=True, exist_ok=True)
    opened = open_study(storage, name, setup, seed, fresh_seed=study is None and jobs == 1)
    _optimise(opened, objective(prepared, space), trials, jobs, timeout)
    return _finish(opened, base, spec_file, out, work, storage, name, dirs)


def _optimise(study: Any, run: Callable[[Any], float], trials: int, jobs: int, timeout: float | None) -> None:
    """Run trials until the study holds `trials` finished ones (other processes' included) or `timeout` passes."""
    from optuna.study import MaxTrialsCallback  # lazy for start-up: optuna
    from optuna.trial import TrialState

    left = trials - finished_trials(study)[0]
    if left <= 0:
        return
    stop = MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    study.optimize(run, n_trials=left, timeout=timeout, n_jobs=jobs, callbacks=[stop], gc_after_trial=False,
                   show_progress_bar=False)


def _finish(study: Any, base: EnsembleSpec, spec_file: Path, out: Path, work: Path, storage: str, name: str,
            dirs: list[Path]) -> TuneResult:
    """Write the tuned spec, the trials table and the pictures; the result for the CLI."""
    finished, complete = finished_trials(study)
    if complete == 0:
        raise SubmitError(f"study {name!r}: no trial finished with a score (see {work / 'trials.csv'}); widen the "
                          "`tune:` ranges or raise --trials")
    best = study.best_trial
    fold_values = tuple(float(v) for v in best.user_attrs.get("fold_mAP", [best.value]))
    records = [holdout.holdout_record(d) for d in dirs]
    header = _header(spec_file, study, storage, name, finished, best, fold_values, records)
    predict.write_spec_values(spec_file, out, best.params, header)
    table = study.trials_dataframe()
    with atomic.atomic_file(work / "trials.csv", "w", newline="") as fh:
        table.to_csv(fh, index=False)
    pictures, notes = save_pictures(study, work)
    leaders = [{"number": t.number, "value": float(t.value), "spread": float(np.std(t.user_attrs.get("fold_mAP", [0]))),
                "params": dict(t.params)} for t in sorted(_complete(study), key=lambda t: -float(t.value))[:5]]
    return TuneResult(out, work, name, storage, finished, complete, best.number, float(best.value), fold_values,
                      dict(best.params), leaders, pictures, notes)


def _complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState  # lazy for start-up: optuna

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _header(spec_file: Path, study: Any, storage: str, name: str, finished: int, best: Any,
            fold_values: tuple[float, ...], records: list[Any]) -> str:
    """The comment block at the top of the tuned spec: where its values come from."""
    rec = records[0]
    spread = f" ± {100 * float(np.std(fold_values)):.2f}" if len(fold_values) > 1 else ""
    today = datetime.date.today().isoformat()
    lines = [f"Tuned by `reident-submit tune` on {today} from {spec_file}",
             f"study {name!r} in {storage}: {finished} finished trials, best #{best.number}",
             f"held-out mAP {100 * float(best.value):.2f}{spread} (mean over {len(fold_values)} fold(s) of "
             f"{rec.n_ids if rec else '?'} TRAIN identities, --holdout-seed {rec.seed if rec else '?'})",
             "chosen on held-out TRAIN identities only: never scored on the test or challenge split",
             "best values: " + json.dumps(best.params, sort_keys=True)]
    return "".join(f"# {line}\n" for line in lines)


def save_pictures(study: Any, work: Path) -> tuple[list[Path], list[str]]:
    """Optimisation history, parameter importances and a slice plot as PNGs (Optuna's matplotlib backend); a plot
    the study cannot give yet (too few trials) is a note instead."""
    import matplotlib  # lazy for start-up: matplotlib and optuna's plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    made, notes = [], []
    for name, plot in (("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances),
                       ("slice", plots.plot_slice)):
        path = work / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                drawn = plot(study)
            axes = drawn.flat[0] if isinstance(drawn, np.ndarray) else drawn
            figure: Any = axes.get_figure(root=True)
            with atomic.atomic_file(path, "wb") as fh:
                figure.savefig(fh, format="png", dpi=90, bbox_inches="tight")
            made.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            notes.append(f"{name} plot skipped: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        finally:
            plt.close("all")
    return made, notes


def rescore(spec_path: str | Path, data_dir: str | Path, runs_dir: str | Path, device: str | None = None,
            workers: int = 2) -> float:
    """Held-out mAP (0..1) of a spec on a held-out folder, through `predict`'s own path (no Optuna): what a tuned
    spec's recorded best value must equal."""
    holdout.check_tuning_dir(data_dir)
    spec = load_spec(resolve_spec_path(spec_path), runs_dir)
    manifest = read_manifest(data_dir)
    query, gallery = select(manifest, "test", "query"), select(manifest, "test", "gallery")
    dist = predict.fuse_members(spec, data_dir, query, gallery, device, workers, False, {}, False)
    return float(evaluate_distances(dist, query["pid"].to_numpy(), gallery["pid"].to_numpy())["mAP"])
