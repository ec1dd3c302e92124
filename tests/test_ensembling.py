"""Fusion rules against hand computations on small matrices, and the ensemble spec loader's errors."""

from __future__ import annotations

import numpy as np
import pytest

from submit import ensembling
from submit.errors import SubmitError

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
