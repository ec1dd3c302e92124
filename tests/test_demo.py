"""The embedded demo end to end (with a tiny ViT spec, for speed) and `train --ensemble`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from submit.cli import main
from submit.demo import run_demo
from submit.errors import SubmitError
from submit.ranking_file import read_ranking

REPO = Path(__file__).resolve().parents[1]

TINY_SPEC = f"""
members:
  - run: ${{RUNS}}/tiny-a
    train: {{recipe: {REPO}/models/tiny-test.yaml, seed: 0, overrides: ["train.epochs=1"]}}
  - run: ${{RUNS}}/tiny-b
    train: {{recipe: {REPO}/models/tiny-test.yaml, seed: 1, overrides: ["train.epochs=1"]}}
fusion: mean
postprocess:
  - op: k_reciprocal
    params: {{k1: 6, k2: 3, lambda_value: 0.3}}
"""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    spec = out / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    result = run_demo(out / "run", players=30, spec=spec, progress=False, log=lambda _: None)
    return out, spec, result


def test_demo_writes_valid_files_and_honest_scores(demo_run) -> None:
    out, _, result = demo_run
    test = result["test"]
    assert test["scored"] and test["num_queries"] == 6
    assert 0.0 <= test["mAP"] <= 1.0 and 0.0 <= test["rank1"] <= 1.0
    # the evaluated score is the score of the file the predict stage wrote (last stage of its table)
    assert abs(list(result["predict_test"]["scores"].values())[-1]["mAP"] - test["mAP"]) < 1e-12
    dist, q, g = read_ranking(result["files"]["challenge"])
    assert dist.shape == (6, 54) and list(q) == sorted(q)
    assert result["challenge"]["scored"] is False
    assert {Path(r["run_dir"]).name for r in result["runs"]} == {"tiny-a", "tiny-b"}


def test_rerunning_the_demo_retrains_nothing(demo_run) -> None:
    out, spec, first = demo_run
    best = [Path(r["run_dir"]) / "best.pt" for r in first["runs"]]
    stamps = [p.stat().st_mtime_ns for p in best]
    again = run_demo(out / "run", players=30, spec=spec, progress=False, log=lambda _: None)
    assert [p.stat().st_mtime_ns for p in best] == stamps
    assert all(r["steps"] == first_r["steps"] for r, first_r in zip(again["runs"], first["runs"]))
    assert again["test"]["mAP"] == pytest.approx(first["test"]["mAP"], abs=1e-9)


def test_train_ensemble_cli_rejects_mixed_arguments(demo_run, tmp_path) -> None:
    out, spec, _ = demo_run
    res = CliRunner().invoke(main, ["train", "models/tiny-test.yaml", "--ensemble", str(spec),
                                    "--data", str(out / "run" / "data")])
    assert res.exit_code == 2 and "--ensemble trains the spec's members" in res.output
    res = CliRunner().invoke(main, ["train", "--data", str(out / "run" / "data")])
    assert res.exit_code == 2 and "train needs RECIPE and --out" in res.output


def test_a_spec_without_train_blocks_has_nothing_to_train(demo_run, tmp_path) -> None:
    from submit.training import train_members

    out, _, _ = demo_run
    spec = tmp_path / "s.yaml"
    spec.write_text(f"members: [{{run: {out}/run/runs/tiny-a}}]\n")
    with pytest.raises(SubmitError, match="no member has a 'train' block"):
        train_members(spec, out / "run" / "data")


def test_a_train_block_with_a_missing_recipe_is_a_one_line_error(tmp_path) -> None:
    from submit.ensembling import load_spec

    spec = tmp_path / "s.yaml"
    spec.write_text("members: [{run: runs/a, train: {recipe: nosuch.yaml}}]\n")
    with pytest.raises(SubmitError, match=r"members\[0\].train.recipe': recipe file .*nosuch.yaml not found"):
        load_spec(spec, require_runs=False)
