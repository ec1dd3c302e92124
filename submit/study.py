"""Optuna glue for `tune`: open a study in a database (refusing one made for another setup), draw a search-space
parameter from a trial, run trials until the study holds enough, read its trials, draw its pictures.

Optuna is imported inside the functions (it pulls in sqlalchemy), so importing this module costs nothing.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from submit import atomic
from submit.errors import SubmitError
from submit.space import Param

HEARTBEAT_S = 30  # a trial whose process stops beating for 2 x this long is failed and not counted


def open_study(storage: str, name: str, setup: dict[str, Any], seed: int, fresh_seed: bool,
               pruner: Any = None) -> Any:
    """The Optuna study `name` in `storage`, created or loaded; a study made for another setup is refused.

    `fresh_seed`: the TPE sampler's seed is `seed` itself (one process, reproducible); otherwise it is mixed with
    the process id, so several processes on one study do not draw the same values."""
    import optuna  # lazy for start-up: optuna imports sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's traceback: tune reports it in one line
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
                                pruner=pruner, load_if_exists=True)
    recorded = study.user_attrs.get("setup")
    if recorded is None:
        study.set_user_attr("setup", setup)
    elif recorded != setup:
        diff = sorted(k for k in set(recorded) | set(setup) if recorded.get(k) != setup.get(k))
        raise SubmitError(f"--study {storage}: study {name!r} was made with another {', '.join(diff)}; "
                          "pass the same options, or another --study")
    return study


def fail_stale(study: Any) -> None:
    """Fail the trials whose process stopped beating (killed): they are not counted, and may be continued."""
    import optuna  # lazy for start-up: optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def requeue_interrupted(study: Any, resumable: Callable[[int], bool]) -> list[int]:
    """Queue again, with the same values and attributes and `continues: N`, each failed trial N that
    `resumable(N)` says left work to continue and that no trial continues yet (a continuation stopped in turn is
    itself continued). A stopped or killed training trial is thus finished, not drawn afresh. Returns the Ns."""
    from optuna.trial import TrialState  # lazy for start-up: optuna

    fail_stale(study)
    trials = study.get_trials(deepcopy=False)
    taken = {t.user_attrs["continues"] for t in trials if "continues" in t.user_attrs}
    queued = []
    for t in trials:
        if t.state == TrialState.FAIL and t.number not in taken and t.params and resumable(t.number):
            attrs = {k: v for k, v in t.user_attrs.items() if k in ("spec_values", "drawn")}
            study.enqueue_trial(dict(t.params), user_attrs={**attrs, "continues": t.number})
            queued.append(t.number)
    return queued


def enqueue_first(study: Any, values: dict[str, Any], space: dict[str, Param]) -> None:
    """Queue `values` (those inside `space`; the others, listed in `drawn`, are left to the sampler) as a trial
    marked `spec_values`, unless the study holds one finished, waiting or running: the spec as written is scored
    beside the sampler's trials, so the best is never below it on the same folds. A killed one is queued again."""
    from optuna.trial import TrialState  # lazy for start-up: optuna

    fail_stale(study)  # a killed process's trial: failed now, so it does not count here
    inside = {key: space[key].encode(value) for key, value in values.items() if key in space and
              space[key].contains(value)}
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING)
    if not inside or any(t.user_attrs.get("spec_values") for t in study.get_trials(deepcopy=False, states=states)):
        return
    study.enqueue_trial(inside, user_attrs={"spec_values": True, "drawn": sorted(set(space) - set(inside))})


def spec_value(study: Any) -> SpecTrial | None:
    """The study's finished `spec_values` trial (`enqueue_first`), if any."""
    for trial in complete_trials(study):
        if trial.user_attrs.get("spec_values"):
            return SpecTrial(trial.number, float(trial.value), tuple(trial.user_attrs.get("drawn", ())))
    return None


@dataclass(frozen=True)
class SpecTrial:
    """The trial that scored the spec as written: its number, its value, and the keys the sampler drew because the
    spec's value lay outside the searched range."""

    number: int
    value: float
    drawn: tuple[str, ...] = ()

    def text(self) -> str:
        """`56.80 (trial #0)`, or with `, k1 drawn` when some keys were outside the ranges."""
        return f"{100 * self.value:.2f} (trial #{self.number}" + (
            f", {', '.join(self.drawn)} drawn: outside the ranges)" if self.drawn else ")")


def draw(trial: Any, key: str, param: Param) -> Any:
    """A value of `param` drawn by an Optuna trial under the name `key` (a list choice comes back as a list)."""
    if param.choices is not None:
        return param.decode(trial.suggest_categorical(key, list(param.encoded_choices())))
    low, high = float(param.low or 0), float(param.high or 0)
    if param.integer:
        return trial.suggest_int(key, int(low), int(high), log=param.log)
    return trial.suggest_float(key, low, high, log=param.log)


def decode(params: dict[str, Any], space: dict[str, Param]) -> dict[str, Any]:
    """A trial's recorded params (as Optuna stores them) as the values `draw` returned."""
    return {key: space[key].decode(value) if key in space else value for key, value in params.items()}


def finished_trials(study: Any) -> tuple[int, int]:
    """(complete + pruned, complete) trials of the study."""
    from optuna.trial import TrialState  # lazy for start-up: optuna

    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete = states.count(TrialState.COMPLETE)
    return complete + states.count(TrialState.PRUNED), complete


def refusal_note(study: Any) -> str:
    """Why the latest refused trial was refused (its `refused` attribute), as a clause for an error line."""
    refused = [t.user_attrs["refused"] for t in study.get_trials(deepcopy=False) if "refused" in t.user_attrs]
    return f" ({len(refused)} refused, the last: {refused[-1]})" if refused else ""


def complete_trials(study: Any) -> list[Any]:
    """The study's trials that finished with a value."""
    from optuna.trial import TrialState  # lazy for start-up: optuna

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def optimise(study: Any, run: Callable[[Any], float], trials: int, jobs: int, timeout: float | None) -> None:
    """Run trials until the study holds `trials` finished ones (other processes' included) or `timeout` passes."""
    from optuna.study import MaxTrialsCallback  # lazy for start-up: optuna
    from optuna.trial import TrialState

    left = trials - finished_trials(study)[0]
    if left <= 0:
        return
    stop = MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    study.optimize(run, n_trials=left, timeout=timeout, n_jobs=jobs, callbacks=[stop], gc_after_trial=False,
                   show_progress_bar=False)


def write_table(study: Any, path: Path) -> None:
    """Every trial of the study (number, state, value, params, user attributes) as a CSV file."""
    with atomic.atomic_file(path, "w", newline="") as fh:
        study.trials_dataframe().to_csv(fh, index=False)


def save_pictures(study: Any, folder: Path, prefix: str = "") -> tuple[list[Path], list[str]]:
    """Optimisation history, parameter importances and a slice plot as PNGs in `folder` (Optuna's matplotlib
    backend); a plot the study cannot give yet (too few trials) is a note instead."""
    import matplotlib  # lazy for start-up: matplotlib and optuna's plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    made, notes = [], []
    for name, plot in (("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances),
                       ("slice", plots.plot_slice)):
        path = folder / f"{prefix}{name}.png"
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
            notes.append(f"{prefix}{name} plot skipped: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        finally:
            plt.close("all")
    return made, notes
