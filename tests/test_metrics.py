"""mAP must equal the official scorer (sklearn per query, ties grouped); CMC/mINP follow a stable sort."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from submit import metrics
from submit.errors import SubmitError
from submit.metrics import average_precision, evaluate_distances


def sklearn_aps(dist: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """The reference: one sklearn call per query with a positive, NaN otherwise."""
    return np.array([average_precision_score(matches[i], -dist[i]) if matches[i].any() else np.nan
                     for i in range(len(dist))])


def stable_ranks(dist: np.ndarray, matches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based positions of the first and the last positive after a stable sort (brute force)."""
    first, last = [], []
    for row, m in zip(dist, matches):
        hits = np.flatnonzero(m[np.argsort(row, kind="stable")]) + 1
        first.append(hits[0] if hits.size else 0)
        last.append(hits[-1] if hits.size else 0)
    return np.array(first), np.array(last)


def tied_problem(seed: int, n_q: int = 40, n_g: int = 70, decimals: int = 1, dtype=np.float64):
    """Distances rounded to `decimals` (many ties); rows with no positive, one with all positives."""
    rng = np.random.default_rng(seed)
    dist = np.round(rng.random((n_q, n_g)), decimals).astype(dtype)
    matches = rng.random((n_q, n_g)) < rng.uniform(0.0, 0.6, size=(n_q, 1))
    matches[0] = False
    matches[1] = True
    matches[2] = False
    matches[2, -1] = True
    return dist, matches


# Default settings; every path and block size forced on tiny inputs.
SETTINGS = [
    {},
    {"MAX_COMPARE_POSITIVES": 0},  # stable-sort path for every row
    {"BLOCK_ELEMENTS": 1, "GROUP_ELEMENTS": 1},  # one row per block and group
    {"BLOCK_ELEMENTS": 150, "GROUP_ELEMENTS": 90, "MAX_COMPARE_POSITIVES": 5},  # mixed paths in a block
]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("seed", range(6))
def test_ap_equals_sklearn_with_ties(monkeypatch, settings, seed):
    for name, value in settings.items():
        monkeypatch.setattr(metrics, name, value)
    dist, matches = tied_problem(seed, dtype=np.float32 if seed % 2 else np.float64)
    ours = average_precision(dist, matches)
    ref = sklearn_aps(dist, matches)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert np.isnan(ours[0]) and ours[1] == pytest.approx(1.0)
    assert np.nanmax(np.abs(ours - ref)) < 1e-9
    first, last = stable_ranks(dist, matches)
    _, f, l = metrics._scores(dist, matches.sum(1), lambda rows: matches[rows])
    assert np.array_equal(f, first) and np.array_equal(l, last)


def test_evaluate_distances_matches_references():
    rng = np.random.default_rng(7)
    g_pids = rng.integers(0, 12, size=90)
    q_pids = np.concatenate([rng.integers(0, 12, size=25), [99, 98]])  # two queries without a match
    dist = np.round(rng.random((27, 90)), 2)
    res = evaluate_distances(dist, q_pids, g_pids, ranks=(1, 3, 5, 10))
    matches = q_pids[:, None] == g_pids[None, :]
    valid = matches.any(1)
    first, last = stable_ranks(dist, matches)
    assert res["num_queries"] == 27 and res["num_valid_queries"] == int(valid.sum()) == 25
    assert abs(res["mAP"] - np.nanmean(sklearn_aps(dist, matches))) < 1e-9
    for k in (1, 3, 5, 10):
        assert res[f"rank{k}"] == pytest.approx(np.mean(first[valid] <= k))
    assert res["mINP"] == pytest.approx(np.mean(matches[valid].sum(1) / last[valid]))
    assert all(0.0 <= res[k] <= 1.0 for k in ("mAP", "rank1", "rank3", "rank5", "rank10", "mINP"))
    # Memory layout does not matter (Fortran order, a strided view).
    assert evaluate_distances(np.asfortranarray(dist), q_pids, g_pids, ranks=(1, 3, 5, 10)) == res
    wide = np.repeat(dist, 2, axis=1)[:, ::2]
    assert np.array_equal(average_precision(wide, matches), average_precision(dist, matches), equal_nan=True)


def test_hand_computed_example_and_tie_rules():
    # Positives at positions 2 and 4: AP = (1/2 + 2/4) / 2, first match at 2, hardest at 4.
    res = evaluate_distances(np.array([[0.1, 0.2, 0.3, 0.4]]), [7], [1, 7, 2, 7], ranks=(1, 2))
    assert res["mAP"] == pytest.approx(0.5) and res["mINP"] == pytest.approx(0.5)
    assert res["rank1"] == 0.0 and res["rank2"] == 1.0
    # A tie between a negative (earlier column) and the positive: sklearn groups it (AP 1/2),
    # the stable sort keeps column order, so the first match is at position 2.
    res = evaluate_distances(np.array([[0.3, 0.3, 0.9]]), [5], [1, 5, 2], ranks=(1, 2))
    assert res["mAP"] == pytest.approx(0.5) and res["rank1"] == 0.0 and res["rank2"] == 1.0
    # The positive in the earlier column wins the tie for CMC; AP is unchanged.
    res = evaluate_distances(np.array([[0.3, 0.3, 0.9]]), [5], [5, 1, 2], ranks=(1,))
    assert res["mAP"] == pytest.approx(0.5) and res["rank1"] == 1.0


def test_perfect_ranking_scores_one():
    g_pids = np.repeat(np.arange(10), 4)
    q_pids = np.arange(10)
    dist = (q_pids[:, None] != g_pids[None, :]).astype(float) + np.linspace(0, 0.1, 40)
    res = evaluate_distances(dist, q_pids, g_pids)
    assert res == {"mAP": 1.0, "rank1": 1.0, "rank5": 1.0, "rank10": 1.0, "mINP": 1.0,
                   "num_valid_queries": 10, "num_queries": 10}


def test_integer_distances_are_accepted():
    res = evaluate_distances(np.array([[3, 1, 2]]), [4], [0, 4, 0])
    assert res["mAP"] == 1.0 and res["rank1"] == 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_distance_names_the_cell(bad):
    dist = np.zeros((3, 4))
    dist[2, 1] = bad
    with pytest.raises(SubmitError, match=r"non-finite value .* query row 2, gallery column 1"):
        evaluate_distances(dist, [0, 1, 2], [0, 1, 2, 3])


def test_shape_errors():
    with pytest.raises(SubmitError, match="2x3 but there are 2 query and 4 gallery ids"):
        evaluate_distances(np.zeros((2, 3)), [0, 1], [0, 1, 2, 3])
    with pytest.raises(SubmitError, match="must be 2-D"):
        evaluate_distances(np.zeros(3), [0], [0, 1, 2])
    with pytest.raises(SubmitError, match="matches are 2x2 but distances are 2x3"):
        average_precision(np.zeros((2, 3)), np.zeros((2, 2), dtype=bool))


def test_no_query_with_a_match_is_an_error():
    with pytest.raises(SubmitError, match="no query has a match in the gallery"):
        evaluate_distances(np.zeros((2, 3)), [8, 9], [0, 1, 2])
    with pytest.raises(SubmitError, match="no query has a match"):
        evaluate_distances(np.zeros((2, 0)), [8, 9], [])
