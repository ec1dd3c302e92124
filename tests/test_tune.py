"""`reident-submit tune`: the search space declared by steps and fusion rules, the refusals, the tuned spec's
value against a re-score, resume after kill -9, and two processes sharing one study (tiny runs, synthetic data)."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cli_helpers import invoke, one_error_line

from submit import ensembling, reranking, tune
from submit.cli import main
from submit.ensembling import load_spec
from submit.errors import SubmitError
from submit.space import Param, integers

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
HOLDOUT = ["--holdout", "4", "--folds", "2", "--holdout-seed", "0"]


def _spec(folder: Path, body: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


MEMBERS = f"""\
members:
  - {{run: '${{RUNS}}/a', checkpoint: last, train: {{recipe: {TINY}, seed: 0, overrides: ['train.epochs=1']}}}}
  - {{run: '${{RUNS}}/b', checkpoint: last, train: {{recipe: {TINY}, seed: 1, overrides: ['train.epochs=1']}}}}
"""
CHAIN = """\
postprocess:
  - {op: query_expansion, params: {k: 1}}
  - {op: k_reciprocal, params: {k1: 4, k2: 2, lambda_value: 0.3}}
tune:
  space:
    postprocess[1].k1: {low: 2, high: 6, integer: true}
    postprocess[1].k2: {low: 1, high: 2, integer: true}
"""


# ---- the search space ---------------------------------------------------------------------------------


def test_default_space_comes_from_the_registered_steps_and_fusion_rules(tmp_path) -> None:
    spec = load_spec(_spec(tmp_path, f"{MEMBERS}{CHAIN}"), runs_dir=tmp_path, require_runs=False)
    space = tune.search_space(spec)
    assert space["postprocess[0].k"] == reranking.STEPS["query_expansion"].space["k"]
    assert space["postprocess[0].alpha"] == reranking.STEPS["query_expansion"].space["alpha"]
    assert space["postprocess[1].k1"] == Param(2.0, 6.0, integer=True)  # the spec's tune.space replaces the default
    assert space["postprocess[1].lambda_value"] == reranking.STEPS["k_reciprocal"].space["lambda_value"]
    assert space["fusion"].choices == tuple(ensembling.FUSIONS) and "members[1].weight" in space
    assert "members[0].weight" not in space and "reliability_k" not in space  # drawn only with its rule
    assert tune.fusion_space(spec, "reliability") == {"reliability_k": ensembling.FUSIONS["reliability"].space[
        "reliability_k"]}
    assert tune.fusion_space(spec, "mean") == {}
    narrowed = load_spec(_spec(tmp_path, f"{MEMBERS}{CHAIN}    reliability_k: {{low: 5, high: 9, integer: true}}\n",
                               "narrowed.yaml"), runs_dir=tmp_path, require_runs=False)
    assert "reliability_k" not in tune.search_space(narrowed)  # a rule's own key stays conditional on the rule
    assert tune.fusion_space(narrowed, "reliability") == {"reliability_k": Param(5.0, 9.0, integer=True)}


def test_a_new_step_brings_its_own_space_and_fixed_keys_are_not_searched(tmp_path, monkeypatch) -> None:
    def shrink(q, g, factor: float = 1.0):
        return q * factor, g * factor

    monkeypatch.setitem(reranking.STEPS, "shrink", reranking.Step(shrink, "shrink", "shrink",
                                                                   space={"factor": integers(1, 3)}))
    path = _spec(tmp_path, f"""\
        members: [{{recipe: {REPO / 'models' / 'cpu-pretrained.yaml'}}}]
        postprocess: [{{op: shrink}}, {{op: query_expansion}}]
        tune: {{fixed: ['postprocess[1].alpha']}}
        """)
    spec = load_spec(path, require_runs=False)
    assert tune.search_space(spec) == {"postprocess[0].factor": integers(1, 3),
                                       "postprocess[1].k": reranking.STEPS["query_expansion"].space["k"]}
    chosen = tune.apply_values(spec, {"postprocess[0].factor": 2, "postprocess[1].k": 3})
    assert chosen.postprocess[0].params == {"factor": 2} and chosen.postprocess[1].params == {"k": 3}


def test_only_keeps_every_other_key_at_the_spec_value(tmp_path) -> None:
    only = "  only: ['postprocess[1].k1', 'postprocess[0].k', reliability_k, 'members[1].train.epochs']\n"
    spec = load_spec(_spec(tmp_path, f"{MEMBERS}{CHAIN}{only}"), runs_dir=tmp_path, require_runs=False)
    assert tune.search_space(spec) == {"postprocess[1].k1": Param(2.0, 6.0, integer=True),
                                       "postprocess[0].k": reranking.STEPS["query_expansion"].space["k"]}
    assert tune.fusion_space(spec, "reliability") == {"reliability_k": ensembling.FUSIONS["reliability"].space[
        "reliability_k"]}  # a rule's own key named in `only`: still drawn with its rule
    assert list(tune.train_space(spec, "spec.yaml")) == ["members[1].train.epochs"]
    both = load_spec(_spec(tmp_path, f"{MEMBERS}{CHAIN}{only}  fixed: ['postprocess[0].k']\n", "both.yaml"),
                     runs_dir=tmp_path, require_runs=False)
    assert list(tune.search_space(both)) == ["postprocess[1].k1"]  # fixed wins over only


@pytest.mark.parametrize("block, message", [
    ("tune: {space: {'postprocess[5].k': {low: 1, high: 2}}}", r"'postprocess\[5\].k' is not a tunable key"),
    ("tune: {space: {'postprocess[0].k': {low: 3, high: 1}}}", r"tune.space.postprocess\[0\].k': expected 'low' <="),
    ("tune: {space: {fusion: {choices: [median]}}}", r"tune.space.fusion': expected choices among"),
    ("tune: {space: {'postprocess[0].alpha': {low: 0, high: 1, log: true}}}", r"log-scaled range needs low > 0"),
    ("tune: {fixed: ['members[3].weight']}", r"key 'tune.fixed': 'members\[3\].weight'"),
    ("tune: {only: ['postprocess[0].kk']}", r"key 'tune.only': 'postprocess\[0\].kk' is not a tunable key"),
    ("tune: {spaces: {}}", r"unknown key 'tune.spaces'"),
    ("tune: {space: {fusion: {low: 1, high: 2}}}", r"tune.space.fusion': expected choices among"),
    ("postprocess_on: fused\ntune: {space: {fusion: {choices: [mean, rank]}}}", r"fused needs fusion 'mean' only"),
])
def test_a_bad_tune_block_is_refused_at_load(tmp_path, block, message) -> None:
    path = _spec(tmp_path, f"{MEMBERS}postprocess: [{{op: query_expansion}}]\n{block}\n")
    with pytest.raises(SubmitError, match=message):
        load_spec(path, runs_dir=tmp_path, require_runs=False)


@pytest.mark.parametrize("chosen, verdict", [
    ((0.66, 0.61, 0.66), "; above its spread"),  # gains +2, +3, +2
    ((0.60, 0.61, 0.66), "; not above its spread: on identities it did not see, the search does not beat"),
])
def test_the_nested_line_says_whether_the_gain_stands_above_its_spread(chosen, verdict) -> None:
    rows = tuple(tune.NestedRow(f"f{i}", 0.7, spec, got) for i, (spec, got) in enumerate(zip((0.64, 0.58, 0.64),
                                                                                            chosen)))
    text = tune.nested_text(rows)
    gains = [100 * (c - s) for c, s in zip(chosen, (0.64, 0.58, 0.64))]
    assert f"gain {np.mean(gains):+.2f} ± {np.std(gains):.2f} mAP points" in text and "f1: 58.00 -> 61.00" in text
    assert verdict in text


# ---- a whole study ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory):
    """One tune run in-process: 2 tiny members trained on each of 2 folds of 4 held-out identities, 6 trials."""
    root = tmp_path_factory.mktemp("tune")
    spec = _spec(root, f"{MEMBERS}{CHAIN}")
    result = tune.tune(spec, data_dir, root / "out" / "tuned.yaml", holdout_ids=4, folds=2, trials=6,
                       work_dir=root / "work", device="cpu", workers=0, progress=False)
    return root, spec, result


def _finished(db: Path) -> list[tuple[int, str]]:
    """(number, state) of every trial of the database's first study (none while optuna creates its tables)."""
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT number, state FROM trials WHERE study_id = (SELECT MIN(study_id) FROM studies) "
                               "ORDER BY number").fetchall()  # the main study (--nested adds one per fold)
        except sqlite3.OperationalError:
            return []


def test_tune_writes_the_tuned_spec_table_and_pictures(study) -> None:
    root, spec, result = study
    assert result.finished == 6 and result.complete >= 1 and len(result.fold_values) == 2
    assert result.best_value == pytest.approx(np.mean(result.fold_values))
    text = result.out.read_text()
    assert text.startswith("# Tuned by `reident-submit tune`") and "never scored on the test" in text
    tuned = load_spec(result.out, runs_dir=root / "work" / "runs" / "x", require_runs=False)
    for key, value in result.best_params.items():  # the best values are in place, paths rebased to out/
        if key.startswith("postprocess[1]."):
            assert tuned.postprocess[1].params[key.split(".", 1)[1]] == value
    assert Path(tuned.members[0].train.recipe) == TINY
    assert (root / "work" / "trials.csv").read_text().count("\n") == 7  # header + 6 trials
    assert {p.name for p in result.pictures} <= {"history.png", "importances.png", "slice.png"}
    assert any(p.name == "history.png" for p in result.pictures)
    held = [tune.holdout.held_out_ids(d) for d in sorted((root / "work" / "folds").iterdir())]
    assert len(held) == 2 and not held[0] & held[1]


def test_the_spec_as_written_is_the_first_trial_and_the_best_is_not_below_it(study) -> None:
    root, spec, result = study
    rows = {int(r["number"]): r for r in csv.DictReader((root / "work" / "trials.csv").open())}
    first = rows[0]
    assert first["user_attrs_spec_values"] == "True" and not any(
        r.get("user_attrs_spec_values") == "True" for n, r in rows.items() if n)
    assert int(first["params_postprocess[0].k"]) == 1 and int(first["params_postprocess[1].k1"]) == 4
    assert int(first["params_postprocess[1].k2"]) == 2 and float(first["params_postprocess[1].lambda_value"]) == 0.3
    assert float(first["params_postprocess[0].alpha"]) == 3.0  # the step function's own default
    assert first["params_fusion"] == "mean" and float(first["params_members[1].weight"]) == 1.0
    assert result.own is not None and result.own.number == 0 and result.best_value >= result.own.value
    assert result.own.drawn == () and "the spec's own values: " in result.out.read_text()
    assert result.own.value == pytest.approx(float(first["value"]))
    rescored = [tune.rescore(spec, fold, root / "work" / "runs" / fold.name, device="cpu", workers=0)
                for fold in sorted((root / "work" / "folds").iterdir())]
    assert np.mean(rescored) == pytest.approx(result.own.value, abs=1e-6)  # trial 0 is the spec exactly as written


def test_nested_check_scores_each_fold_with_the_values_chosen_on_the_others(study, data_dir, tmp_path) -> None:
    import optuna

    root, spec, first = study
    result = tune.tune(spec, data_dir, tmp_path / "nested.yaml", holdout_ids=4, folds=2, trials=first.finished,
                       work_dir=root / "work", device="cpu", workers=0, progress=False, nested=True)
    assert result.best_value == first.best_value  # the main study was finished: nothing added
    folds = sorted((root / "work" / "folds").iterdir())
    assert [row.fold for row in result.nested] == [f.name for f in folds]
    for row, left, other in zip(result.nested, folds, folds[::-1]):  # the oracle: predict's own re-score
        runs = root / "work" / "runs" / left.name
        assert row.spec == pytest.approx(tune.rescore(spec, left, runs, device="cpu", workers=0), abs=1e-6)
        chosen = optuna.load_study(study_name=f"{result.study}-without-{left.name}",
                                   storage=f"sqlite:///{root / 'work' / 'study.db'}").best_trial
        assert row.on_others == pytest.approx(chosen.value) and chosen.user_attrs["fold_mAP"] == [
            pytest.approx(tune.rescore(ensembling_copy(spec, chosen.params, tmp_path), other,
                                       root / "work" / "runs" / other.name, device="cpu", workers=0), abs=1e-6)]
        assert row.chosen == pytest.approx(tune.rescore(ensembling_copy(spec, chosen.params, tmp_path), left, runs,
                                                        device="cpu", workers=0), abs=1e-6)
    assert "nested check: values chosen on the other folds gain " in result.out.read_text()
    assert result.nested_summary().startswith("nested check:")
    code, err = invoke(["tune", "--ensemble", spec, "--data", folds[0], "--nested", "--out", tmp_path / "n.yaml",
                        "--device", "cpu", "--workers", "0"])
    assert code == 2 and "--nested needs 2 or more folds" in one_error_line(err)


def ensembling_copy(spec: Path, params: dict, folder: Path) -> Path:
    """The spec with `params` (a trial's values) in place, as a file beside the others."""
    from submit import predict

    return predict.write_spec_values(spec, folder / f"trial-{abs(hash(str(sorted(params.items()))))}.yaml",
                                     params, "# a trial's values\n")


def test_best_value_equals_rescoring_the_tuned_spec(study) -> None:
    """The recorded best is what predict's own path gives the tuned spec on the same folds."""
    root, _, result = study
    folds = sorted((root / "work" / "folds").iterdir())
    scores = [tune.rescore(result.out, fold, root / "work" / "runs" / fold.name, device="cpu", workers=0)
              for fold in folds]
    assert scores == pytest.approx(list(result.fold_values), abs=1e-6)


def test_rerun_resumes_the_study_and_trains_nothing_again(study, data_dir) -> None:
    root, spec, _ = study
    runs = sorted((root / "work" / "runs").glob("*/a/last.pt"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    before = _finished(root / "work" / "study.db")
    more = tune.tune(spec, data_dir, root / "out" / "tuned.yaml", holdout_ids=4, folds=2, trials=9,
                     work_dir=root / "work", device="cpu", workers=0, progress=False)
    after = _finished(root / "work" / "study.db")
    assert more.finished == 9 and after[:6] == before and [n for n, _ in after] == list(range(9))
    assert [p.stat().st_mtime_ns for p in runs] == stamps  # finished runs reused


def test_a_study_of_another_setup_is_refused(study, data_dir) -> None:
    root, _, _ = study
    (root / "edited").mkdir()
    other = _spec(root / "edited", f"{MEMBERS}postprocess: [{{op: query_expansion, params: {{k: 1}}}}]\n")
    code, err = invoke(["tune", "--ensemble", other, "--data", data_dir, *HOLDOUT, "--trials", "7",
                        "--study", f"sqlite:///{root / 'work' / 'study.db'}", "--work", root / "work",
                        "--out", root / "o.yaml", "--device", "cpu", "--workers", "0"])
    line = one_error_line(err)
    assert code == 2 and "was made with another space, spec" in line and "pass the same options" in line


def test_fit_weights_on_a_held_out_fold_says_so(study, tmp_path) -> None:
    root, spec, _ = study
    fold = sorted((root / "work" / "folds").iterdir())[0]
    res = CliRunner().invoke(main, ["fit-weights", "--ensemble", str(spec), "--data", str(fold), "--out",
                                    str(tmp_path / "w.yaml"), "--runs-dir", str(root / "work" / "runs" / fold.name),
                                    "--grid", "0,1", "--workers", "0", "--device", "cpu"])
    code, out = res.exit_code, res.output
    assert code == 0, out
    assert "held-out mAP" in out and "fitted on the split it reports" not in out
    assert (tmp_path / "w.yaml").read_text().startswith(f"# fitted on held-out TRAIN identities of {fold}")


# ---- refusals -------------------------------------------------------------------------------------------


def test_refusals_are_one_line(study, data_dir, tmp_path) -> None:
    root, spec, _ = study
    base = ["--device", "cpu", "--workers", "0", "--work", tmp_path / "w", "--out", tmp_path / "t.yaml"]
    code, err = invoke(["tune", "--ensemble", spec, "--data", data_dir, *base])
    assert code == 2 and "its test split is the real test or challenge split" in one_error_line(err)
    fold = sorted((root / "work" / "folds").iterdir())[0]
    code, err = invoke(["tune", "--ensemble", spec, "--data", fold, "--holdout", "3", *base])
    assert code == 2 and "already a held-out folder" in one_error_line(err)
    # a run trained on the whole of TRAIN has seen the held-out identities
    full = _spec(tmp_path, f"members: [{{run: {root / 'work' / 'runs' / fold.name / 'a'}, checkpoint: last}}]\n"
                           "postprocess: [{op: query_expansion}]\n", "full.yaml")
    other_fold = sorted((root / "work" / "folds").iterdir())[1]
    code, err = invoke(["tune", "--ensemble", full, "--data", other_fold, *base])
    line = one_error_line(err)
    assert code == 2 and "may have seen held-out identities" in line and "member a" in line
    loose = _spec(tmp_path, MEMBERS.replace("'${RUNS}/b'", str(tmp_path / "elsewhere")) + CHAIN, "loose.yaml")
    code, err = invoke(["tune", "--ensemble", loose, "--data", fold, *base])
    assert code == 2 and "write its run as '${RUNS}/elsewhere'" in one_error_line(err)
    assert not (tmp_path / "t.yaml").exists()


# ---- kill -9 and two processes --------------------------------------------------------------------------


def _tune_process(spec: Path, data_dir: Path, work: Path, trials: int, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "submit.cli", "tune", "--ensemble", str(spec), "--data", str(data_dir), *HOLDOUT,
           "--trials", str(trials), "--work", str(work), "--out", str(out), "--device", "cpu", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(db: Path, count: int, proc: subprocess.Popen, limit: float = 240) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if db.is_file() and sum(state == "COMPLETE" or state == "PRUNED" for _, state in _finished(db)) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{count} trials did not finish in {limit} s")


@pytest.mark.slow
def test_kill_9_then_rerun_continues_the_study(study, data_dir) -> None:
    """The trials finished before the kill are kept; the rerun finishes the count; the killed one is not counted."""
    root, spec, _ = study
    work = root / "killed"
    proc = _tune_process(spec, data_dir, work, 400, root / "k.yaml")
    _wait_for(work / "study.db", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [(n, s) for n, s in _finished(work / "study.db") if s in ("COMPLETE", "PRUNED")]
    done = _tune_process(spec, data_dir, work, len(before) + 3, root / "k.yaml")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    after = _finished(work / "study.db")
    assert [t for t in after if t[0] in dict(before)] == before  # nothing finished was redone or lost
    assert sum(s in ("COMPLETE", "PRUNED") for _, s in after) == len(before) + 3
    assert (root / "k.yaml").is_file() and "best trial" in out


@pytest.mark.slow
def test_two_processes_share_one_study(study, data_dir) -> None:
    root, spec, _ = study
    work = root / "shared"
    first = _tune_process(spec, data_dir, work, 2, root / "s0.yaml")  # the runs and the study, made once
    assert first.wait(timeout=300) == 0, first.communicate()
    procs = [_tune_process(spec, data_dir, work, 16, root / f"s{i}.yaml") for i in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.communicate()
    with sqlite3.connect(work / "study.db") as con:
        rows = con.execute("SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a "
                           "ON a.trial_id = t.trial_id WHERE a.key = 'pid'").fetchall()
    finished = sum(s in ("COMPLETE", "PRUNED") for _, s in _finished(work / "study.db"))
    assert 16 <= finished <= 17  # each stops once the study holds 16 (a trial already running may finish)
    assert len({pid for _, pid in rows if int(pid) not in (first.pid,)}) == 2  # both processes ran trials
