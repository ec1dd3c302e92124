"""Zero-shot shirt numbers (mechanics, with a tiny random CLIP) and the number-agreement ranking step."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from submit import jersey
from submit.backbones import load_clip
from submit.cli import main
from submit.errors import SubmitError
from submit.prepare import prepare
from submit.synthetic import make_dataset

torch.set_num_threads(2)
TINY = "reident-tiny-vit"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A prepared DATA_DIR of 10 synthetic players (numbers.csv copied beside the manifest)."""
    root = tmp_path_factory.mktemp("jersey")
    src = make_dataset(root / "src", players=10, seqs=1, frames=3, seed=3)
    return str(prepare(src, root / "data", progress=False).data_dir)


@pytest.fixture()
def clip():
    torch.manual_seed(0)
    return load_clip(TINY, None)


def _count_text_calls(model) -> list[int]:
    calls = [0]
    original = model.encode_text

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    model.encode_text = counted
    return calls


def test_probabilities_have_one_row_per_crop_and_sum_to_one(data_dir, clip) -> None:
    model, tok = clip
    rows = jersey.select_rows(data_dir, "test", "all")
    probs = jersey.read_numbers(model, tok, data_dir, rows["path"].tolist(), batch_size=4, progress=False)
    assert probs.shape == (len(rows), 101)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    pred = jersey.predictions(rows, probs)
    assert list(pred.columns) == jersey.OUT_COLUMNS
    assert pred["number"].between(-1, 99).all()
    np.testing.assert_allclose(pred["prob"], probs.max(1), atol=1e-6)
    assert all(len(s.split()) == 5 for s in pred["top5"])


def test_text_side_is_encoded_once_per_model_and_prompt_set(data_dir, clip) -> None:
    model, tok = clip
    calls = _count_text_calls(model)
    paths = jersey.select_rows(data_dir, "test", "query")["path"].tolist()
    jersey.read_numbers(model, tok, data_dir, paths, progress=False)
    first = calls[0]
    assert first >= 1
    jersey.read_numbers(model, tok, data_dir, paths, progress=False)
    assert calls[0] == first  # cached: no second encoding
    jersey.text_matrix(model, tok, number_prompts=("number {n}",), none_prompts=("nothing",))
    assert calls[0] > first  # another prompt set is a different matrix


def test_text_matrix_rows_are_unit_class_means_and_persist_on_disk(tmp_path, clip) -> None:
    model, tok = clip
    prompts, none = ("player {n}", "shirt {n}"), ("no number",)
    mat = jersey.text_matrix(model, tok, prompts, none, cache_file=tmp_path / "t.npy")
    assert mat.shape == (101, model.text_projection.shape[1])
    np.testing.assert_allclose(mat.norm(dim=1).numpy(), 1.0, atol=1e-5)
    with torch.inference_mode():
        e = torch.nn.functional.normalize(model.encode_text(tok(["player 7", "shirt 7"])), dim=-1)
    expected = torch.nn.functional.normalize(e.mean(0), dim=0)
    np.testing.assert_allclose(mat[7].numpy(), expected.numpy(), atol=1e-5)
    fresh, _ = load_clip(TINY, None)
    calls = _count_text_calls(fresh)
    again = jersey.text_matrix(fresh, tok, prompts, none, cache_file=tmp_path / "t.npy")
    assert calls[0] == 0 and torch.equal(again, mat)


def test_truth_matches_manifest_paths_by_trailing_suffix() -> None:
    truth = {"reid_test/query/3_1_0.jpeg": 7, "reid_challenge/query/00001.jpeg": 12,
             "reid_challenge/gallery/00001.jpeg": 40}
    paths = ["images/reid_test/query/3_1_0.jpeg", "images/reid_challenge/gallery/00001.jpeg",
             "images/reid_challenge/query/00001.jpeg", "images/reid_test/gallery/3_1_1.jpeg"]
    assert jersey.match_truth(paths, truth).tolist() == [7, 40, 12, -2]


def test_accuracy_top5_and_confusions_on_hand_made_predictions() -> None:
    pred = pd.DataFrame({"path": list("abcde"), "number": [7, 1, 1, -1, 23],
                         "top5": ["7 1 2 3 4", "17 1 2 3 4", "1 71 2 3 4", "-1 5 6 8 9", "23 0 2 3 4"]})
    truth = np.array([7, 17, 71, 5, -2])  # the last crop has no truth
    score = jersey.score_numbers(pred, truth)
    assert score.n == 4
    assert score.accuracy == pytest.approx(0.25)
    assert score.top5 == pytest.approx(1.0)
    assert score.none_rate == pytest.approx(0.25)
    assert sorted(score.confusions) == [(5, -1, 1), (17, 1, 1), (71, 1, 1)]
    with pytest.raises(SubmitError, match="no predicted crop has a ground-truth number"):
        jersey.score_numbers(pred, np.full(5, -2))


def test_agreement_lowers_disagreement_raises_unconfident_unchanged() -> None:
    dist = np.full((3, 4), 0.5, dtype=np.float32)
    q_num, q_prob = [10, 10, 10], [0.9, 0.9, 0.2]  # the third query is unconfident
    g_num, g_prob = [10, 11, 10, -1], [0.8, 0.95, 0.1, 0.99]  # g2 unconfident, g3 reads "none"
    out = jersey.number_agreement(dist, q_num, q_prob, g_num, g_prob, bonus=0.2, penalty=0.3, threshold=0.5)
    assert out.dtype == np.float32 and out.shape == dist.shape
    assert out[0, 0] == pytest.approx(0.3) and out[1, 0] == pytest.approx(0.3)  # agree -> lower
    assert out[0, 1] == pytest.approx(0.8)  # disagree -> higher
    np.testing.assert_array_equal(out[:, 2:], dist[:, 2:])  # unconfident / none gallery
    np.testing.assert_array_equal(out[2], dist[2])  # unconfident query
    with pytest.raises(SubmitError, match="do not fit"):
        jersey.number_agreement(dist, q_num, q_prob, g_num[:3], g_prob[:3])
    with pytest.raises(SubmitError, match="threshold"):
        jersey.number_agreement(dist, q_num, q_prob, g_num, g_prob, threshold=1.5)


def _rows(paths: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"path": paths, "image_id": range(len(paths))})


def test_apply_jersey_from_a_numbers_csv(tmp_path) -> None:
    pd.DataFrame({"path": ["q0", "q1", "g0", "g1"], "image_id": [0, 1, 0, 1], "number": [4, 9, 4, 5],
                  "prob": [0.9, 0.9, 0.9, 0.9]}).to_csv(tmp_path / "n.csv", index=False)
    dist = np.zeros((2, 2))
    out = jersey.apply_jersey(dist, _rows(["q0", "q1"]), _rows(["g0", "g1"]), tmp_path,
                              {"numbers": "n.csv", "bonus": 0.1, "penalty": 0.4}, base_dir=tmp_path)
    np.testing.assert_allclose(out, [[-0.1, 0.4], [0.4, 0.4]])
    with pytest.raises(SubmitError, match="no shirt number for g9"):
        jersey.apply_jersey(dist, _rows(["q0", "q1"]), _rows(["g0", "g9"]), tmp_path, {"numbers": "n.csv"},
                            base_dir=tmp_path)


def test_apply_jersey_spec_errors_are_one_line(tmp_path) -> None:
    dist, q, g = np.zeros((1, 1)), _rows(["q"]), _rows(["g"])
    with pytest.raises(SubmitError, match="unknown key 'bonnus'"):
        jersey.apply_jersey(dist, q, g, tmp_path, {"numbers": "n.csv", "bonnus": 1})
    with pytest.raises(SubmitError, match="exactly one of 'model'"):
        jersey.apply_jersey(dist, q, g, tmp_path, {"numbers": "n.csv", "model": TINY})
    with pytest.raises(SubmitError, match="missing.csv: shirt-number file not found"):
        jersey.apply_jersey(dist, q, g, tmp_path, {"numbers": "missing.csv"}, base_dir=tmp_path)


def test_apply_jersey_zero_shot_with_a_model(data_dir) -> None:
    q = jersey.select_rows(data_dir, "test", "query")
    g = jersey.select_rows(data_dir, "test", "gallery")
    dist = np.ones((len(q), len(g)), dtype=np.float32)
    out = jersey.apply_jersey(dist, q, g, data_dir, {"model": TINY, "threshold": 0.0, "bonus": 0.25,
                                                     "penalty": 0.5}, progress=False)
    assert out.shape == dist.shape
    assert set(np.round(np.unique(out), 5)) <= {0.75, 1.0, 1.5}  # every cell moved by exactly one rule
    untouched = jersey.apply_jersey(dist, q, g, data_dir, {"model": TINY, "threshold": 1.0}, progress=False)
    np.testing.assert_array_equal(untouched, dist)  # a random model is never fully confident


def test_truth_file_errors(tmp_path) -> None:
    bad = tmp_path / "truth.csv"
    bad.write_text("file,num\na,1\n")
    with pytest.raises(SubmitError, match="truth.csv: expected columns path,number"):
        jersey.read_truth(bad)
    bad.write_text("path,number\na,seven\n")
    with pytest.raises(SubmitError, match="truth.csv: column 'number' must hold integers"):
        jersey.read_truth(bad)
    with pytest.raises(SubmitError, match="'\\{n\\}'"):
        jersey.class_prompts(("a player",), ("none",))


def test_cli_writes_numbers_and_reports_accuracy(data_dir, tmp_path) -> None:
    out = tmp_path / "numbers.csv"
    res = CliRunner().invoke(main, ["jersey", "--data", data_dir, "--split", "test", "--role", "query",
                                    "--model", TINY, "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert list(df.columns) == jersey.OUT_COLUMNS and len(df) == 2
    assert "accuracy" in res.output and "top-5" in res.output
    res = CliRunner().invoke(main, ["jersey", "--data", data_dir, "--model", TINY, "--out", str(out),
                                    "--truth", str(tmp_path / "nope.csv")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"error: {tmp_path / 'nope.csv'}: ground-truth numbers file not found"]


def test_truth_match_prefers_the_longest_suffix_when_several_match() -> None:
    """Several truth rows end like one manifest path: the longest (most specific) one wins, the whole path
    included; a shorter row only answers for paths the longer ones do not fit."""
    truth = {"00001.jpeg": 1, "gallery/00001.jpeg": 2, "reid_challenge/gallery/00001.jpeg": 3,
             "query/00001.jpeg": 4, "images/reid_test/query/5.jpeg": 9, "reid_test/query/5.jpeg": 8}
    paths = ["images/reid_challenge/gallery/00001.jpeg", "images/other/gallery/00001.jpeg", "images/x/00001.jpeg",
             "images/reid_challenge/query/00001.jpeg", "images/reid_test/query/5.jpeg", "data/reid_test/query/5.jpeg",
             "images/reid_challenge/query/00002.jpeg", "00001.jpeg/other.jpeg"]
    assert jersey.match_truth(paths, truth).tolist() == [3, 2, 1, 4, 9, 8, -2, -2]
