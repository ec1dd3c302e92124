"""Shared fixtures: everything is generated here (synthetic crops, tiny models); nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ZIP = REPO.parent / "shared" / "data" / "tgc_reid_data.zip"

# Two cores: keep torch from oversubscribing when several test processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_zip() -> Path:
    """The real-image zip beside the checkout; skipped with a reason on a fresh user clone."""
    if not SHARED_ZIP.is_file():
        pytest.skip(f"real-image data not found at {SHARED_ZIP} (only present in CI and dev machines)")
    return SHARED_ZIP


def prepared_players(root: Path, seed: int = 1) -> Path:
    """A prepared synthetic DATA_DIR under `root`: 30 players (18 train identities x 6 crops, 6 test ones)."""
    from submit.prepare import prepare
    from submit.synthetic import make_dataset

    make_dataset(root / "src", players=30, seqs=2, frames=3, seed=seed)
    prepare(root / "src", root / "data", progress=False)
    return root / "data"


@pytest.fixture(scope="session")
def players() -> Callable[..., Path]:
    """`prepared_players` for modules that need other players than `data_dir`'s."""
    return prepared_players


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared synthetic DATA_DIR per test module (see `prepared_players`)."""
    return prepared_players(tmp_path_factory.mktemp("data"))


@pytest.fixture()
def one_thread():
    """One torch compute thread: bitwise-reproducible CPU runs, no oversubscription of two shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
