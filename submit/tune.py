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

With `--train-space` a training study comes first (`search_training`): each trial writes the members' recipe
values (epochs, learning rate, input size by default: `recipe.train_space`; `members[i].<recipe key>` in the
`tune:` block) into its own spec, trains every member on every fold into WORK/train/trial-N/, reports each
epoch's held-out validation to Optuna's median pruner (a poor run stops after its first validations) and
scores the spec with its own post-processing. A training trial stopped or killed part-way is continued by the
next `tune` (`requeue_interrupted`, `continue_from`): same values, its runs resumed from their last.pt. The
post-processing search then runs on the best trial's runs.
Optuna itself lives in `submit.study`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from submit import atomic, holdout, predict, reranking, training
from submit.distributed import Stopped
from submit.ensembling import (
    FUSIONS,
    RUNS_PLACEHOLDER,
    EnsembleSpec,
    load_spec,
    member_recipe,
    resolve_spec_path,
    train_key,
)
from submit.errors import SubmitError
from submit.manifest import fingerprint, read_manifest, select
from submit.metrics import evaluate_distances
from submit.recipe import apply_overrides, override
from submit.recipe import train_space as train_space_of
from submit.space import Param, choice, floats
from submit.study import (
    SpecTrial,
    complete_trials,
    decode,
    draw,
    enqueue_first,
    finished_trials,
    open_study,
    optimise,
    refusal_note,
    requeue_interrupted,
    save_pictures,
    spec_value,
    write_table,
)

log = logging.getLogger(__name__)
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
    train: TrainChoice | None = None  # the training study's outcome (`--train-space`)
    own: SpecTrial | None = None  # the trial of the spec's own values, scored first
    nested: tuple[NestedRow, ...] = ()  # `--nested`: each fold scored with the values chosen on the others

    def nested_summary(self) -> str:
        """The nested check in one line (`nested_text`)."""
        return nested_text(self.nested)


# ---- the search space ---------------------------------------------------------------------------------


def search_space(spec: EnsembleSpec) -> dict[str, Param]:
    """Spec key -> searched range: each step's registered space, the fusion rule (2+ members), member weights
    (2+ members, unless `tune.weights: false`), then the spec's `tune.space` (replacing or adding), minus the
    keys `tune.fixed` / `tune.only` keep. A fusion rule's own parameters (`reliability_k`) are searched only when
    that rule is drawn."""
    space: dict[str, Param] = {}
    for i, step in enumerate(spec.postprocess):
        for name, param in reranking.STEPS[step.op].space.items():
            space[f"postprocess[{i}].{name}"] = param
    if len(spec.members) > 1:
        space["fusion"] = choice(["mean"] if spec.fused_chain else list(FUSIONS))
        if spec.tune.weights:
            space.update({f"members[{i}].weight": WEIGHT_RANGE for i in range(1, len(spec.members))})
    space.update({key: param for key, param in spec.tune.space.items() if not train_key(key)})
    conditional = {key for rule in FUSIONS.values() for key in getattr(rule, "space", {})}  # see fusion_space
    return {key: param for key, param in space.items() if spec.tune.searches(key) and key not in conditional}


def fusion_space(spec: EnsembleSpec, rule: str) -> dict[str, Param]:
    """The parameters of fusion rule `rule` that are searched when it is drawn (its registered space, the spec's
    `tune.space` overriding), minus the keys `tune.fixed` / `tune.only` keep."""
    own = getattr(FUSIONS.get(rule), "space", {})
    return {key: spec.tune.space.get(key, param) for key, param in own.items() if spec.tune.searches(key)}


def suggest(trial: Any, spec: EnsembleSpec, space: dict[str, Param]) -> dict[str, Any]:
    """Draw a value for every key of `space` (and of the drawn fusion rule's own space) from an Optuna trial."""
    values = {key: draw(trial, key, param) for key, param in space.items()}
    rule = values.get("fusion", spec.fusion)
    values.update({key: draw(trial, key, param) for key, param in fusion_space(spec, rule).items()})
    return values


def spec_values(spec: EnsembleSpec) -> dict[str, Any]:
    """The spec's own value of every key `search_space` and `fusion_space` may name: what it scores as written."""
    values: dict[str, Any] = {"fusion": spec.fusion, "reliability_k": spec.reliability_k}
    for i, step in enumerate(spec.postprocess):
        own = {**reranking.STEPS[step.op].defaults(), **step.params}
        values.update({f"postprocess[{i}].{name}": value for name, value in own.items()})
    values.update({f"members[{i}].weight": m.weight for i, m in enumerate(spec.members)})
    return values


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
                 progress: bool, on_epoch: Callable[[str, dict, int], bool] | None = None) -> Fold | None:
    """Train the spec's members with a `train` block on this fold (reusing finished runs), check that no other
    member trained on a held-out identity, and embed the fold's held-out queries and gallery once. None when
    `on_epoch` (each run's epoch hook) stopped a run early."""
    record = holdout.check_tuning_dir(data_dir)
    loose = load_spec(spec_file, runs_dir, require_runs=False)
    for m in loose.members:
        if m.train is not None and not Path(m.run or "").is_relative_to(runs_dir.resolve()):
            raise SubmitError(f"{spec_file}: member {m.name}: tune trains members into its own runs folder; write "
                              f"its run as '{RUNS_PLACEHOLDER}/{Path(m.run or '').name}'")
    if any(m.train is not None for m in loose.members):
        done = training.train_members(spec_file, data_dir, runs_dir, device=device, progress=progress,
                                      skip_finished=True, on_epoch=on_epoch)
        if any(result["stopped_early"] for result in done):
            return None
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


def objective(folds: list[Fold], space: dict[str, Param]) -> Callable[[Any], float]:
    """Optuna's objective: draw the settings, score them on every fold, return the mean held-out mAP (0..1).

    Settings a step refuses (a whitening dimension above the features' rank, a k above the gallery) prune the
    trial with the step's one-line reason, so the sampler learns to avoid them."""

    def run(trial: Any) -> float:
        values = suggest(trial, folds[0].spec, space)
        return scored(trial, lambda: [fold.score(apply_values(fold.spec, values)) for fold in folds])
    return run


def scored(trial: Any, fold_scores: Callable[[], list[float]]) -> float:
    """A trial's value: the mean of `fold_scores()` (held-out mAP per fold, recorded with the process id), or a
    pruned trial carrying the one-line reason of a refusal. A stop signal passes through: the trial fails."""
    import optuna  # lazy for start-up: optuna

    trial.set_user_attr("pid", os.getpid())  # which process ran it (several may share a study)
    try:
        scores = fold_scores()
    except Stopped:
        raise  # the trial fails (not counted) and tune ends with the signal's status
    except SubmitError as exc:
        trial.set_user_attr("refused", str(exc))
        raise optuna.TrialPruned(str(exc)) from None
    trial.set_user_attr("fold_mAP", scores)
    return float(np.mean(scores))


# ---- --train-space: the training study ------------------------------------------------------------------

PRUNE_STEP = 1000  # a trial's intermediate values: step = run index (fold, then member order) x this + the
# permille of the run's schedule done (1..999), so runs of other lengths are compared at the same fraction


@dataclass(frozen=True)
class TrainChoice:
    """The training study's outcome: the best trial's recipe values, the spec and runs it trained."""

    study: str
    finished: int
    complete: int
    number: int
    value: float  # mean held-out mAP (0..1) with the spec's own post-processing
    fold_values: tuple[float, ...]
    values: dict[str, Any]  # training key (members[i].<recipe key>) -> value
    spec_file: Path  # the trial's spec: the original with `values` as member overrides
    runs_dir: Path  # holds one runs folder per fold
    pictures: list[Path]
    notes: list[str]
    own: SpecTrial | None = None  # the trial of the recipes as the spec writes them


def train_space(spec: EnsembleSpec, where: str | Path) -> dict[str, Param]:
    """Training keys searched by `--train-space`: for each member with a `train` block its recipe's default space
    (`recipe.train_space`: epochs, learning rate, input size), then the spec's `tune.space` training keys, minus
    the keys `tune.fixed` / `tune.only` keep. Each range's ends (or choices) are applied to the member's recipe
    first, so a value the recipe refuses is one line now, not a failed trial later."""
    space: dict[str, Param] = {}
    recipes = {i: member_recipe(m, where) for i, m in enumerate(spec.members) if m.train is not None}
    for i, recipe in recipes.items():
        space.update({f"members[{i}].{key}": param for key, param in train_space_of(recipe).items()})
    space.update({key: param for key, param in spec.tune.space.items() if train_key(key)})
    space = {key: param for key, param in space.items() if spec.tune.searches(key)}
    for key, param in space.items():
        index, name = train_key(key) or (0, "")
        ends = param.choices if param.choices is not None else (param.low, param.high)
        for value in ends:
            value = int(value) if param.integer and value is not None else value
            apply_overrides(recipes[index], [override(name, value)], where=f"{where}: key 'tune.space.{key}'")
    return space


def recipe_values(spec: EnsembleSpec, space: dict[str, Param], where: str | Path) -> dict[str, Any]:
    """Each training key's value in its member's recipe as the spec writes it (a tuple as a list)."""
    values = {}
    recipes = {i: member_recipe(m, where) for i, m in enumerate(spec.members) if m.train is not None}
    for key in space:
        index, name = train_key(key) or (0, "")
        value: Any = recipes[index]
        for part in name.split("."):
            value = getattr(value, part)
        values[key] = list(value) if isinstance(value, tuple) else value
    return values


def below_median(value: float, step: int, finished: list[dict[int, float]], startup: int = 2) -> bool:
    """Whether `value`, reported at `step` (run index x PRUNE_STEP + permille of that run's schedule), is below the
    median of finished trials' values for the same run at the latest step they had reached by the same fraction
    of their schedule (a 6-epoch run's epoch 2 against a 3-epoch run's epoch 1, a 5-epoch run's epoch 2 against a
    3-epoch run's epoch 1: never against a run further on). Needs `startup` finished trials with such a value."""
    run, done = divmod(step, PRUNE_STEP)
    reached = []
    for values in finished:
        earlier = [s for s in values if s // PRUNE_STEP == run and s % PRUNE_STEP <= done]
        if earlier:
            reached.append(values[max(earlier)])
    return len(reached) >= startup and value < float(np.median(reached))


class _Pruning:
    """A training trial's epoch hook: reports each validation's held-out mAP to Optuna (step: the run, then the
    fraction of its schedule done) and, from a run's second validation on, stops the run and the trial when this
    value is `below_median` of the finished trials' (Optuna's own pruners compare a trial's best value so far, which
    a good first run would carry through the later ones, and only at identical steps).

    `order` lists the trial's runs (fold, then member) as `(fold, run name)`: a run's index is its place there, not
    the order the hook first sees it in, since a continued trial's finished runs are never seen. `earlier` holds
    the values an interrupted trial had reported (`continue_from`): they are reported again and counted."""

    def __init__(self, trial: Any, order: list[tuple[str, str]], earlier: dict[int, float] | None = None) -> None:
        self.trial, self.order, self.pruned_at = trial, order, ""
        self.runs: dict[int, int] = {}  # run index -> validations seen
        for step, value in sorted((earlier or {}).items()):
            trial.report(value, step=step)
            index = step // PRUNE_STEP
            self.runs[index] = self.runs.get(index, 0) + 1

    def __call__(self, run: str, row: dict, epochs: int) -> bool:
        if row.get("mAP") is None:
            return False
        index = self.order.index((Path(run).parent.name, Path(run).name))
        self.runs[index] = self.runs.get(index, 0) + 1
        done = max(1, min(PRUNE_STEP - 1, round((PRUNE_STEP - 1) * int(row["epoch"]) / epochs)))
        step = index * PRUNE_STEP + done
        self.trial.report(float(row["mAP"]), step=step)
        if self.runs[index] > 1 and below_median(float(row["mAP"]), step, self._finished()):
            self.pruned_at = f"{Path(run).name} epoch {row['epoch']} of {epochs} (held-out mAP {100 * row['mAP']:.2f})"
        return bool(self.pruned_at)

    def _finished(self) -> list[dict[int, float]]:
        """The intermediate values of the study's finished (complete) trials."""
        return [dict(t.intermediate_values) for t in complete_trials(self.trial.study)]


def train_objective(spec_file: Path, dirs: list[Path], work: Path, space: dict[str, Param], device: str | None,
                    workers: int, progress: bool) -> Callable[[Any], float]:
    """The training study's objective: draw recipe values, write them into the trial's spec (member overrides),
    train every member on every fold (stopped early when pruned), return the mean held-out mAP of the spec with
    its own post-processing. A run the recipe or the loss refuses (divergence) prunes the trial with that line."""
    import optuna  # lazy for start-up: optuna

    def run(trial: Any) -> float:
        values = {key: draw(trial, key, param) for key, param in space.items()}
        folder = work / "train" / f"trial-{trial.number}"
        if folder.exists():  # a trial number comes once per study: this is a deleted study's (or another spec's)
            shutil.rmtree(folder)
        earlier = continue_from(trial, work, folder)
        trial_spec = predict.write_spec_values(spec_file, folder / "spec.yaml", values,
                                               f"# tune --train-space: trial {trial.number}\n")
        members = [Path(m.run or "").name for m in load_spec(trial_spec, folder, require_runs=False).members
                   if m.train is not None]
        pruning = _Pruning(trial, [(d.name, name) for d in dirs for name in members], earlier)

        def fold_scores() -> list[float]:
            scores = []
            for d in dirs:
                fold = prepare_fold(trial_spec, d, folder / "runs" / d.name, device, workers, progress, pruning)
                if fold is None:
                    trial.set_user_attr("pruned_at", pruning.pruned_at)
                    raise optuna.TrialPruned(f"pruned at {pruning.pruned_at}")
                scores.append(fold.score(fold.spec))
            return scores
        return scored(trial, fold_scores)
    return run


def continue_from(trial: Any, work: Path, folder: Path) -> dict[int, float]:
    """For a trial queued to continue an interrupted one (`requeue_interrupted`): move that trial's folder to this
    trial's, so its runs resume from their last.pt (finished ones are reused), and return the validations it had
    reported. {} otherwise, or when another process took the folder first."""
    number = trial.user_attrs.get("continues")
    old = work / "train" / f"trial-{number}"
    if number is None or not old.is_dir():
        return {}
    try:
        os.replace(old, folder)
    except OSError:  # gone meanwhile (another tune process continued it): train afresh
        return {}
    log.info(f"training trial {trial.number} continues interrupted trial {number} (its runs resume from last.pt)")
    earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number == number]
    return dict(earlier[0].intermediate_values) if earlier else {}


def interrupted(work: Path, number: int) -> bool:
    """Whether training trial `number` left a run to continue: some last.pt under WORK/train/trial-N/runs."""
    runs = work / "train" / f"trial-{number}" / "runs"
    return runs.is_dir() and any(runs.glob("*/*/last.pt"))


def search_training(spec_file: Path, base: EnsembleSpec, space: dict[str, Param], dirs: list[Path], work: Path,
                    storage: str, name: str, trials: int, seed: int, fresh_seed: bool, device: str | None,
                    workers: int, progress: bool) -> TrainChoice:
    """Run the training study over `space` until it holds `trials` finished trials (no timeout: a run is not
    stopped half-way; runs below the median are pruned by `_Pruning`) and return its best trial; its trials table
    and pictures go to WORK/train/."""
    import optuna  # lazy for start-up: optuna

    setup = {"spec": str(spec_file.resolve()), "folds": [str(d.resolve()) for d in dirs],
             "train_space": {k: p.text() for k, p in space.items()}}
    opened = open_study(storage, f"{name}-train", setup, seed, fresh_seed, optuna.pruners.NopPruner())  # _Pruning
    requeue_interrupted(opened, functools.partial(interrupted, work))  # a stopped trial continues, not restarts
    enqueue_first(opened, recipe_values(base, space, spec_file), space)
    optimise(opened, train_objective(spec_file, dirs, work, space, device, workers, progress), trials, 1, None)
    finished, complete = finished_trials(opened)
    folder = work / "train"
    folder.mkdir(parents=True, exist_ok=True)
    write_table(opened, folder / "trials.csv")
    if complete == 0:
        raise SubmitError(f"study {name}-train: no training trial finished with a score{refusal_note(opened)}; see "
                          f"{folder / 'trials.csv'}, widen the training ranges or raise --train-trials")
    best = opened.best_trial
    pictures, notes = save_pictures(opened, folder, prefix="train-")
    trial_dir = folder / f"trial-{best.number}"
    return TrainChoice(f"{name}-train", finished, complete, best.number, float(best.value),
                       tuple(float(v) for v in best.user_attrs.get("fold_mAP", [best.value])),
                       decode(dict(best.params), space), trial_dir / "spec.yaml", trial_dir / "runs", pictures, notes,
                       spec_value(opened))


# ---- the command -----------------------------------------------------------------------------------------


def tune(spec_path: str | Path, data_dir: str | Path, out: str | Path, holdout_ids: int | None = 60,
         folds: int = 1, holdout_seed: int = 0, trials: int = 200, study: str | None = None, jobs: int = 1,
         timeout: float | None = None, seed: int = 0, work_dir: str | Path | None = None, device: str | None = None,
         workers: int = 2, progress: bool = True, train_trials: int | None = None, nested: bool = False) -> TuneResult:
    """Search the spec's settings on held-out TRAIN identities and write the tuned spec to `out` (module docstring).

    Resumes the study when it exists (same setup), and stops once it holds `trials` finished trials, after
    `timeout` seconds, or both; `jobs` threads run trials in this process. `train_trials` (`--train-space`) first
    runs a training study of that many trials over the members' recipes; the search then runs on its best trial's
    runs, and the tuned spec holds both studies' values. `nested` adds `nested_check` (one more search per fold)."""
    out = Path(out)
    atomic.check_file_target(out)
    if trials < 1 or jobs < 1 or folds < 1 or (train_trials is not None and train_trials < 1):
        raise SubmitError(f"--trials {trials} / --jobs {jobs} / --folds {folds} / --train-trials {train_trials}: "
                          "expected whole numbers >= 1")
    if nested and folds < 2:
        raise SubmitError("--nested needs 2 or more folds (--folds K)")
    spec_file = resolve_spec_path(spec_path)
    base = load_spec(spec_file, runs_dir=".", require_runs=False)
    space, trained = _spaces(base, spec_file, train_trials is not None)
    work = Path(work_dir) if work_dir is not None else out.parent / "tune"
    dirs = fold_dirs(data_dir, work, holdout_ids, folds, holdout_seed)
    storage = study or f"sqlite:///{(work / 'study.db').resolve()}"
    name = f"{spec_file.stem}-{'-'.join(d.name for d in dirs)}"[:200]
    fresh_seed = study is None and jobs == 1
    work.mkdir(parents=True, exist_ok=True)
    chosen, searched, runs = None, spec_file, work / "runs"
    if train_trials is not None:
        chosen = search_training(spec_file, base, trained, dirs, work, storage, name, train_trials, seed, fresh_seed,
                                 device, workers, progress)
        searched, runs, name = chosen.spec_file, chosen.runs_dir, f"{name}-train{chosen.number}"
    prepared = [_fold(prepare_fold(searched, d, runs / d.name, device, workers, progress)) for d in dirs]
    setup = {"spec": str(searched.resolve()), "folds": [str(d.resolve()) for d in dirs],
             "space": {k: p.text() for k, p in space.items()}}
    opened = search(prepared, base, space, storage, name, setup, trials, jobs, timeout, seed, fresh_seed)
    checked = nested_check(prepared, dirs, base, space, storage, name, setup, trials, jobs, timeout, seed,
                           fresh_seed) if nested else ()
    return _finish(opened, spec_file, out, work, storage, name, dirs, chosen, every_key(base, space), checked)


def _spaces(base: EnsembleSpec, spec_file: Path, train: bool) -> tuple[dict[str, Param], dict[str, Param]]:
    """The post-processing search space and (with `--train-space`) the training one; refused in one line when
    there is nothing to search."""
    space = search_space(base)
    if not space and not fusion_space(base, base.fusion) and not train:
        raise SubmitError(f"{spec_file}: nothing to tune (no post-processing steps, one member, every key fixed)")
    trained = train_space(base, spec_file) if train else {}
    if train and not trained:
        raise SubmitError(f"{spec_file}: --train-space: no member with a 'train' block, or every training key fixed")
    return space, trained


def every_key(spec: EnsembleSpec, space: dict[str, Param]) -> dict[str, Param]:
    """`space` and every fusion rule's own keys: all a trial of the post-processing study may hold."""
    return {**space, **{key: param for rule in FUSIONS for key, param in fusion_space(spec, rule).items()}}


def search(folds: list[Fold], base: EnsembleSpec, space: dict[str, Param], storage: str, name: str,
           setup: dict[str, Any], trials: int, jobs: int, timeout: float | None, seed: int, fresh_seed: bool) -> Any:
    """The post-processing study `name` over `folds`: opened (or resumed), the spec as written queued first, then
    run until it holds `trials` finished trials (one, when only `--train-space` had anything to search)."""
    opened = open_study(storage, name, setup, seed, fresh_seed)
    enqueue_first(opened, spec_values(base), {**space, **fusion_space(base, base.fusion)})
    if space or fusion_space(base, base.fusion):
        optimise(opened, objective(folds, space), trials, jobs, timeout)
    else:  # nothing but the spec as written to score
        optimise(opened, objective(folds, space), 1, 1, None)
    return opened


@dataclass(frozen=True)
class NestedRow:
    """One fold of the nested check: the search ran on the other folds; its choice and the spec on this one."""

    fold: str
    on_others: float  # held-out mAP (0..1) of the values chosen there, on the folds they were chosen on
    spec: float  # the spec as written, on this fold
    chosen: float  # the values chosen on the other folds, on this fold


def nested_check(folds: list[Fold], dirs: list[Path], base: EnsembleSpec, space: dict[str, Param], storage: str,
                 name: str, setup: dict[str, Any], trials: int, jobs: int, timeout: float | None, seed: int,
                 fresh_seed: bool) -> tuple[NestedRow, ...]:
    """For each fold, the same search on the other folds only (study `<name>-without-<fold>`, resumable), its best
    values scored on the left-out fold beside the spec as written: what the search's gain is worth on identities
    it did not see (the main study's best is measured on the queries it was chosen on)."""
    if len(folds) < 2:
        raise SubmitError("--nested needs 2 or more folds (--folds K)")
    rows = []
    for k, (left, path) in enumerate(zip(folds, dirs)):
        others = [fold for i, fold in enumerate(folds) if i != k]
        opened = search(others, base, space, storage, f"{name}-without-{path.name}", {**setup, "left_out": path.name},
                        trials, jobs, timeout, seed, fresh_seed)
        if not complete_trials(opened):
            raise SubmitError(f"--nested: no trial without {path.name} finished with a score{refusal_note(opened)}")
        best = opened.best_trial
        values = decode(best.params, every_key(base, space))
        rows.append(NestedRow(path.name, float(best.value), left.score(left.spec),
                              left.score(apply_values(left.spec, values))))
    return tuple(rows)


def nested_text(rows: tuple[NestedRow, ...]) -> str:
    """The nested check in one line: the mean gain ± spread on the left-out folds, each fold's two scores, and
    whether the gain stands above its spread (else the search is not shown to beat the spec as written)."""
    gains = [100 * (row.chosen - row.spec) for row in rows]
    mean, spread = float(np.mean(gains)), float(np.std(gains))
    folds = ", ".join(f"{row.fold}: {100 * row.spec:.2f} -> {100 * row.chosen:.2f}" for row in rows)
    verdict = ("above its spread" if mean > spread else
               "not above its spread: on identities it did not see, the search does not beat the spec as written")
    return (f"nested check: values chosen on the other folds gain {mean:+.2f} ± {spread:.2f} mAP points over the "
            f"spec as written on the left-out fold ({folds}); {verdict}")


def _fold(fold: Fold | None) -> Fold:
    """A fold prepared without an epoch hook (which alone can stop its training early)."""
    if fold is None:
        raise SubmitError("internal: a fold's training stopped early without an epoch hook")
    return fold


def _finish(study: Any, spec_file: Path, out: Path, work: Path, storage: str, name: str, dirs: list[Path],
            chosen: TrainChoice | None, space: dict[str, Param], checked: tuple[NestedRow, ...]) -> TuneResult:
    """Write the tuned spec, the trials table and the pictures; the result for the CLI (values as `space` draws
    them: a list choice as a list)."""
    finished, complete = finished_trials(study)
    if complete == 0:
        write_table(study, work / "trials.csv")
        raise SubmitError(f"study {name!r}: no trial finished with a score{refusal_note(study)}; see "
                          f"{work / 'trials.csv'}, widen the `tune:` ranges or raise --trials")
    best = study.best_trial
    fold_values = tuple(float(v) for v in best.user_attrs.get("fold_mAP", [best.value]))
    records = [holdout.holdout_record(d) for d in dirs]
    values = {**(chosen.values if chosen else {}), **decode(best.params, space)}
    header = _header(spec_file, storage, name, finished, best, fold_values, records, chosen, spec_value(study),
                     space, checked)
    predict.write_spec_values(spec_file, out, values, header)
    write_table(study, work / "trials.csv")
    pictures, notes = save_pictures(study, work)
    if chosen is not None:
        pictures, notes = chosen.pictures + pictures, chosen.notes + notes
    leaders = [{"number": t.number, "value": float(t.value), "spread": float(np.std(t.user_attrs.get("fold_mAP", [0]))),
                "params": decode(t.params, space)}
               for t in sorted(complete_trials(study), key=lambda t: -float(t.value))[:5]]
    return TuneResult(out, work, name, storage, finished, complete, best.number, float(best.value), fold_values,
                      values, leaders, pictures, notes, chosen, spec_value(study), checked)


def _header(spec_file: Path, storage: str, name: str, finished: int, best: Any, fold_values: tuple[float, ...],
            records: list[Any], chosen: TrainChoice | None, own: SpecTrial | None, space: dict[str, Param],
            checked: tuple[NestedRow, ...]) -> str:
    """The comment block at the top of the tuned spec: where its values come from."""
    rec = records[0]
    spread = f" ± {100 * float(np.std(fold_values)):.2f}" if len(fold_values) > 1 else ""
    today = datetime.date.today().isoformat()
    lines = [f"Tuned by `reident-submit tune` on {today} from {spec_file}"]
    if chosen is not None:
        lines += [f"training study {chosen.study!r}: {chosen.finished} finished trials "
                  f"({chosen.finished - chosen.complete} pruned), best #{chosen.number}: held-out mAP "
                  f"{100 * chosen.value:.2f} with the spec's own post-processing"
                  + (f"; its recipes as written: {chosen.own.text()}" if chosen.own else ""),
                  "training values: " + json.dumps(chosen.values, sort_keys=True)]
    lines += [f"study {name!r} in {storage}: {finished} finished trials, best #{best.number}",
              f"held-out mAP {100 * float(best.value):.2f}{spread} (mean over {len(fold_values)} fold(s) of "
              f"{rec.n_ids if rec else '?'} TRAIN identities, --holdout-seed {rec.seed if rec else '?'})"
              + (f"; the spec's own values: {own.text()}" if own else ""),
              *([nested_text(checked)] if checked else []),
              "chosen on held-out TRAIN identities only: never scored on the test or challenge split",
              "best values: " + json.dumps(decode(best.params, space), sort_keys=True)]
    return "".join(f"# {line}\n" for line in lines)


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
