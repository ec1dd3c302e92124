"""What training reads: the manifest rows each `data.split` trains and validates on (`make_splits`), and the
pair dataset that turns the sampler's `(anchor, positive, aug_seed)` items into jointly augmented crop pairs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from submit.errors import SubmitError
from submit.recipe import AugmentSpec, DataSpec
from submit.transforms import PairAugment, letterbox, open_image


@dataclasses.dataclass
class Splits:
    """Training rows, validation query/gallery rows (None when skipped) and a note saying which."""

    train: pd.DataFrame
    query: pd.DataFrame | None
    gallery: pd.DataFrame | None
    note: str


def make_splits(df: pd.DataFrame, spec: DataSpec, seed: int) -> Splits:
    """Rows for `data.split`: train (validate on test), all (train+test, no validation) or k-fold by identity."""
    train = df[(df["split"] == "train") & (df["pid"] >= 0)]
    test = df[(df["split"] == "test") & (df["pid"] >= 0)]
    if spec.split == "train":
        query, gallery = test[test["role"] == "query"], test[test["role"] == "gallery"]
        if query.empty or gallery.empty:
            return Splits(train, None, None, "validation skipped: the manifest has no test query/gallery")
        return Splits(train, _by_id(query), _by_id(gallery), "validation on the test split")
    if spec.split == "all":
        return Splits(pd.concat([train, test]), None, None, "validation skipped: split=all trains on the test split")
    if not 0 <= spec.fold < spec.folds or spec.folds < 2:
        raise SubmitError(f"recipe: key 'data.fold': expected 0 <= fold < folds (folds >= 2), got "
                          f"fold={spec.fold} folds={spec.folds}")
    pool = pd.concat([train, test])
    ids = np.random.default_rng(seed).permutation(np.unique(pool["pid"].to_numpy()))
    held_ids = set(ids[spec.fold::spec.folds].tolist())
    held = pool["pid"].isin(held_ids)
    val = pool[held].sort_values(["pid", "seq", "frame", "path"], kind="stable")
    first = ~val.duplicated("pid")
    return Splits(pool[~held], val[first], val[~first],
                  f"validation on fold {spec.fold}/{spec.folds} ({len(held_ids)} held-out identities)")


def _by_id(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows in image-id order (the order of the official ranking file)."""
    return rows.sort_values("image_id", kind="stable")


class PairDataset(Dataset):
    """Item `(anchor, positive, aug_seed)` -> (2, 3, H, W): both crops letterboxed, jointly augmented.

    With `cache`, each crop is decoded and letterboxed once per process and kept in memory (H x W x 3
    bytes per crop); letterboxing an already letterboxed crop is an exact copy, so results are unchanged.
    """

    def __init__(self, root: str | Path, paths: Sequence[str], size_hw: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float], augment: AugmentSpec, cache: bool = False) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self.augment = PairAugment(augment, size_hw, mean, std)
        self.cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> Any:
        if self.cache is None:
            return open_image(self.root / self.paths[index])
        if index not in self.cache:
            self.cache[index] = letterbox(open_image(self.root / self.paths[index]), self.size_hw)
        return self.cache[index]

    def __getitem__(self, item: tuple[int, int, int]) -> torch.Tensor:
        anchor, positive, aug_seed = item
        images = [self._image(anchor), self._image(positive)]
        rng = torch.default_generator  # PairAugment draws from it: seed it per pair, then restore it
        saved = rng.get_state()
        rng.manual_seed(aug_seed)  # the pair's own seed: the same crops in any worker and after a resume
        try:
            a, p = self.augment(images[0], images[1])
        finally:
            rng.set_state(saved)
        return torch.stack([a, p])
