"""submit.reranking: blockwise k-reciprocal re-ranking equals the dense algorithm; QE, DBA, chains, errors."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

from dense_rerank_oracle import dense_k_reciprocal
from submit import reranking
from submit.reranking import _distances, _kreciprocal, _threads, _tile_pass
from submit.errors import SubmitError
from submit.reranking import (cosine_distance, database_augmentation, estimate_rerank_memory, k_reciprocal,
                              postprocess, query_expansion)


def labelled(seed: int, n: int, dim: int, clusters: int, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows around a few random centres (re-id-like neighbourhoods), and each row's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centres[labels] / np.sqrt(dim) + noise / np.sqrt(dim) * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def clustered(seed: int, n: int, dim: int, clusters: int, noise: float = 0.3) -> np.ndarray:
    return labelled(seed, n, dim, clusters, noise)[0]


def lattice(seed: int, n: int, dim: int = 10, ones: int = 4) -> np.ndarray:
    """Unit 0/1 vectors with `ones` ones: distinct points at exactly equal distances (many ties)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), dtype=np.float32)
    for row in x:
        row[rng.choice(dim, ones, replace=False)] = 1.0
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reversed_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the oracle break distance ties by descending index instead of ascending."""
    argsort = np.argsort

    def descending(a: np.ndarray, axis: int = -1, kind: str | None = None) -> np.ndarray:
        return a.shape[1] - 1 - argsort(a[:, ::-1], axis=1, kind="stable")

    monkeypatch.setattr(np, "argsort", descending)


@pytest.mark.parametrize("seed, n_query, n_gallery, dim, k1, k2, lam, block", [
    (0, 30, 200, 16, 20, 6, 0.3, 64),
    (1, 50, 450, 32, 20, 6, 0.3, 128),
    (2, 7, 40, 8, 5, 1, 0.5, 16),
    (3, 40, 300, 64, 7, 3, 0.0, 2048),
    (4, 25, 250, 6, 4, 2, 1.0, 48),
])
def test_matches_dense_oracle(seed, n_query, n_gallery, dim, k1, k2, lam, block):
    x = clustered(seed, n_query + n_gallery, dim, clusters=max(3, (n_query + n_gallery) // 15))
    q, g = x[:n_query], x[n_query:]
    ours = k_reciprocal(q, g, k1=k1, k2=k2, lambda_value=lam, block=block)
    dense = dense_k_reciprocal(q, g, k1, k2, lam)
    assert ours.shape == (n_query, n_gallery) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, dense, atol=1e-5, rtol=0)
    assert np.ptp(ours) > 0.1  # not a degenerate constant answer


@pytest.mark.parametrize("seed, k1, k2", [(0, 20, 6), (1, 4, 2), (2, 7, 3)])
def test_ties_resolved_by_lower_index(seed, k1, k2, monkeypatch):
    x = lattice(seed, 240)
    q, g = x[:48], x[48:]
    ours = k_reciprocal(q, g, k1=k1, k2=k2, block=32)
    np.testing.assert_allclose(ours, dense_k_reciprocal(q, g, k1, k2), atol=1e-5, rtol=0)
    reversed_ties(monkeypatch)
    other_rule = dense_k_reciprocal(q, g, k1, k2)
    assert np.abs(ours - other_rule).max() > 0.05  # the tie rule matters on these inputs


def test_duplicate_rows_and_unnormalised_features():
    rng = np.random.default_rng(5)
    base = (3 * rng.standard_normal((12, 8))).astype(np.float32)
    x = base[rng.integers(0, 12, 300)]  # ~25 exact copies of each row
    x[::7] *= 2.0
    q, g = x[:40], x[40:]
    np.testing.assert_allclose(k_reciprocal(q, g, block=32), dense_k_reciprocal(q, g), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_query, n_gallery", [(1, 1), (3, 9), (5, 20)])
def test_fewer_rows_than_k1(n_query, n_gallery):
    x = clustered(7, n_query + n_gallery, 5, clusters=2)
    q, g = x[:n_query], x[n_query:]
    np.testing.assert_allclose(k_reciprocal(q, g), dense_k_reciprocal(q, g), atol=1e-5, rtol=0)


def test_float16_v_of_the_toolkits_is_close_but_not_equal():
    x = clustered(8, 260, 24, clusters=15)
    q, g = x[:40], x[40:]
    ours, half = k_reciprocal(q, g), dense_k_reciprocal(q, g, v_dtype=np.float16)
    assert 1e-6 < np.abs(ours - half).max() < 5e-3
    toolkit = dense_k_reciprocal(q, g, toolkit=True)  # float32 matmul, quicksort, float16 V
    assert 1e-6 < np.abs(ours - toolkit).max() < 5e-3


def test_block_size_does_not_change_the_result():
    x = clustered(9, 700, 32, clusters=40)
    q, g = x[:100], x[100:]
    np.testing.assert_allclose(k_reciprocal(q, g, block=16), k_reciprocal(q, g, block=4096), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [300, 65_536, 65_537])
def test_candidate_order_is_lexsort(n):
    """The packed-key sort (n <= 65,536) and its lexsort fallback order (row, value, col) the same way,
    negative values, -0.0 and equal values included."""
    rng = np.random.default_rng(5)
    rows, cols = rng.integers(0, n, 4000), rng.integers(0, n, 4000)
    rows[:2000], cols[:2000] = rng.integers(0, 7, 2000), rng.integers(0, 7, 2000)
    pairs = np.unique(np.stack([rows, cols], axis=1), axis=0)  # (row, col) pairs are unique, in any order
    pairs = pairs[rng.permutation(len(pairs))]
    vals = rng.choice(np.array([-1.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.5, 3.0], dtype=np.float32), len(pairs))
    rows, cols = pairs[:, 0].astype(np.int32), pairs[:, 1].astype(np.int32)
    expected = np.lexsort((cols, vals, rows))
    np.testing.assert_array_equal(_kreciprocal._row_value_col_order(rows, vals, cols, n), expected)


@pytest.mark.parametrize("width", [5, 30, 200, 1001])
def test_smallest_per_row_equals_a_full_sort(width):
    """The grouped bound of _smallest keeps the same `need` smallest distances as sorting whole rows (ties,
    duplicates, tiles narrower than need and widths not divisible by the groups included)."""
    rng = np.random.default_rng(width)
    s = rng.choice(np.linspace(-1, 1, 40, dtype=np.float32), size=(70, width))
    s[:, ::7] = rng.standard_normal((70, len(range(0, width, 7)))).astype(np.float32)
    x = _distances._Rows(np.ones((1, 4), np.float32), np.ones((1, 4), np.float32))
    tiles = _distances._Tiles.build(x, _distances._norms(x))
    need = 22
    full = np.sort(tiles.dist(s), axis=1)[:, :need]
    want = np.full((70, need), np.inf, dtype=np.float32)
    want[:, :full.shape[1]] = full
    np.testing.assert_array_equal(np.sort(_tile_pass._smallest(tiles, s, need), axis=1), want)


def test_group_is_unique_with_inverse():
    code = np.random.default_rng(6).integers(0, 50, 1000).astype(np.int64)
    for got, want in zip(_kreciprocal._group(code), np.unique(code, return_inverse=True)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", ["ties", "duplicates", "clustered"])
def test_threads_do_not_change_the_result(case):
    rng = np.random.default_rng(17)
    if case == "ties":
        x = lattice(17, 400)
    elif case == "duplicates":
        x = (3 * rng.standard_normal((20, 8))).astype(np.float32)[rng.integers(0, 20, 500)]
        x[::5] *= 2.0
    else:
        x = clustered(17, 900, 24, clusters=60)
    q, g = x[:60], x[60:]
    one = k_reciprocal(q, g, block=32, threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(k_reciprocal(q, g, block=32, threads=threads), one)
    if case != "clustered":
        np.testing.assert_allclose(one, dense_k_reciprocal(q, g), atol=1e-5, rtol=0)


def test_threads_share_the_tiles(monkeypatch):
    tile = _tile_pass._TilePass._tile
    seen: list[str] = []

    def spy(self, *args):
        seen.append(threading.current_thread().name)
        return tile(self, *args)

    monkeypatch.setattr(_tile_pass._TilePass, "_tile", spy)
    x = clustered(18, 300, 8, clusters=10)
    k_reciprocal(x[:30], x[30:], block=32, threads=1)
    assert set(seen) == {threading.current_thread().name} and len(seen) == 55  # 10 blocks: 10 + 45 tiles
    seen.clear()
    k_reciprocal(x[:30], x[30:], block=32, threads=2)
    # the last 2 x 2 tiles are cut into row halves, and both threads take some
    assert len(seen) == 59 and {name[:-1] for name in seen} == {"rerank_"} and len(set(seen)) == 2


def test_tile_order_covers_each_pair_once():
    sizes = [32, 32, 32, 17]
    for threads in (1, 2, 3):
        items = _tile_pass._tile_order(sizes, threads)
        assert [it[:2] for it in items[:4]] == [(0, 0), (1, 1), (2, 2), (3, 3)]  # diagonal tiles first
        covered: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, j, lo, hi in items:
            covered.setdefault((i, j), []).append((lo, hi))
        assert sorted(covered) == [(i, j) for i in range(4) for j in range(i, 4)]
        for (i, _), parts in covered.items():  # each tile's rows once, in order, whole or in two halves
            assert parts[0][0] == 0 and parts[-1][1] == sizes[i] and len(parts) <= 2
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert len(items) == 10 + {1: 0, 2: 4, 3: 0}[threads]  # 3 threads: 6 pairs are not more than 2 x 3
    assert all(lo < hi for _, _, lo, hi in _tile_pass._tile_order([1, 1, 1, 1, 1, 1], 2))  # no empty halves


def test_one_blas_thread_is_per_thread_and_restored():
    setter = _threads._openblas_thread_setter()
    if setter is None:
        pytest.skip("numpy's BLAS offers no per-thread thread count")
    seen = {}

    def probe():
        first = setter(5)
        setter(first)
        with _threads._one_blas_thread():
            seen["inside"] = setter(1)
        seen["after"], seen["first"] = setter(first), first

    worker = threading.Thread(target=probe)
    worker.start()
    worker.join()
    assert seen["inside"] == 1 and seen["after"] == seen["first"]


def test_never_allocates_a_dense_n_by_n_matrix():
    n_query, n_gallery = 300, 7700
    x = clustered(10, n_query + n_gallery, 16, clusters=500, noise=0.2)
    q, g = x[:n_query], x[n_query:]
    tracemalloc.start()
    try:
        k_reciprocal(q, g, block=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    dense_float32 = (n_query + n_gallery) ** 2 * 4  # 256 MB; the dense algorithm holds several such
    assert peak < dense_float32 / 8, f"peak {peak / 2**20:.1f} MiB"


def test_refuses_a_job_that_does_not_fit():
    x = clustered(11, 60, 8, clusters=4)
    with pytest.raises(SubmitError, match=r"k_reciprocal: needs about .* GiB for 10 queries x 50 gallery "
                                          r"\(block=1024\) but only 0\.00 GiB is available; lower 'block'"):
        k_reciprocal(x[:10], x[10:], memory_limit=1000)


def test_available_memory_and_progress_bar():
    assert reranking.available_memory() > 2**20
    x = clustered(16, 300, 8, clusters=10)
    np.testing.assert_array_equal(k_reciprocal(x[:20], x[20:], block=64, progress=True),
                                  k_reciprocal(x[:20], x[20:], block=64))


def test_memory_estimate_scales_and_fits_the_large_case():
    small = estimate_rerank_memory(618, 9505, 1024)
    assert small < 0.5 * 24 * (618 + 9505) ** 2  # far below the dense algorithm's ~24 N^2 bytes
    assert estimate_rerank_memory(618, 9505, 1024, block=512) < small
    assert small < estimate_rerank_memory(618, 9505, 1024, threads=2) <= small + 16 * 2**20  # + a tile, 2 blocks
    large = estimate_rerank_memory(10_000, 100_000, 256)
    assert 10_000 * 100_000 * 4 < large < 16 * 2**30


@pytest.mark.parametrize("kwargs, message", [
    (dict(k1=0), r"k1: expected an integer >= 1, got 0"),
    (dict(k2=2.5), r"k2: expected an integer >= 1, got 2.5"),
    (dict(lambda_value=1.5), r"lambda_value: expected a number in \[0, 1\], got 1.5"),
    (dict(block=4), r"block: expected an integer >= 16, got 4"),
    (dict(threads=0), r"threads: expected an integer >= 1, got 0"),
])
def test_bad_parameters(kwargs, message):
    x = clustered(12, 30, 4, clusters=3)
    with pytest.raises(SubmitError, match=message):
        k_reciprocal(x[:5], x[5:], **kwargs)


@pytest.mark.parametrize("q, g, message", [
    (np.zeros((3,)), np.zeros((4, 3)), r"query_feats: expected a non-empty \(n, d\) feature matrix, got shape \(3,\)"),
    (np.zeros((3, 4)), np.zeros((0, 4)), r"gallery_feats: expected a non-empty \(n, d\) feature matrix"),
    (np.zeros((3, 4)), np.zeros((5, 3)), r"gallery_feats: feature size 3 differs from query_feats' 4"),
    (np.full((3, 4), np.nan), np.ones((5, 4)), r"query_feats: contains NaN or infinite values"),
    (np.array([["a"]]), np.ones((5, 1)), r"query_feats: expected numbers, got dtype <U1"),
    (np.ones((3, 4)), np.ones((5, 4)), r"all feature rows are identical"),
])
def test_bad_features(q, g, message):
    with pytest.raises(SubmitError, match=message):
        k_reciprocal(q, g)


def test_query_expansion_by_hand():
    g = np.eye(4, dtype=np.float32)
    q = np.array([[0.8, 0.6, 0.0, 0.0]], dtype=np.float32)
    q2, g2 = query_expansion(q, g, k=1, alpha=0)
    expected = q + g[0]
    np.testing.assert_allclose(q2, expected / np.linalg.norm(expected), atol=1e-6)
    np.testing.assert_array_equal(g2, g)
    q3, _ = query_expansion(q, g, k=2, alpha=3)
    expected = q + 0.8**3 * g[0] + 0.6**3 * g[1]
    np.testing.assert_allclose(q3, expected / np.linalg.norm(expected), atol=1e-6)


def test_database_augmentation_by_hand():
    g = np.array([[1, 0], [0.8, 0.6], [0, 1]], dtype=np.float32)
    q = np.array([[1, 1]], dtype=np.float32)
    q2, g2 = database_augmentation(q, g, k=2, alpha=0)
    np.testing.assert_allclose(q2, q / np.sqrt(2), atol=1e-6)
    mean01 = (g[0] + g[1]) / np.linalg.norm(g[0] + g[1])
    mean12 = (g[1] + g[2]) / np.linalg.norm(g[1] + g[2])
    np.testing.assert_allclose(g2, [mean01, mean01, mean12], atol=1e-6)
    _, same = database_augmentation(q, g, k=1)
    np.testing.assert_allclose(same, g, atol=1e-6)


def test_qe_and_dba_help_on_clustered_features():
    x, labels = labelled(13, 400, 32, clusters=20, noise=1.2)
    q, g, lq, lg = x[:50], x[50:], labels[:50], labels[50:]

    def rank1(dist: np.ndarray) -> float:
        return float(np.mean(lg[dist.argmin(axis=1)] == lq))

    base = rank1(cosine_distance(q, g))
    assert rank1(postprocess(q, g, [{"dba": {"k": 3}}, {"qe": {"k": 2}}])) >= base
    assert rank1(postprocess(q, g, [{"rerank": {}}])) >= base


def test_postprocess_chain_equals_the_steps():
    x = clustered(14, 300, 16, clusters=20)
    q, g = x[:40] * 3, x[40:]  # chain normalises first
    steps = [{"dba": {"k": 5}}, {"qe": {"k": 1, "alpha": 3}}, {"rerank": {"k1": 20, "k2": 6, "lambda": 0.3}}]
    q1, g1 = database_augmentation(q, g, k=5)
    q2, g2 = query_expansion(q1, g1, k=1, alpha=3)
    np.testing.assert_allclose(postprocess(q, g, steps), k_reciprocal(q2, g2, 20, 6, 0.3), atol=1e-6)
    np.testing.assert_allclose(postprocess(q, g, steps[:2]), 1 - q2 @ g2.T, atol=1e-6)
    np.testing.assert_allclose(postprocess(q, g), cosine_distance(q, g), atol=1e-6)


@pytest.mark.parametrize("steps, message", [
    ([{"pca": {}}], r"steps\[0\]: unknown step 'pca'"),
    ([{"qe": {"k": 1}, "dba": {}}], r"steps\[0\]: expected a one-key mapping"),
    ([{"dba": {"kk": 3}}], r"steps\[0\]\.dba\.kk: not a parameter of dba \(allowed: k, alpha\)"),
    ([{"rerank": {}}, {"qe": {}}], r"steps\[0\]: 'rerank' returns distances, so it must be the last step"),
    ([{"qe": [1]}], r"steps\[0\]\.qe: expected a mapping of parameters"),
    ([{"qe": {"k": 0}}], r"k: expected an integer >= 1, got 0"),
    ([{"qe": {"k": 999}}], r"k: 999 is more than the 260 gallery features"),
])
def test_postprocess_errors(steps, message):
    x = clustered(15, 300, 8, clusters=5)
    with pytest.raises(SubmitError, match=message):
        postprocess(x[:40], x[40:], steps)


def test_chain_functions_take_queries_then_gallery():
    # submit.predict calls fn(q, g, **params) and reads parameter names after the first two.
    import inspect

    for fn in (k_reciprocal, query_expansion, database_augmentation):
        assert list(inspect.signature(fn).parameters)[:2] == ["query_feats", "gallery_feats"]
    assert reranking.__all__


# ---- PCA whitening, and the STEPS registry ------------------------------------------------------------


def whitened_by_hand(fit: np.ndarray, x: np.ndarray, dim: int, eps: float) -> np.ndarray:
    """Whitening from the SVD of the centred fitted rows: covariance eigenvalues s^2 / n, axes the rows of Vt
    (each oriented so that its largest-magnitude loading is positive), then unit rows."""
    fit = fit.astype(np.float64)
    mean = fit.mean(axis=0)
    _, s, vt = np.linalg.svd(fit - mean, full_matrices=False)
    axes = vt[:dim].T
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(dim)])
    y = (x - mean) @ axes / np.sqrt(s[:dim] ** 2 / len(fit) + eps)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.mark.parametrize("fit_on, dim", [("query+gallery", 3), ("query+gallery", None), ("train", 4)])
def test_pca_whitening_by_hand(fit_on, dim):
    rng = np.random.default_rng(19)
    q, g = rng.standard_normal((4, 5)), rng.standard_normal((7, 5))
    train = rng.standard_normal((9, 5)) * [3.0, 1.0, 0.5, 0.2, 0.1]  # unequal variances
    fit = train if fit_on == "train" else np.concatenate([q, g])
    q2, g2 = reranking.pca_whitening(q, g, dim=dim, fit_on=fit_on, eps=1e-3, train_feats=train)
    keep = dim or 5  # 11 rows in 5-d: full rank
    np.testing.assert_allclose(q2, whitened_by_hand(fit, q, keep, 1e-3), atol=1e-5)
    np.testing.assert_allclose(g2, whitened_by_hand(fit, g, keep, 1e-3), atol=1e-5)
    assert q2.dtype == np.float32 and q2.shape == (4, keep)


def test_pca_whitening_fitted_on_query_gallery_is_fitted_on_those_rows():
    x = clustered(20, 300, 16, clusters=12)
    q, g = x[:50], x[50:]
    own = reranking.pca_whitening(q, g, dim=10)
    given = reranking.pca_whitening(q, g, dim=10, fit_on="train", train_feats=x)
    for a, b in zip(own, given):
        np.testing.assert_array_equal(a, b)
    rows = reranking.pca_whitening(x, x[:1], eps=0.0)[0]  # 301 fitted rows in 16-d: all 16 components kept
    assert rows.shape == (300, 16) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-6)


def test_pca_whitening_default_dim_is_the_rank_and_train_features_come_lazily():
    rng = np.random.default_rng(21)
    q, g, train = rng.standard_normal((3, 8)), rng.standard_normal((5, 8)), rng.standard_normal((4, 8))
    calls = []

    def load():
        calls.append(1)
        return train

    q2, g2 = reranking.pca_whitening(q, g, fit_on="train", train_feats=load)
    assert q2.shape == (3, 3) and g2.shape == (5, 3) and calls == [1]  # 4 centred rows: rank 3
    reranking.pca_whitening(q, g, train_feats=load)  # fit_on query+gallery: never loaded
    assert calls == [1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(fit_on="test"), r"^fit_on: expected one of \['train', 'query\+gallery'\], got 'test'$"),
    (dict(fit_on="train"), r"^fit_on: 'train' needs the training split's features \(train_feats\)"),
    (dict(fit_on="train", train_feats=np.ones((4, 3))), r"^train_feats: feature size 3 differs from query_feats' 6$"),
    (dict(dim=20), r"^dim: 20 is more than the 6 principal components of the query\+gallery features"),
    (dict(dim=0), r"^dim: expected an integer >= 1, got 0$"),
    (dict(eps=-1.0), r"^eps: expected a number in \[0, 1\], got -1.0$"),
])
def test_pca_whitening_errors(kwargs, message):
    x = clustered(22, 30, 6, clusters=3, noise=1.0)
    with pytest.raises(SubmitError, match=message) as info:
        reranking.pca_whitening(x[:5], x[5:], **kwargs)
    assert "\n" not in str(info.value)


def test_whitening_in_the_chain_equals_the_step_and_is_fitted_on_train_features():
    x = clustered(23, 300, 16, clusters=20)
    q, g, train = x[:40], x[40:200], x[200:]
    steps = [{"whiten": {"dim": 8, "fit_on": "train"}}, {"qe": {"k": 1}}, {"rerank": {"k1": 10, "k2": 3}}]
    q1, g1 = reranking.pca_whitening(q, g, dim=8, fit_on="train", train_feats=train)
    q2, g2 = query_expansion(q1, g1, k=1)
    np.testing.assert_allclose(postprocess(q, g, steps, train_feats=train), k_reciprocal(q2, g2, 10, 3),
                               atol=1e-6)
    stages = list(reranking.run_chain(q, g, [("pca_whitening", {"dim": 8, "fit_on": "train"})], train))
    assert [s.label for s in stages] == ["+ PCA-whiten"] and stages[0].distances is None
    np.testing.assert_allclose(stages[0].query, q1, atol=1e-6)


def test_the_registry_is_the_one_list_of_steps(monkeypatch):
    """Adding a step is one function + one STEPS line: postprocess, run_chain and the error messages follow."""
    def negate(query_feats, gallery_feats, scale: float = 1.0):
        return -scale * query_feats, gallery_feats

    x = clustered(24, 60, 8, clusters=4)
    with pytest.raises(SubmitError) as info:
        postprocess(x[:10], x[10:], [{"negate": {}}])
    known = [n for name, s in reranking.STEPS.items() for n in (s.short, name)]
    assert str(info.value) == f"steps[0]: unknown step 'negate' (known: {', '.join(known)})"
    monkeypatch.setitem(reranking.STEPS, "negate", reranking.Step(negate, "neg", "negated"))
    np.testing.assert_allclose(postprocess(x[:10], x[10:], [{"neg": {"scale": 1.0}}]),
                               2 - cosine_distance(x[:10], x[10:]), atol=1e-6)
    with pytest.raises(SubmitError, match=r"^steps\[0\]\.negate\.k: not a parameter of negate \(allowed: scale\)$"):
        postprocess(x[:10], x[10:], [{"negate": {"k": 1}}])
    assert reranking.step_named("neg") == "negate" and reranking.step_named("nope") is None
    with pytest.raises(SubmitError, match=r"^steps\[0\]\.query_expansion\.kk: not a parameter of query_expansion"):
        list(reranking.run_chain(x[:10], x[10:], [("query_expansion", {"kk": 1})]))
