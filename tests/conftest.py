"""Shared fixtures: everything is generated here (synthetic crops, tiny models); nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

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
