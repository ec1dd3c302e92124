"""`runs`: typed summaries read from real run folders (metrics.json, recipe.yaml, last.pt), sorting, scanning a
parent folder, one-line errors for folders that are not runs, JSON, the curves PNG and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from submit import runs, training
from submit.cli import main
from submit.errors import SubmitError
from submit.manifest import fingerprint, read_manifest
from submit.prepare import prepare
from submit.recipe import load_recipe
from submit.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
# 8 pairs per batch: 13 steps per epoch.
FAST = ["data.workers=0", "train.pairs_per_batch=8", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """RUNS/{a: 2 validated epochs, b: stopped at step 5 of 2 epochs, c: split=all}, plus a stray folder."""
    root = tmp_path_factory.mktemp("runs")
    make_dataset(root / "src", players=30, seqs=2, frames=3, seed=1)
    prepare(root / "src", root / "data", progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra, steps in (("a", ["train.epochs=2"], None), ("b", ["train.epochs=2", "seed=1"], 5),
                                   ("c", ["train.epochs=1", "data.split=all"], 3)):
            recipe = training.apply_overrides(load_recipe(TINY), [*FAST, *extra])
            training.train(recipe, root / "data", root / "runs" / name, max_steps=steps, progress=False,
                           report_to=("none",))
    finally:
        torch.set_num_threads(before)
    (root / "runs" / "notes").mkdir()
    return root / "runs"


def test_summaries_come_from_the_run_files(runs_dir):
    a = runs.read_run(runs_dir / "a")
    metrics = json.loads((runs_dir / "a" / "metrics.json").read_text())
    history = metrics["history"]
    best = max(history, key=lambda r: r["mAP"])
    assert (a.name, a.recipe, a.backbone) == ("a", "tiny-test", "open_clip:reident-tiny-vit")
    assert (a.epochs_done, a.epochs_planned, a.steps) == (2, 2, 26)
    assert (a.best_mAP, a.best_rank1, a.best_epoch) == (best["mAP"], best["rank1"], best["epoch"])
    assert (a.last_mAP, a.last_rank1) == (history[-1]["mAP"], history[-1]["rank1"])
    assert a.train_seconds == pytest.approx(sum(r["seconds"] for r in history)) and a.train_seconds > 0
    assert a.manifest == metrics["manifest"] == fingerprint(read_manifest(runs_dir.parent / "data"))
    assert [(p.epoch, p.step) for p in a.curve] == [(1, 13), (2, 26)]
    assert [p.mINP for p in a.curve] == [r["mINP"] for r in history]
    b = runs.read_run(runs_dir / "b")
    assert (b.epochs_done, b.epochs_planned, b.steps) == (0, 2, 5) and len(b.curve) == 1  # stopped mid-epoch
    c = runs.read_run(runs_dir / "c")
    assert c.best_mAP is None and c.curve == () and "skipped" in (c.validation or "")


def test_metrics_json_missing_falls_back_to_last_pt(runs_dir, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(runs_dir / "a", copy)
    (copy / "metrics.json").unlink()
    assert dataclasses_equal(runs.read_run(copy), runs.read_run(runs_dir / "a"), skip=("run_dir", "validation"))


def dataclasses_equal(x, y, skip: tuple[str, ...]) -> bool:
    import dataclasses

    a, b = dataclasses.asdict(x), dataclasses.asdict(y)
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_parent_folder_is_scanned_sorted_and_strays_noted(runs_dir):
    table = runs.list_runs([runs_dir], sort="mAP")
    names = [r.name for r in table.runs]
    assert sorted(names) == ["a", "b", "c"] and names[-1] == "c"  # no score: last
    scores = [r.best_mAP for r in table.runs if r.best_mAP is not None]
    assert scores == sorted(scores, reverse=True)
    assert table.notes == (f"skipped {runs_dir / 'notes'}: not a training run",)
    by_time = runs.list_runs([runs_dir / "a", runs_dir / "c"], sort="time").runs
    assert by_time[0].train_seconds <= by_time[1].train_seconds
    assert [r.name for r in runs.list_runs([runs_dir / "b", runs_dir / "a"], sort="name").runs] == ["a", "b"]
    assert len(runs.list_runs([runs_dir / "a", runs_dir / "a"]).runs) == 1  # named twice, listed once


def test_not_a_run_and_damaged_files_are_one_line_errors(runs_dir, tmp_path):
    shutil.copytree(runs_dir / "a", tmp_path / "broken")
    (tmp_path / "broken" / "metrics.json").write_text("{oops")
    (tmp_path / "empty").mkdir()
    for paths, words in (([runs_dir / "notes"], f"{runs_dir / 'notes'}: not a training run"),
                         ([tmp_path / "empty"], "not a training run"),
                         ([tmp_path / "missing"], "no such folder"),
                         ([tmp_path / "broken"], f"{tmp_path / 'broken' / 'metrics.json'}: not readable JSON")):
        with pytest.raises(SubmitError) as err:
            runs.list_runs(paths)
        assert words in str(err.value) and "\n" not in str(err.value), words
    with pytest.raises(SubmitError, match="--sort 'speed'"):
        runs.list_runs([runs_dir], sort="speed")


def test_plot_writes_a_png_of_the_validated_runs(runs_dir, tmp_path):
    table = runs.list_runs([runs_dir])
    out = runs.plot_curves(table.runs, tmp_path / "curves.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 800 and img.height > 300
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(SubmitError, match="none of the runs has validation metrics"):
        runs.plot_curves(runs.list_runs([runs_dir / "c"]).runs, tmp_path / "none.png")
    with pytest.raises(SubmitError, match="does not exist"):
        runs.plot_curves(table.runs, tmp_path / "no" / "x.png")


def test_cli_runs_table_json_and_plot(runs_dir, tmp_path):
    runner = CliRunner()
    text = runner.invoke(main, ["runs", str(runs_dir), "--sort", "rank1"])
    assert text.exit_code == 0, text.output
    assert "tiny-test" in text.output and "2/2" in text.output and "note: skipped" in text.output
    png = tmp_path / "c.png"
    machine = runner.invoke(main, ["runs", str(runs_dir / "a"), str(runs_dir / "b"), "--json", "--plot", str(png)])
    assert machine.exit_code == 0, machine.output
    data = json.loads(machine.stdout)
    assert data["sort"] == "mAP" and [r["name"] for r in data["runs"]] and png.is_file()
    assert set(data["runs"][0]) >= {"recipe", "backbone", "best_mAP", "last_rank1", "train_seconds", "manifest",
                                    "curve"}
    bad = runner.invoke(main, ["runs", str(runs_dir / "notes")])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and len(bad.output.strip().splitlines()) == 1
