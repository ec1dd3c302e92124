"""scripts/real_table.py's spec copies and run links (what the real-image scripts compare rests on them): a
member takes the training a study chose for the run of the same name, and a finished run is reused only when its
recipe.yaml is exactly the member's, so a comparison never scores a run trained otherwise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from submit.ensembling import member_recipe, load_spec
from submit.run_folder import write_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_table():
    spec = importlib.util.spec_from_file_location("real_table", REPO / "scripts" / "real_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pair(path: Path) -> Path:
    """A two-member spec over the tiny recipe: `a` as written, `b` at another input size."""
    path.write_text(yaml.safe_dump({
        "members": [{"run": "${RUNS}/a", "train": {"recipe": str(REPO / "models" / "tiny-test.yaml"), "seed": 0}},
                    {"run": "${RUNS}/b", "train": {"recipe": str(REPO / "models" / "tiny-test.yaml"), "seed": 100,
                                                   "overrides": ["backbone.image_size=[40, 20]"]}}],
        "fusion": "mean"}, sort_keys=False))
    return path


def test_a_member_alone_and_the_training_a_study_chose_for_its_run(real_table, tmp_path, capsys):
    pair = _pair(tmp_path / "pair.yaml")
    real_table.seed_spec(str(pair), 2, str(tmp_path / "one.yaml"), member=1)
    one = yaml.safe_load((tmp_path / "one.yaml").read_text())
    assert [m["run"] for m in one["members"]] == ["${RUNS}/b"] and one["members"][0]["train"]["seed"] == 102

    tuned = tmp_path / "tuned.yaml"  # what `tune --train-space` writes for the one-member spec
    one["members"][0]["train"]["overrides"] = ["train.epochs=3", "backbone.image_size=[40, 20]"]
    tuned.write_text("# training values: {...}\n# study line\n" + yaml.safe_dump(one, sort_keys=False))
    real_table.seed_spec(str(pair), 1, str(tmp_path / "both.yaml"), training_from=[str(tuned)])
    text = (tmp_path / "both.yaml").read_text()
    both = yaml.safe_load(text)
    assert both["members"][0]["train"] == {"recipe": str(REPO / "models" / "tiny-test.yaml"), "seed": 1}
    assert both["members"][1]["train"]["overrides"] == ["train.epochs=3", "backbone.image_size=[40, 20]"]
    assert both["members"][1]["train"]["seed"] == 101  # the seed is the copy's, not the study's
    assert "# b: training values: {...}" in text.splitlines() and "# study line" not in text

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"members": [{"run": "${RUNS}/c", "train": {"recipe": "x.yaml"}}]}))
    with pytest.raises(SystemExit) as refused:
        real_table.seed_spec(str(pair), 0, str(tmp_path / "never.yaml"), training_from=[str(other)])
    line = capsys.readouterr().err
    assert refused.value.code == 2 and line.count("\n") == 1
    assert line.startswith(f"error: {other}: none of its members' runs (${{RUNS}}/c) is a trained member")
    with pytest.raises(SystemExit) as refused:
        real_table.seed_spec(str(pair), 0, str(tmp_path / "never.yaml"), member=2)
    assert refused.value.code == 2 and capsys.readouterr().err == f"error: {pair}: no member 2 (it has 2)\n"
    assert not (tmp_path / "never.yaml").exists()


def test_a_finished_run_is_linked_only_when_its_recipe_is_the_members(real_table, tmp_path):
    pair = _pair(tmp_path / "pair.yaml")
    spec = load_spec(pair, tmp_path / "unused", require_runs=False)
    recipes = [member_recipe(m, pair) for m in spec.members]
    done = tmp_path / "done"
    for name, recipe in (("a", recipes[1]), ("b", recipes[1])):  # `a` trained with b's recipe: not a's run
        (done / name).mkdir(parents=True)
        write_recipe(done / name, recipe)
        (done / name / "last.pt").write_bytes(b"")
    unfinished = tmp_path / "unfinished" / "a"
    unfinished.mkdir(parents=True)
    write_recipe(unfinished, recipes[0])  # a's recipe, no last.pt: not finished

    runs = tmp_path / "runs"
    real_table.link_runs(str(pair), str(runs), [str(tmp_path / "unfinished"), str(done)])
    assert sorted(p.name for p in runs.iterdir()) == ["b"]
    assert (runs / "b").is_symlink() and (runs / "b").resolve() == (done / "b").resolve()
