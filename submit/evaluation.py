"""Score a ranking file against a prepared data dir's manifest, as the official scorer would.

The file's ids decide the split (test or challenge) unless one is given. Rows and columns are matched
to manifest queries / gallery by position after both are sorted by image_id (stable): test ids are pids
and repeat, so ids alone cannot say which gallery image a column is, but repeated ids share one pid.
A challenge file has no ground truth: it is validated and reported as not scorable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from submit import ranking_file
from submit.errors import SubmitError
from submit.manifest import read_manifest, select
from submit.metrics import evaluate_distances
from submit.ranking_file import RANKED_SPLITS, id_mismatch, read_ranking


def evaluate_file(path: str | Path, data_dir: str | Path, split: str | None = None) -> dict:
    """Validate a ranking file against the manifest and score it if its split has ground truth.

    Returns file, split, num_queries, num_gallery, scored, message, and when scored the metrics of
    `evaluate_distances` plus queries_without_match and unmatched_query_ids (skipped, as officially).
    """
    path = Path(path)
    manifest = read_manifest(data_dir)
    ranked = _ranked_splits(manifest)
    if split and split not in ranked:
        raise SubmitError(f"{path}: the manifest in {data_dir} has no {split} query and gallery images "
                          f"(it has: {', '.join(ranked) or 'neither test nor challenge'})")
    if not ranked:
        raise SubmitError(f"{path}: the manifest has no test or challenge query/gallery images to compare with")
    # bounded by the largest file this data's split (or its largest split) can have: refused before reading
    dist, q_ids, g_ids = read_ranking(path, limit=ranking_file.manifest_size_limit(manifest, split))
    split = split or detect_split(path, manifest, q_ids, g_ids)
    queries, gallery = select(manifest, split, "query"), select(manifest, split, "gallery")
    for kind, found, rows in (("query", q_ids, queries), ("gallery", g_ids, gallery)):
        problem = id_mismatch(kind, found, rows["image_id"])
        if problem:
            raise SubmitError(f"{path}: {problem} (split {split!r})")
    result: dict = {"file": str(path), "split": split, "num_queries": int(q_ids.size),
                    "num_gallery": int(g_ids.size), "warnings": degenerate_warnings(dist)}
    q_pids, g_pids = queries["pid"].to_numpy(), gallery["pid"].to_numpy()
    if (q_pids < 0).all() or (g_pids < 0).all():
        result.update(scored=False, message=(
            f"{path}: valid {split} ranking file ({q_ids.size} queries x {g_ids.size} gallery); the {split} "
            f"split has no ground-truth identities, so it cannot be scored here"))
        return result
    _check_unambiguous(queries, split, "query")
    _check_unambiguous(gallery, split, "gallery")
    return _score(path, result, dist, queries, q_pids, g_pids)


def detect_split(path: Path, manifest: pd.DataFrame, q_ids: np.ndarray, g_ids: np.ndarray) -> str:
    """The ranked split of the file (`ranking_file.detect_split`); explain when it fits none exactly."""
    match = ranking_file.detect_split(manifest, q_ids, g_ids)
    if not match.sizes:
        raise SubmitError(f"{path}: the manifest has no test or challenge query/gallery images to compare with")
    if match.ambiguous:
        raise SubmitError(f"{path}: ids match both the test and the challenge split; pass --split")
    if match.exact and match.split:
        return match.split
    if match.split:
        raise SubmitError(f"{path}: looks like a {match.split} file but {match.problem}")
    shapes = ", ".join(f"{s} {q} x {g}" for s, (q, g) in match.sizes.items())
    raise SubmitError(f"{path}: {q_ids.size} queries x {g_ids.size} gallery matches no split of the manifest "
                      f"({shapes})")


def _ranked_splits(manifest: pd.DataFrame) -> list[str]:
    """The test/challenge splits that have both query and gallery rows."""
    return [s for s in RANKED_SPLITS
            if ((manifest["split"] == s) & (manifest["role"] == "query")).any()
            and ((manifest["split"] == s) & (manifest["role"] == "gallery")).any()]


def _check_unambiguous(rows: pd.DataFrame, split: str, role: str) -> None:
    """Repeated image_ids are only safe when they share a pid (position decides which image is which)."""
    pids_per_id = rows.groupby("image_id")["pid"].nunique()
    if (pids_per_id > 1).any():
        image_id = int(pids_per_id.idxmax())
        pids = sorted(rows.loc[rows["image_id"] == image_id, "pid"].unique().tolist())
        raise SubmitError(f"manifest: {split}/{role} image_id {image_id} is shared by different pids {pids}; "
                          f"a ranking file cannot tell those images apart")


def _score(path: Path, result: dict, dist: np.ndarray, queries: pd.DataFrame, q_pids: np.ndarray,
           g_pids: np.ndarray) -> dict:
    """Official metrics; unknown pids (-1) never match, queries without a match are skipped and counted."""
    q_eff = np.where(q_pids < 0, -1 - np.arange(q_pids.size), q_pids)  # distinct negatives: no match
    g_eff = np.where(g_pids < 0, -1 - q_pids.size - np.arange(g_pids.size), g_pids)
    unmatched = ~np.isin(q_eff, g_eff)
    if unmatched.all():
        raise SubmitError(f"{path}: none of the {q_pids.size} {result['split']} queries has a match in the "
                          f"gallery; nothing to score")
    result.update(evaluate_distances(dist, q_eff, g_eff))
    ids = queries["image_id"].to_numpy()[unmatched]
    result.update(scored=True, queries_without_match=int(unmatched.sum()),
                  unmatched_query_ids=[int(i) for i in ids],
                  message=f"{path}: scored {result['num_valid_queries']} of {q_pids.size} {result['split']} queries")
    return result


def degenerate_warnings(dist: np.ndarray) -> list[str]:
    """Warnings for distances that rank nothing: one value everywhere, or queries whose row is constant."""
    if dist.size and np.ptp(dist) == 0:
        return [f"warning: every distance in the file is {dist.flat[0]:g}: it ranks the gallery in file order, "
                "so its score says nothing about a model (a failed prediction?)"]
    flat = np.ptp(dist, axis=1) == 0 if dist.shape[1] > 1 else np.zeros(dist.shape[0], bool)
    if flat.any():
        return [f"warning: {int(flat.sum())} of {dist.shape[0]} queries have the same distance to every gallery "
                "image (rows ranked in file order)"]
    return []


def all_warnings(result: dict) -> list[str]:
    """Every warning about a result, for the CLI to print on stderr: degenerate distances, unmatched queries."""
    unmatched = unmatched_warning(result)
    return [*result.get("warnings", []), *([unmatched] if unmatched else [])]


def unmatched_warning(result: dict) -> str | None:
    """The user-facing warning about queries without a match in the gallery, or None."""
    n = result.get("queries_without_match", 0)
    if not n:
        return None
    ids = result["unmatched_query_ids"]
    shown = ", ".join(str(i) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
    return (f"warning: {n} of {result['num_queries']} queries have no match in the gallery (query ids {shown}); "
            f"they are skipped in mAP, CMC and mINP, as the official scorer does")
