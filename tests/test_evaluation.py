"""`evaluate`: ranking file vs a tiny fake manifest (no images needed): scores, split detection, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import average_precision_score

from submit.cli import main
from submit.errors import SubmitError
from submit.evaluation import evaluate_file
from submit.manifest import write_manifest
from submit.ranking_file import write_ranking

TEST_QUERY_PIDS = [1, 2, 3, 4, 6]  # pid 6 has no gallery image
TEST_GALLERY_PIDS = [3, 1, 2, 1, 5, 3, 2, 4, 1, 3, 4, 5]  # pid 5: distractor without a query
CHALLENGE_QUERIES = [12, 10, 11]
CHALLENGE_GALLERY = [25, 20, 21, 22, 23, 24]


def rows(split, role, pids, image_ids):
    return [{"path": f"data_reid/reid_{split}/{role}/{k}_{pid}.jpeg", "split": split, "role": role,
             "pid": pid, "seq": 0, "frame": k, "image_id": image_id}
            for k, (pid, image_id) in enumerate(zip(pids, image_ids))]


@pytest.fixture()
def data_dir(tmp_path):
    """Test ids are the pids (repeated in the gallery, as officially); challenge ids are file numbers."""
    out = tmp_path / "data"
    out.mkdir()
    table = (rows("train", "train", [7, 7, 8], [0, 1, 2])
             + rows("test", "query", TEST_QUERY_PIDS, TEST_QUERY_PIDS)
             + rows("test", "gallery", TEST_GALLERY_PIDS, TEST_GALLERY_PIDS)
             + rows("challenge", "query", [-1] * 3, CHALLENGE_QUERIES)
             + rows("challenge", "gallery", [-1] * 6, CHALLENGE_GALLERY))
    write_manifest(pd.DataFrame(table), out)
    return out


def perfect_distances(q_pids, g_pids, seed=0):
    """Every match closer than every non-match; small noise so no two distances tie."""
    rng = np.random.default_rng(seed)
    q, g = np.asarray(q_pids), np.asarray(g_pids)
    return (q[:, None] != g[None, :]) + rng.uniform(0, 0.5, size=(q.size, g.size))


def test_perfect_test_file_scores_one_even_when_written_shuffled(tmp_path, data_dir):
    rng = np.random.default_rng(1)
    q = rng.permutation(TEST_QUERY_PIDS)
    g = rng.permutation(TEST_GALLERY_PIDS)  # the writer sorts; repeated ids keep their (shuffled) order
    path = write_ranking(tmp_path / "test.csv", perfect_distances(q, g), q, g)
    res = evaluate_file(path, data_dir)
    assert res["split"] == "test" and res["scored"] is True
    assert [res[k] for k in ("mAP", "rank1", "rank5", "rank10", "mINP")] == [1.0] * 5
    assert res["num_queries"] == 5 and res["num_valid_queries"] == 4 and res["num_gallery"] == 12
    assert res["queries_without_match"] == 1 and res["unmatched_query_ids"] == [6]


def test_random_file_equals_the_official_scorer_on_the_written_file(tmp_path, data_dir):
    rng = np.random.default_rng(2)
    dist = np.round(rng.random((5, 12)), 2)  # ties on purpose
    path = write_ranking(tmp_path / "random.csv", dist, TEST_QUERY_PIDS, TEST_GALLERY_PIDS)
    res = evaluate_file(path, data_dir, split="test")
    order = np.argsort(TEST_GALLERY_PIDS, kind="stable")
    g_sorted = np.asarray(TEST_GALLERY_PIDS)[order]
    aps = [average_precision_score(g_sorted == pid, -dist[i, order])
           for i, pid in enumerate(TEST_QUERY_PIDS) if pid in g_sorted]
    assert abs(res["mAP"] - np.mean(aps)) < 1e-9
    assert 0.0 <= res["rank1"] <= res["rank5"] <= res["rank10"] <= 1.0


def test_challenge_file_is_validated_not_scored(tmp_path, data_dir):
    path = write_ranking(tmp_path / "challenge.csv", np.zeros((3, 6)), CHALLENGE_QUERIES, CHALLENGE_GALLERY)
    res = evaluate_file(path, data_dir)
    assert res["split"] == "challenge" and res["scored"] is False and "mAP" not in res
    assert "no ground-truth identities, so it cannot be scored" in res["message"]
    result = CliRunner().invoke(main, ["evaluate", str(path), "--data", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "valid challenge ranking file (3 queries x 6 gallery)" in result.stdout
    assert "cannot be scored" in result.stdout


def test_cli_json_and_table_with_unmatched_query_warning(tmp_path, data_dir):
    path = write_ranking(tmp_path / "test.csv", perfect_distances(TEST_QUERY_PIDS, TEST_GALLERY_PIDS),
                         TEST_QUERY_PIDS, TEST_GALLERY_PIDS)
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", str(path), "--data", str(data_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is pure JSON; the warning goes to stderr
    assert data["mAP"] == 1.0 and data["split"] == "test" and data["queries_without_match"] == 1
    assert "warning: 1 of 5 queries have no match in the gallery (query ids 6)" in result.stderr
    result = runner.invoke(main, ["evaluate", str(path), "--data", str(data_dir)])
    assert result.exit_code == 0, result.output
    for word in ("mAP", "rank1", "rank5", "rank10", "mINP", "100.00", "4/5 queries scored"):
        assert word in result.stdout
    assert "warning: 1 of 5 queries" in result.stderr


def test_unique_test_ids_work_too(tmp_path):
    """Market-style data: unique image_ids in the test split, pids separate."""
    out = tmp_path / "data"
    out.mkdir()
    write_manifest(pd.DataFrame(rows("test", "query", [1, 2], [100, 101])
                                + rows("test", "gallery", [2, 1, 1], [7, 8, 9])), out)
    dist = np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.7]])  # rows ids 100, 101; columns 7, 8, 9
    path = write_ranking(tmp_path / "r.csv", dist, [100, 101], [7, 8, 9])
    res = evaluate_file(path, out)
    assert res["mAP"] == 1.0 and res["queries_without_match"] == 0


def cli_error(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    return result.stderr


def test_bad_inputs_give_one_line_errors(tmp_path, data_dir):
    short = write_ranking(tmp_path / "short.csv", np.zeros((5, 11)), TEST_QUERY_PIDS, TEST_GALLERY_PIDS[:-1])
    err = cli_error(["evaluate", str(short), "--data", str(data_dir)])
    assert "short.csv: 5 queries x 11 gallery matches no split of the manifest (test 5 x 12, challenge 3 x 6)" in err
    wrong = write_ranking(tmp_path / "wrong.csv", np.zeros((5, 12)), TEST_QUERY_PIDS, [9] + TEST_GALLERY_PIDS[1:])
    err = cli_error(["evaluate", str(wrong), "--data", str(data_dir)])
    assert "wrong.csv: looks like a test file but gallery ids differ from the manifest's" in err
    assert "1 missing (e.g. 3), 1 not expected (e.g. 9)" in err
    challenge = write_ranking(tmp_path / "c.csv", np.zeros((3, 6)), CHALLENGE_QUERIES, CHALLENGE_GALLERY)
    err = cli_error(["evaluate", str(challenge), "--data", str(data_dir), "--split", "test"])
    assert "c.csv: query ids differ from the manifest's" in err and "(split 'test')" in err
    err = cli_error(["evaluate", str(challenge), "--data", str(tmp_path / "nowhere")])
    assert "no manifest" in err
    err = cli_error(["evaluate", str(tmp_path / "missing.csv"), "--data", str(data_dir)])
    assert "missing.csv: no such ranking file" in err
    (tmp_path / "broken.csv").write_text("0,1\n1,x\n")
    err = cli_error(["evaluate", str(tmp_path / "broken.csv"), "--data", str(data_dir)])
    assert "broken.csv: line 2, column 2: distance 'x' is not a number" in err


def test_no_query_with_a_match_and_ambiguous_ids(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    write_manifest(pd.DataFrame(rows("test", "query", [1, 2], [1, 2]) + rows("test", "gallery", [3, 4], [3, 4])), out)
    path = write_ranking(tmp_path / "r.csv", np.zeros((2, 2)), [1, 2], [3, 4])
    with pytest.raises(SubmitError, match=r"r\.csv: none of the 2 test queries has a match in the gallery"):
        evaluate_file(path, out)
    with pytest.raises(SubmitError, match=r"r\.csv: the manifest in .* has no challenge query and gallery images "
                                          r"\(it has: test\)"):
        evaluate_file(path, out, split="challenge")
    write_manifest(pd.DataFrame(rows("test", "query", [1], [1]) + rows("test", "gallery", [1, 2], [5, 5])), out)
    path = write_ranking(tmp_path / "r.csv", np.zeros((1, 2)), [1], [5, 5])
    with pytest.raises(SubmitError, match=r"test/gallery image_id 5 is shared by different pids \[1, 2\]"):
        evaluate_file(path, out)
