"""Every ablation notebook (`notebooks/*.py`, jupytext percent format) runs headless end to end.

Each notebook is read with jupytext, its `parameters` cell replaced (synthetic demo data, "ci" budget,
one shared WORK_DIR so the tiny runs train once per session) and executed by nbclient in a kernel of
THIS interpreter: a temporary `python3` kernelspec pointing at `sys.executable` is put first on
JUPYTER_PATH, so no user-level kernel install is needed. Each must write its table (CSV, expected rows)
and its plot (PNG) under WORK_DIR/results.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from submit import ablation  # noqa: E402
from submit.errors import SubmitError  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for the kernel process: a `python3` kernelspec running this interpreter, one torch thread."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / "python3", overrides={"display_name": "reident-submit test kernel"})
    spec = json.loads((root / "kernels" / "python3" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    env = dict(os.environ)
    env["JUPYTER_PATH"] = os.pathsep.join([str(root), env.get("JUPYTER_PATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread beats two on a busy 2-core machine
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One WORK_DIR for the whole session: runs, features and the demo data are shared by the notebooks."""
    return tmp_path_factory.mktemp("notebook-work")


def run_notebook(name: str, work: Path, env: dict[str, str], **params: object) -> None:
    """Execute notebooks/<name>.py with its parameters cell replaced by `params` (plus DATA_DIR/WORK_DIR/BUDGET)."""
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected exactly one cell tagged 'parameters'"
    values = {"DATA_DIR": None, "WORK_DIR": str(work), "BUDGET": "ci", "THREADS": 1, **params}
    original = cells[0].source
    for key in values:
        assert f"\n{key} = " in f"\n{original}", f"{name}: parameters cell has no {key}"
    cells[0].source = original + "\n# injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)


def outputs(work: Path, name: str) -> pd.DataFrame:
    """The notebook's table, after checking that its PNG plot exists and is a PNG."""
    png = work / "results" / f"{name}.png"
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, f"{name}: no PNG plot"
    table = pd.read_csv(work / "results" / f"{name}.csv")
    for col in ("mAP", "rank1"):
        assert table[col].between(0, 100).all(), f"{name}: {col} outside [0, 100]"
    return table


def test_01_loss_and_batch(work_dir: Path, kernel_env: dict[str, str]) -> None:
    run_notebook("01_loss_and_batch", work_dir, kernel_env)
    table = outputs(work_dir, "01_loss_and_batch")
    assert list(zip(table["loss"], table["pairs_per_batch"])) == [
        ("infonce", 4), ("infonce", 8), ("triplet", 4), ("triplet", 8)]
    assert table["run"].nunique() == 4
    # one epoch over the same crops: twice the pairs per batch, half the steps
    steps = dict(zip(zip(table["loss"], table["pairs_per_batch"]), table["steps"]))
    assert steps[("infonce", 4)] == 2 * steps[("infonce", 8)]


def test_02_backbone_and_input_size(work_dir: Path, kernel_env: dict[str, str]) -> None:
    run_notebook("02_backbone_and_input_size", work_dir, kernel_env)
    table = outputs(work_dir, "02_backbone_and_input_size")
    assert list(zip(table["backbone"], table["size"])) == [
        ("open_clip:reident-tiny-vit", "32x32"), ("open_clip:reident-tiny-vit", "64x32"),
        ("timm:test_resnet", "32x32"), ("timm:test_resnet", "64x32")]
    assert (table["images_per_s"] > 0).all()


def test_03_tta_views(work_dir: Path, kernel_env: dict[str, str]) -> None:
    run_notebook("03_tta_views", work_dir, kernel_env)
    table = outputs(work_dir, "03_tta_views")
    assert table["tta"].tolist() == ["none", "flip", "scales", "flip + scales"]
    assert table["views"].tolist() == [1, 2, 3, 6]
    assert table["mAP_gain"].iloc[0] == 0


def test_04_reranking_qe_dba(work_dir: Path, kernel_env: dict[str, str]) -> None:
    run_notebook("04_reranking_qe_dba", work_dir, kernel_env)
    table = outputs(work_dir, "04_reranking_qe_dba")
    grid = table[table["chain"] == "re-rank"]
    assert len(grid) == 3 * 2 * 3
    assert set(grid["k1"]) == {5, 10, 20} and set(grid["lambda"]) == {0.1, 0.3, 0.6}
    assert "DBA + QE + re-rank" in set(table["chain"])
    assert len(table) == 18 + 8
    # the grid's default point and the chain "re-rank (20, 6, 0.3)" are the same computation
    default = grid[(grid["k1"] == 20) & (grid["k2"] == 6) & (grid["lambda"] == 0.3)]["mAP"].item()
    assert default == table[table["chain"] == "re-rank (20, 6, 0.3)"]["mAP"].item()


def test_05_fusion_rules(work_dir: Path, kernel_env: dict[str, str]) -> None:
    earlier = ("01_loss_and_batch", "02_backbone_and_input_size")
    shared = all((work_dir / "results" / f"{n}.csv").is_file() for n in earlier)
    before = set((work_dir / "runs").iterdir()) if shared else set()
    run_notebook("05_fusion_rules", work_dir, kernel_env)
    table = outputs(work_dir, "05_fusion_rules")
    assert len(table) == 2 * (3 + 4)
    methods = table[table["input"] == "cosine"]["method"].tolist()
    assert methods == ["member: base", "member: loss=triplet", "member: backbone=timm:test_resnet",
                       "fusion: mean", "fusion: rank", "fusion: reliability", "fusion: mean+reliability"]
    if shared:  # the members are runs notebooks 01 and 02 trained: nothing new was trained
        assert set((work_dir / "runs").iterdir()) == before
    # the same, whatever ran before: runs are keyed by (recipe, manifest), and every member's key is one that
    # notebooks 01 (loss x pairs per batch) and 02 (backbone x size) train with their "ci" grids
    data = ablation.data_dir(None, work_dir, "ci")

    def run_of(variant: dict) -> Path:
        return ablation.run_dir(ablation.recipe("ci", [f"{k}={json.dumps(v)}" for k, v in variant.items()]),
                                data, work_dir)

    members = [run_of(v) for v in ({}, {"train.loss": "triplet"}, {"backbone.name": "timm:test_resnet"})]
    earlier = {run_of({"train.loss": loss, "train.pairs_per_batch": p}) for loss in ("infonce", "triplet")
               for p in (4, 8)}
    earlier |= {run_of({"backbone.name": b, "backbone.image_size": s})
                for b in ("open_clip:reident-tiny-vit", "timm:test_resnet") for s in ([32, 32], [64, 32])}
    assert len(set(members)) == 3 and set(members) <= earlier
    assert all((run / "best.pt").is_file() for run in members)


def test_06_shirt_numbers(work_dir: Path, kernel_env: dict[str, str]) -> None:
    run_notebook("06_shirt_numbers", work_dir, kernel_env)
    table = outputs(work_dir, "06_shirt_numbers")
    assert table["numbers_from"].tolist()[:2] == ["no step", "zero-shot reident-tiny-vit"]
    assert len(table) == 2 + 2 * 4
    # the random tiny reader is never confident, so the ranking is unchanged
    assert table["mAP_gain"].iloc[1] == 0
    # a perfect reader (no misreads) cannot hurt mAP with a bonus for equal numbers
    clean = table[(table["numbers_from"] == "oracle (confident wrong)") & (table["noise"] == 0)]
    assert clean["mAP_gain"].item() >= 0


def test_notebook_outputs_reused(work_dir: Path, kernel_env: dict[str, str]) -> None:
    """A second run trains and embeds nothing (no new or rewritten checkpoints or features), also when the
    same data is passed as an explicit DATA_DIR: runs are keyed by the manifest, not by the folder name."""
    if not (work_dir / "results" / "03_tta_views.csv").is_file():  # run alone: the first run trains and embeds
        run_notebook("03_tta_views", work_dir, kernel_env)
    demo = sorted(work_dir.glob("demo-data-*"))
    assert len(demo) == 1

    def state() -> dict[Path, int]:
        files = [*(work_dir / "runs").glob("*/best.pt"), *(work_dir / "features").glob("*.npy")]
        return {p: p.stat().st_mtime_ns for p in files}

    before = state()
    run_notebook("03_tta_views", work_dir, kernel_env, DATA_DIR=str(demo[0]))
    assert state() == before and before
    assert outputs(work_dir, "03_tta_views")["views"].tolist() == [1, 2, 3, 6]


def test_bad_parameters_fail_with_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SubmitError, match=r"BUDGET 'huge': expected one of \['ci', 'full', 'pretrained'\]"):
        ablation.budget("huge")
    with pytest.raises(SubmitError, match=rf"DATA_DIR {tmp_path}: no manifest.csv"):
        ablation.data_dir(tmp_path, tmp_path / "work", "ci")
    with pytest.raises(SubmitError, match=r"ablation overrides: .*train\.loss"):
        ablation.recipe("ci", ["train.loss=hinge"])


def test_noisy_oracle_and_variant_names() -> None:
    truth = np.array([7, 23, -2, 0, 99] * 40)
    numbers, probs = ablation.noisy_oracle(truth, 0.0, flagged=False)
    assert (numbers == np.where(truth >= 0, truth, -1)).all() and (probs == (truth >= 0)).all()
    numbers, probs = ablation.noisy_oracle(truth, 0.5, flagged=True, seed=1)
    wrong = (numbers != truth) & (truth >= 0)
    assert 0.3 < wrong.sum() / (truth >= 0).sum() < 0.7  # about half misread, each to a DIFFERENT number
    assert (probs[wrong] == 0.3).all() and (probs[~wrong & (truth >= 0)] == 1.0).all()
    assert ((numbers >= 0) & (numbers < 100) | (truth < 0)).all()
    assert ablation.variant_name({}) == "base"
    assert ablation.variant_name({"train.loss": "triplet", "backbone.name": "timm:resnet34"}) == \
        "loss=triplet, backbone=timm:resnet34"


def test_07_pretrained_vs_scratch(work_dir: Path, kernel_env: dict[str, str]) -> None:
    run_notebook("07_pretrained_vs_scratch", work_dir, kernel_env)
    table = outputs(work_dir, "07_pretrained_vs_scratch")
    assert list(table["row"]) == ["zero-shot", "scratch", "pre-trained"]
    assert table["run"].iloc[1] != table["run"].iloc[2]  # two trainings from different starting weights
    assert (work_dir / "runs").is_dir() and any(p.name.startswith("tiny-test") for p in (work_dir / "runs").iterdir())
