"""Fusion rules against hand computations on small matrices, and the ensemble spec loader's errors."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from submit import ensembling
from submit.errors import SubmitError
from submit.recipe import TTASpec

A = np.array([[0.1, 0.5, 0.9, 0.3],
              [0.8, 0.2, 0.4, 0.6]])
B = np.array([[0.7, 0.1, 0.3, 0.5],
              [0.9, 0.3, 0.1, 0.2]])


def test_mean_fusion_is_weighted_mean() -> None:
    fused = ensembling.fuse([A, B], [3.0, 1.0], "mean")
    # query 0, item 0: (3*0.1 + 1*0.7) / 4 = 0.25
    assert fused[0, 0] == pytest.approx(0.25)
    assert fused[1, 2] == pytest.approx((3 * 0.4 + 0.1) / 4)
    assert fused.dtype == np.float32 and fused.shape == (2, 4)


def test_rank_fusion_by_hand() -> None:
    # ranks of A row 0: [0, 2, 3, 1]; of B row 0: [3, 0, 1, 2]; weights 1, 1 -> mean / (G - 1 = 3)
    fused = ensembling.fuse([A, B], [1.0, 1.0], "rank")
    assert np.allclose(fused[0], np.array([1.5, 1.0, 2.0, 1.5]) / 3)
    # row 1: A ranks [3, 0, 1, 2], B ranks [3, 2, 0, 1]
    assert np.allclose(fused[1], np.array([3.0, 1.0, 0.5, 1.5]) / 3)


def test_average_ranks_share_ties() -> None:
    ranks = ensembling.average_ranks(np.array([[0.5, 0.1, 0.5, 0.5, 0.0]]))
    assert ranks.tolist() == [[3.0, 1.0, 3.0, 3.0, 0.0]]


def test_reliability_weights_by_hand() -> None:
    # k = 2. Query 0 top-2: A {0, 3}, B {1, 2}, C {0, 1}.
    c = np.array([[0.0, 0.1, 0.9, 0.8],
                  [0.9, 0.8, 0.0, 0.1]])
    # query 0 agreements: A: (|{0,3}&{1,2}| + |{0,3}&{0,1}|) / 2 / 2 = (0 + 1) / 4 = 0.25
    #                     B: (0 + 1) / 4 = 0.25;  C: (1 + 1) / 4 = 0.5
    # query 1 top-2: A {1, 2}, B {2, 3}, C {2, 3}: A: (1 + 1) / 4 = 0.5, B: (1 + 2) / 4 = 0.75, C: 0.75
    w = ensembling.reliability_weights([A, B, c], [1.0, 1.0, 2.0], k=2)
    q0 = np.array([0.25, 0.25, 2 * 0.5]) / 1.5
    q1 = np.array([0.5, 0.75, 2 * 0.75]) / 2.75
    assert np.allclose(w[:, 0], q0) and np.allclose(w[:, 1], q1)
    fused = ensembling.fuse([A, B, c], [1.0, 1.0, 2.0], "reliability", k=2)
    assert fused[0, 2] == pytest.approx(q0 @ np.array([0.9, 0.3, 0.9]))
    assert fused[1, 0] == pytest.approx(q1 @ np.array([0.8, 0.9, 0.9]))


def test_reliability_falls_back_to_spec_weights_without_agreement() -> None:
    a = np.array([[0.0, 1.0, 2.0, 3.0]])
    b = np.array([[3.0, 2.0, 1.0, 0.0]])
    w = ensembling.reliability_weights([a, b], [1.0, 3.0], k=1)  # tops {0} and {3}: no overlap
    assert np.allclose(w[:, 0], [0.25, 0.75])


def test_mean_plus_reliability_is_mean_of_both() -> None:
    both = ensembling.fuse([A, B], [1.0, 2.0], "mean+reliability", k=2)
    mean = ensembling.fuse([A, B], [1.0, 2.0], "mean")
    rel = ensembling.fuse([A, B], [1.0, 2.0], "reliability", k=2)
    assert np.allclose(both, (mean + rel) / 2)
    # two members' agreements are symmetric, so with two members reliability equals the weighted mean
    assert np.allclose(rel, mean)


def test_single_member_is_identity_for_every_rule() -> None:
    for rule in ("mean", "reliability", "mean+reliability"):
        assert np.allclose(ensembling.fuse([A], [2.0], rule), A)


def test_fusion_refuses_mismatched_members() -> None:
    with pytest.raises(SubmitError, match="disagree in shape"):
        ensembling.fuse([A, B[:, :3]], [1.0, 1.0])
    with pytest.raises(SubmitError, match="weights"):
        ensembling.fuse([A, B], [0.0, 0.0])
    with pytest.raises(SubmitError, match="unknown fusion"):
        ensembling.fuse([A, B], [1.0, 1.0], "max")


# ---- the spec file ----------------------------------------------------------------------------------


def _run(folder: Path, checkpoints: tuple[str, ...] = ("best.pt",)) -> Path:
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text("name: x\nbackbone: {name: 'timm:resnet10t'}\n")
    for name in checkpoints:
        (folder / name).write_bytes(b"weights")
    return folder


def _spec(folder: Path, text: str) -> Path:
    path = folder / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_spec_paths_resolve_against_the_spec_folder_and_runs_dir(tmp_path: Path) -> None:
    _run(tmp_path / "ens" / "runs" / "a", ("best.pt", "last.pt"))
    _run(tmp_path / "out" / "runs" / "b")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "zero.yaml").write_text("name: zero\nbackbone: {name: 'timm:resnet10t', pretrained: timm}\n")
    path = _spec(tmp_path / "ens", """
        members:
          - {run: runs/a, checkpoint: last, weight: 2, tta: {scales: [1.0, 0.9]}}
          - run: ${RUNS}/b
          - recipe: ../models/zero.yaml
        fusion: mean+reliability
        postprocess:
          - {op: k_reciprocal, params: {k1: 20, k2: 6, lambda_value: 0.3}}
        """)
    spec = ensembling.load_spec(path, runs_dir=tmp_path / "out" / "runs")
    a, b, zero = spec.members
    assert Path(a.run) == (tmp_path / "ens" / "runs" / "a").resolve() and a.name == "a@last"
    assert ensembling.member_checkpoint(a) == Path(a.run) / "last.pt" and a.weight == 2.0
    assert a.tta.apply(TTASpec(hflip=True, scales=(1.0,), batch_size=8)) == TTASpec(True, (1.0, 0.9), 8)
    assert Path(b.run) == (tmp_path / "out" / "runs" / "b").resolve() and b.name == "b"
    assert zero.recipe == str((tmp_path / "models" / "zero.yaml").resolve()) and zero.name == "zero"
    assert spec.fusion == "mean+reliability" and spec.postprocess[0].params == {"k1": 20, "k2": 6, "lambda_value": 0.3}


def test_a_relative_runs_dir_is_relative_to_the_working_folder(tmp_path: Path, monkeypatch) -> None:
    """`--runs-dir out/runs` means out/runs where the command runs, not inside the spec's folder (the demo
    once trained into ensembles/demo-out/runs)."""
    _run(tmp_path / "out" / "runs" / "b")
    (tmp_path / "ens").mkdir()
    path = _spec(tmp_path / "ens", "members: [{run: '${RUNS}/b'}]\n")
    monkeypatch.chdir(tmp_path)
    spec = ensembling.load_spec(path, runs_dir="out/runs")
    assert Path(spec.members[0].run) == (tmp_path / "out" / "runs" / "b").resolve()


@pytest.mark.parametrize("text, pattern", [
    ("members: [{run: runs/a, wieght: 2}]", r"unknown key 'members\[0\]\.wieght'"),
    ("members: [{run: runs/missing}]", r"'members\[0\]\.run': .*missing is not a training run dir"),
    ("members: [{run: runs/a, checkpoint: last}]", r"'members\[0\]\.checkpoint': checkpoint .*last\.pt not found"),
    ("members: [{run: runs/a, recipe: x.yaml}]", r"'members\[0\]': give exactly one of 'run' or 'recipe'"),
    ("members: [{recipe: nope.yaml}]", r"'members\[0\]\.recipe': recipe file .*nope\.yaml not found"),
    ("members: [{run: '${RUNS}/a'}]", r"'members\[0\]\.run' uses \$\{RUNS\}; pass the runs folder"),
    ("members: [{run: runs/a, weight: -1}]", r"'members\[0\]\.weight': expected >= 0"),
    ("members: [{recipe: runs/a/recipe.yaml}]", r"'members\[0\]\.recipe': .*recipe\.yaml has no backbone\.pretrained"),
    ("members: []", r"key 'members': expected at least one member"),
    ("members: [{run: runs/a}]\nfusion: max", r"key 'fusion': expected one of"),
    ("members: [{run: runs/a}]\npostprocess: [{op: k_reciprocal, params: {k9: 1}}]",
     r"'postprocess\[0\]\.params\.k9': not a parameter of k_reciprocal"),
    ("members: [{run: runs/a}]\npostprocess: [{op: k_reciprocal}, {op: query_expansion}]",
     r"'postprocess\[0\]': k_reciprocal returns distances, so it must be the last step"),
    ("members: [{run: runs/a}]\nfusion: rank\npostprocess_on: fused\npostprocess: [{op: k_reciprocal}]",
     r"'postprocess_on': 'fused' needs fusion 'mean'"),
])
def test_spec_errors_are_one_line_and_name_the_key(tmp_path: Path, text: str, pattern: str) -> None:
    _run(tmp_path / "runs" / "a")
    path = _spec(tmp_path, text)
    with pytest.raises(SubmitError) as info:
        ensembling.load_spec(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_repeated_member_names_are_made_unique(tmp_path: Path) -> None:
    _run(tmp_path / "runs" / "a")
    spec = ensembling.load_spec(_spec(tmp_path, "members: [{run: runs/a}, {run: runs/a, weight: 2}]"))
    assert [m.name for m in spec.members] == ["a", "a#2"]


# ---- the registries ---------------------------------------------------------------------------------


def test_a_registered_fusion_rule_is_usable_by_fuse_and_by_specs(tmp_path: Path, monkeypatch) -> None:
    """Adding a rule is one function + one FUSIONS line: `fuse` dispatches on it and specs accept its name."""
    def fuse_min(dists, weights, k=15):
        return np.minimum.reduce([np.asarray(d) for d in dists])

    monkeypatch.setitem(ensembling.FUSIONS, "min", fuse_min)
    assert np.allclose(ensembling.fuse([A, B], [1.0, 1.0], "min"), np.minimum(A, B))
    _run(tmp_path / "runs" / "a")
    assert ensembling.load_spec(_spec(tmp_path, "members: [{run: runs/a}]\nfusion: min\n")).fusion == "min"


def test_unknown_fusion_and_step_errors_list_the_registries(tmp_path: Path) -> None:
    from submit import reranking

    _run(tmp_path / "runs" / "a")
    for text, key, known, got in [("fusion: max", "fusion", list(ensembling.FUSIONS), "max"),
                                  ("postprocess: [{op: k_reciprocal}, {op: pca}]", "postprocess[1].op",
                                   list(reranking.STEPS), "pca")]:
        path = _spec(tmp_path, f"members: [{{run: runs/a}}]\n{text}\n")
        with pytest.raises(SubmitError) as info:
            ensembling.load_spec(path)
        assert str(info.value) == f"{path}: key '{key}': expected one of {known}, got {got!r}"


def test_every_registered_step_validates_its_params_in_a_spec(tmp_path: Path) -> None:
    from submit import reranking

    _run(tmp_path / "runs" / "a")
    for op, step in reranking.STEPS.items():
        ok = _spec(tmp_path, f"members: [{{run: runs/a}}]\npostprocess: [{{op: {op}}}]\n")
        assert ensembling.load_spec(ok).postprocess[0].op == op
        bad = _spec(tmp_path, f"members: [{{run: runs/a}}]\npostprocess: [{{op: {op}, params: {{nope: 1}}}}]\n")
        with pytest.raises(SubmitError, match=rf"'postprocess\[0\]\.params\.nope': not a parameter of {op} "
                                              rf"\(allowed: {', '.join(step.parameters())}\)"):
            ensembling.load_spec(bad)


def test_importing_ensembling_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, submit.ensembling, submit.reranking; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
