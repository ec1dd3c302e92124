"""`tune --train-space`: training keys in the `tune:` block, the default training space, training values written
as member overrides, `train`'s per-epoch hook, the pruning reporter, and a whole training study on synthetic
data in which one trial is pruned mid-way and the post-processing search runs on the best trial's runs."""

from __future__ import annotations

import csv
import os
import re
import signal
import textwrap
from pathlib import Path

import optuna
import pytest
from cli_helpers import invoke, one_error_line

from submit import predict, training, tune
from submit.ensembling import load_spec, member_recipe
from submit.errors import SubmitError
from submit.recipe import has_key, load_recipe, override, train_space
from submit.space import Param, choice, integers

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
MEMBERS = f"""\
members:
  - {{run: '${{RUNS}}/a', checkpoint: last, train: {{recipe: {TINY}, seed: 0, overrides: ['train.epochs=1']}}}}
  - {{run: '${{RUNS}}/b', checkpoint: last, train: {{recipe: {TINY}, seed: 1, overrides: ['train.epochs=1']}}}}
postprocess:
  - {{op: query_expansion, params: {{k: 1}}}}
"""
EPOCHS = "    'members[0].train.epochs': {low: 1, high: 2, integer: true}\n"


def _spec(folder: Path, body: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


# ---- keys, defaults, overrides --------------------------------------------------------------------------


def test_recipe_keys_and_the_default_training_space() -> None:
    assert has_key("train.lr") and has_key("backbone.image_size") and has_key("train.augment.hflip")
    assert not has_key("train") and not has_key("train.nope") and not has_key("train.lr.x") and not has_key("")
    recipe = training.apply_overrides(load_recipe(REPO / "models" / "cpu-pretrained.yaml"),
                                      ["train.epochs=6", "train.lr=0.001", "backbone.image_size=[192, 96]"])
    space = train_space(recipe)
    assert space["train.epochs"] == integers(3, 12)
    assert space["train.lr"] == Param(0.00025, 0.004, log=True)
    assert space["backbone.image_size"] == choice([[160, 80], [192, 96], [224, 112]])
    native = training.apply_overrides(recipe, ["backbone.image_size=null"])
    assert "backbone.image_size" not in train_space(native)  # the model's own size: not searched
    assert override("backbone.image_size", [160, 80]) == "backbone.image_size=[160, 80]"


@pytest.mark.parametrize("key, message", [
    ("'members[0].train.nope'", r"'members\[0\].train.nope' is not a tunable key"),
    ("'members[0].train'", r"'members\[0\].train' is not a tunable key"),
    ("'members[7].train.lr'", r"'members\[7\].train.lr' is not a tunable key"),
    ("'members[2].train.lr'", r"'members\[2\].train.lr' is not a tunable key"),  # member without a train block
])
def test_a_training_key_must_name_a_recipe_value_of_a_trained_member(tmp_path, key, message) -> None:
    extra = f"  - {{recipe: {TINY}}}\n"
    path = _spec(tmp_path, MEMBERS.replace("postprocess:", extra + "postprocess:")
                 + f"tune: {{space: {{{key}: {{low: 1, high: 2}}}}}}\n")
    with pytest.raises(SubmitError, match=message):
        load_spec(path, runs_dir=tmp_path, require_runs=False)


def test_training_space_from_defaults_and_the_tune_block(tmp_path) -> None:
    spec = load_spec(_spec(tmp_path, f"{MEMBERS}tune:\n  space:\n{EPOCHS}  fixed: ['members[1].train.lr']\n"),
                     runs_dir=tmp_path, require_runs=False)
    space = tune.train_space(spec, "spec.yaml")
    assert space["members[0].train.epochs"] == integers(1, 2)  # the tune block replaces the default
    assert space["members[1].train.epochs"] == integers(1, 2)  # default from the member's recipe (1 epoch)
    assert space["members[0].train.lr"] == Param(2.5e-4, 4e-3, log=True) and "members[1].train.lr" not in space
    assert not any(tune.train_key(k) for k in tune.search_space(spec))  # the post-processing search: none of them
    bad = load_spec(_spec(tmp_path, f"{MEMBERS}tune:\n  space:\n"
                                    "    'members[0].train.epochs': {low: 0, high: 2, integer: true}\n", "bad.yaml"),
                    runs_dir=tmp_path, require_runs=False)
    with pytest.raises(SubmitError, match=r"bad.yaml: key 'tune.space.members\[0\].train.epochs'.*train.epochs"):
        tune.train_space(bad, "bad.yaml")


def test_training_values_are_written_as_member_overrides(tmp_path) -> None:
    spec_file = _spec(tmp_path, MEMBERS)
    out = predict.write_spec_values(spec_file, tmp_path / "sub" / "t.yaml",
                                    {"members[0].train.epochs": 2, "members[1].backbone.image_size": [48, 32],
                                     "members[1].train.lr": 2e-05, "members[1].weight": 0.5}, "# h\n")
    spec = load_spec(out, runs_dir=tmp_path, require_runs=False)
    assert spec.members[0].train.overrides == ("train.epochs=2",)  # replaced, not added twice
    assert spec.members[1].train.overrides == ("train.epochs=1", "backbone.image_size=[48, 32]", "train.lr=2e-05")
    recipe = member_recipe(spec.members[1], out)
    assert recipe.backbone.image_size == (48, 32) and recipe.train.lr == 2e-05 and recipe.seed == 1
    assert spec.members[1].weight == 0.5


# ---- the epoch hook and the pruning reporter -------------------------------------------------------------


def test_on_epoch_sees_each_validation_and_true_stops_the_run(data_dir, tmp_path) -> None:
    seen: list[dict] = []

    def hook(row: dict, epochs: int) -> bool:
        seen.append(row)
        assert epochs == 4
        return row["epoch"] == 2

    recipe = training.apply_overrides(load_recipe(TINY), ["train.epochs=4", "train.checkpoint_every=0"])
    summary = training.train(recipe, data_dir, tmp_path / "run", device="cpu", progress=False, on_epoch=hook)
    assert summary["stopped_early"] and summary["epochs"] == 2 and [r["epoch"] for r in seen] == [1, 2]
    assert all(0 <= r["mAP"] <= 1 for r in seen)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and not training.finished(tmp_path / "run", recipe)
    whole = training.train(recipe, data_dir, tmp_path / "whole", device="cpu", progress=False,
                           on_epoch=lambda row, epochs: False)
    assert not whole["stopped_early"] and whole["epochs"] == 4


def test_a_stopped_member_ends_train_members(data_dir, tmp_path) -> None:
    calls: list[tuple[str, int]] = []

    def hook(run: str, row: dict, epochs: int) -> bool:
        calls.append((Path(run).name, row["epoch"]))
        return True

    results = training.train_members(_spec(tmp_path, MEMBERS), data_dir, tmp_path / "runs", device="cpu",
                                     progress=False, on_epoch=hook)
    assert len(results) == 1 and results[0]["stopped_early"] and calls == [("a", 1)]
    assert not (tmp_path / "runs" / "b").exists()


RUNS = [("f0", "run0"), ("f0", "run1")]  # a trial's (fold, run name) order, as train_objective lists it


def _finished_trial(study, runs: list[list[float]]) -> None:
    """A finished trial of `study` that reported each run's validations over its whole schedule."""
    trial = study.ask()
    pruning = tune._Pruning(trial, RUNS)
    for r, values in enumerate(runs):
        for epoch, value in enumerate(values, start=1):
            assert not pruning(f"f0/run{r}", {"epoch": epoch, "mAP": value}, len(values))
    study.tell(trial, values[-1])


def test_pruning_compares_each_run_at_the_fraction_of_its_schedule_from_its_second_validation_on() -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    _finished_trial(study, [[0.3, 0.5, 0.6], [0.3, 0.4, 0.5]])  # 3 epochs a run: steps 333, 666, 999 (+1000)
    _finished_trial(study, [[0.2, 0.35, 0.45, 0.5, 0.55, 0.65], [0.2, 0.3, 0.35, 0.4, 0.45, 0.5]])  # 6 epochs
    poor = tune._Pruning(study.ask(), RUNS)
    assert not poor("f0/run0", {"epoch": 1, "mAP": 0.01}, 5)  # a run's first validation: never pruned
    assert not poor("f0/run0", {"epoch": 1, "mAP": None}, 5)  # no validation: nothing reported
    # epoch 2 of 5 (step 400): against what the others had by 400 (both at 333: 0.3 and 0.35, median 0.325)
    assert not poor("f0/run0", {"epoch": 2, "mAP": 0.33}, 5)
    assert poor("f0/run0", {"epoch": 3, "mAP": 0.37}, 5)  # step 599: 0.3 (333) and 0.45 (500), median 0.375
    assert poor.pruned_at == "run0 epoch 3 of 5 (held-out mAP 37.00)"
    assert study.trials[-1].intermediate_values == {200: 0.01, 400: 0.33, 599: 0.37}
    late = tune._Pruning(study.ask(), RUNS)  # an excellent first run does not carry a poor second one
    for epoch, value in enumerate([0.9, 0.95, 0.99], start=1):
        assert not late("f0/run0", {"epoch": epoch, "mAP": value}, 3)
    assert not late("f0/run1", {"epoch": 1, "mAP": 0.05}, 3)
    assert late("f0/run1", {"epoch": 2, "mAP": 0.05}, 3)  # step 1666: 0.4 and 0.4 (1666), median 0.4
    assert not tune.below_median(0.0, 333, [{333: 0.5}])  # one finished trial: too few to judge


def test_a_continued_trial_indexes_runs_by_their_place_and_counts_the_validations_it_carries() -> None:
    """A continued trial never sees its finished runs (reused, not opened): a run's index is its place in the
    trial's (fold, member) order, and the interrupted trial's validations are reported again and counted."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    _finished_trial(study, [[0.3, 0.5, 0.6], [0.3, 0.4, 0.5]])
    _finished_trial(study, [[0.3, 0.5, 0.6], [0.3, 0.4, 0.5]])
    order = [("f0", "a"), ("f0", "b")]
    resumed = tune._Pruning(study.ask(), order, earlier={1333: 0.05})  # run b's epoch 1, before the stop
    assert resumed.runs == {1: 1}  # run index 1 (b) has had one validation
    assert resumed("/w/trial-3/runs/f0/b", {"epoch": 2, "mAP": 0.05}, 3)  # b's second validation: step 1666
    assert study.trials[-1].intermediate_values == {1333: 0.05, 1666: 0.05}
    fresh = tune._Pruning(study.ask(), order)  # the same run first seen on its own is still index 1
    assert not fresh("/w/trial-4/runs/f0/b", {"epoch": 1, "mAP": 0.9}, 3)
    assert study.trials[-1].intermediate_values == {1333: 0.9}


def test_failed_trials_that_left_work_are_queued_once_to_be_continued(tmp_path) -> None:
    """A failed trial (stopped; killed ones are failed by the heartbeat first) with work left is queued again with
    its values and `spec_values` mark; one without work is not; a continuation stopped in turn is continued itself,
    and nothing is queued twice."""
    from optuna.trial import TrialState

    from submit.study import requeue_interrupted

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    for number, mark in ((0, True), (1, False)):
        trial = study.ask()
        trial.suggest_int("members[0].train.epochs", 1, 9)
        trial.suggest_categorical("members[0].backbone.image_size", ["[32, 32]", "[40, 40]"])
        if mark:
            trial.set_user_attr("spec_values", True)
        study.tell(trial, state=TrialState.FAIL)
    left = {0}  # trial 0 left runs; trial 1 failed before any last.pt
    assert requeue_interrupted(study, left.__contains__) == [0]
    assert requeue_interrupted(study, left.__contains__) == []  # already queued
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.number, t.system_attrs["fixed_params"], t.user_attrs) for t in waiting] == [
        (2, study.trials[0].params, {"spec_values": True, "continues": 0})]  # what the trial's draws will return
    again = study.ask()  # the continuation draws its values (the queued ones) and is stopped in turn
    assert again.number == 2 and again.suggest_int("members[0].train.epochs", 1, 9) == waiting[0].system_attrs[
        "fixed_params"]["members[0].train.epochs"]
    study.tell(again, state=TrialState.FAIL)
    assert requeue_interrupted(study, {0, 2}.__contains__) == [2]
    assert study.get_trials(states=(TrialState.WAITING,))[0].user_attrs["continues"] == 2


# ---- a whole training study -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_study(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-train")
    spec = _spec(root, f"{MEMBERS}tune:\n  space:\n" + "".join(
        f"    'members[{i}].train.epochs': {{low: 2, high: 3, integer: true}}\n" for i in range(2)))
    with pytest.MonkeyPatch.context() as mp:  # trial 2 is pruned when first asked (its first run's epoch 2)
        mp.setattr(tune, "below_median", lambda value, step, finished, startup=2: len(finished) == 2)
        result = tune.tune(spec, data_dir, root / "out" / "tuned.yaml", holdout_ids=4, folds=2, trials=4,
                           work_dir=root / "work", device="cpu", workers=0, progress=False, train_trials=3)
    return root, spec, result


def test_the_training_study_prunes_and_the_search_uses_the_best_trials_runs(trained_study) -> None:
    root, _, result = trained_study
    chosen = result.train
    assert chosen is not None and chosen.finished == 3 and chosen.complete == 2 and chosen.number in (0, 1)
    rows = {int(r["number"]): r for r in csv.DictReader((root / "work" / "train" / "trials.csv").open())}
    assert rows[2]["state"] == "PRUNED" and rows[2]["user_attrs_pruned_at"].startswith("a epoch 2 of ")
    assert rows[0]["user_attrs_spec_values"] == "True" and float(rows[0]["params_members[0].train.lr"]) == 1e-3
    assert rows[0]["params_members[0].backbone.image_size"] == "[32, 32]"  # the recipes as the spec writes them,
    assert rows[0]["params_members[0].train.epochs"] in ("2", "3")  # except epochs=1, outside the tune: range
    assert chosen.own is not None and chosen.own.number == 0 and chosen.value >= chosen.own.value
    assert chosen.own.drawn == ("members[0].train.epochs", "members[1].train.epochs")
    assert "drawn: outside the ranges" in chosen.own.text()
    pruned_runs = root / "work" / "train" / "trial-2" / "runs"
    assert [p.name for p in pruned_runs.iterdir()] == [sorted((root / "work" / "folds").iterdir())[0].name]
    assert not any((p / "b").exists() for p in pruned_runs.iterdir())  # stopped: the next member never started
    assert set(chosen.values) == {"members[0].train.epochs", "members[0].train.lr", "members[1].train.epochs",
                                  "members[1].train.lr", "members[0].backbone.image_size",
                                  "members[1].backbone.image_size"}
    assert chosen.values["members[0].backbone.image_size"] == [32, 32]  # a list choice comes back a list
    for fold in sorted((root / "work" / "folds").iterdir()):  # the chosen epochs are what the runs trained
        for i, member in enumerate("ab"):
            rows = list(csv.DictReader((chosen.runs_dir / fold.name / member / "metrics.csv").open()))
            assert len(rows) == chosen.values[f"members[{i}].train.epochs"]


def test_the_tuned_spec_holds_both_studies_values_and_rescores_to_the_best(trained_study) -> None:
    root, _, result = trained_study
    chosen = result.train
    text = result.out.read_text()
    assert f"training study {chosen.study!r}" in text and "training values:" in text
    spec = load_spec(result.out, runs_dir=root, require_runs=False)
    for i in range(2):
        recipe = member_recipe(spec.members[i], result.out)
        assert recipe.train.epochs == chosen.values[f"members[{i}].train.epochs"]
        assert recipe.train.lr == pytest.approx(chosen.values[f"members[{i}].train.lr"])
    assert spec.postprocess[0].params["k"] == result.best_params["postprocess[0].k"]
    folds = sorted((root / "work" / "folds").iterdir())
    scores = [tune.rescore(result.out, fold, chosen.runs_dir / fold.name, device="cpu", workers=0) for fold in folds]
    assert scores == pytest.approx(list(result.fold_values), abs=1e-6)
    assert {p.name for p in result.pictures} >= {"train-history.png", "history.png"}


def test_train_space_refusals_are_one_line(trained_study, data_dir, tmp_path) -> None:
    root, _, _ = trained_study
    base = ["--data", data_dir, "--holdout", "4", "--train-space", "--device", "cpu", "--workers", "0"]
    plain = _spec(tmp_path, f"members: [{{recipe: {REPO / 'models' / 'cpu-pretrained.yaml'}}}]\n")
    code, err = invoke(["tune", "--ensemble", plain, *base, "--work", tmp_path / "w", "--out", tmp_path / "t.yaml"])
    assert code == 2 and "--train-space: no member with a 'train' block" in one_error_line(err)
    fixed = _spec(tmp_path, MEMBERS + "tune: {fixed: [" + ", ".join(
        f"'members[{i}].{k}'" for i in range(2) for k in ("train.epochs", "train.lr", "backbone.image_size")) + "]}\n",
        "fixed.yaml")
    code, err = invoke(["tune", "--ensemble", fixed, *base, "--work", tmp_path / "w2", "--out", tmp_path / "t.yaml"])
    assert code == 2 and "every training key fixed" in one_error_line(err)
    bad = _spec(tmp_path, MEMBERS + "tune: {space: {'members[0].train.lr': {low: -1, high: 1}}}\n", "bad.yaml")
    code, err = invoke(["tune", "--ensemble", bad, *base, "--work", tmp_path / "w3", "--out", tmp_path / "t.yaml"])
    assert code == 2 and "key 'tune.space.members[0].train.lr'" in one_error_line(err)
    assert not (tmp_path / "t.yaml").exists() and not any((tmp_path / w).exists() for w in ("w", "w2", "w3"))
    big = _spec(tmp_path, MEMBERS.replace("'train.epochs=1'", "'train.epochs=1', 'train.pairs_per_batch=64'"), "big.yaml")
    code, err = invoke(["tune", "--ensemble", big, *base, "--train-trials", "2", "--work", tmp_path / "w4", "--out",
                        tmp_path / "t.yaml"])
    line = one_error_line(err)
    assert code == 2 and "no training trial finished with a score (2 refused, the last: " in line
    assert "train.pairs_per_batch" in line and not (tmp_path / "t.yaml").exists()


def test_a_stop_signal_during_a_training_trial_ends_tune_with_its_status_and_a_rerun_continues(
        data_dir, tmp_path, monkeypatch) -> None:
    spec = _spec(tmp_path, MEMBERS + "tune:\n  space:\n" + "".join(
        f"    'members[{i}].train.epochs': {{low: 2, high: 2, integer: true}}\n" for i in range(2)))
    args = ["tune", "--ensemble", spec, "--data", data_dir, "--holdout", "4", "--train-space", "--train-trials", "1",
            "--trials", "2", "--work", tmp_path / "w", "--out", tmp_path / "t.yaml", "--device", "cpu",
            "--workers", "0"]
    report = tune._Pruning.__call__

    def term_once(self, run: str, row: dict, epochs: int) -> bool:  # SIGTERM comes after the first run's epoch 1
        if not self.runs:
            os.kill(os.getpid(), signal.SIGTERM)
        return report(self, run, row, epochs)

    monkeypatch.setattr(tune._Pruning, "__call__", term_once)
    stale = tmp_path / "w" / "train" / "trial-0" / "runs" / "stale.txt"  # a deleted study's trial 0
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    code, err = invoke(args)
    assert not stale.exists()
    assert code == 143 and "Traceback" not in err and re.fullmatch(
        r"stopped by SIGTERM at step \d+; rerun the same command to continue \(the study and finished runs are "
        r"kept\)", err.strip().splitlines()[-1]), err
    assert not (tmp_path / "t.yaml").exists()
    stopped_at = int(re.search(r"at step (\d+)", err).group(1))
    monkeypatch.setattr(tune._Pruning, "__call__", report)
    code, err = invoke(args)
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "w" / "train" / "trials.csv").open()))
    assert [(r["number"], r["state"], r["user_attrs_spec_values"], r["user_attrs_continues"]) for r in rows] == [
        ("0", "FAIL", "True", ""), ("1", "COMPLETE", "True", "0.0")]  # the stopped trial continues as #1
    assert "training trial 1 continues interrupted trial 0 (its runs resume from last.pt)" in err
    assert f"resumed at step {stopped_at}" in err  # not trained afresh
    assert not (tmp_path / "w" / "train" / "trial-0").exists()
    fold = sorted((tmp_path / "w" / "folds").iterdir())[0].name
    history = list(csv.DictReader((tmp_path / "w" / "train" / "trial-1" / "runs" / fold / "a" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in history] == [1, 2]  # epoch 1 from trial 0, epoch 2 after the resume
    study = optuna.load_study(study_name=re.search(r"training study '([^']+)'", (tmp_path / "t.yaml").read_text())
                              .group(1), storage=f"sqlite:///{tmp_path / 'w' / 'study.db'}")
    first, second = study.trials
    assert first.intermediate_values and set(first.intermediate_values.items()) <= set(
        second.intermediate_values.items())  # trial 0's validations carried over, at the same steps
    assert "best #1" in (tmp_path / "t.yaml").read_text()
