"""The run folder contract: what `train` writes to RUN_DIR and how everything else reads it back.

RUN_DIR holds `recipe.yaml`, `best.pt` / `last.pt` (format `FORMAT`: model, EMA, optimiser, scaler, loop state,
RNG state, history, recipe, manifest fingerprint), `metrics.csv`/`metrics.json` and `tb/`. Checkpoints are
written atomically (`save_atomic`) and read with `weights_only=True` (`load_checkpoint`). `load_trained` is the
one way to get a trained embedder back: predict, explain, ablation and export use it without importing the
trainer.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from submit import atomic, config
from submit.errors import SubmitError
from submit.recipe import Recipe

FORMAT = "reident-submit/train-v1"


def checkpoint_path(run_dir: str | Path, checkpoint: str) -> Path:
    """RUN_DIR/best.pt or last.pt, or an explicit .pt file (the one resolution of a run's checkpoint name)."""
    if checkpoint.endswith(".pt"):
        return Path(checkpoint)
    if checkpoint not in ("best", "last"):
        raise SubmitError(f"--checkpoint {checkpoint!r}: expected best, last or a .pt file")
    run = Path(run_dir)
    if not run.is_dir():
        raise SubmitError(f"{run}: not a folder (expected a training run dir with best.pt/last.pt)")
    return run / f"{checkpoint}.pt"


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through submit.atomic, so a kill never leaves a half-written checkpoint (nor a stale temp)."""
    # torch.save reports a full disk as RuntimeError ('unexpected pos ...'), not OSError: atomic_file checks
    # the free space on any failure and names the full disk anyway (`PATH: cannot write (No space left ...)`)
    with atomic.atomic_file(path, "wb") as fh:
        torch.save(obj, fh)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load a checkpoint with weights_only=True; one-line errors for a missing or foreign file.

    `mmap` maps the tensors instead of reading them: cheap when only the plain fields are needed.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmitError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise SubmitError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise SubmitError(f"{path}: not a reident-submit training checkpoint (format {FORMAT})")
    return obj


def recorded_manifest(path: str | Path) -> str | None:
    """The manifest fingerprint a checkpoint's run trained on; None for runs saved before it was recorded."""
    value = load_checkpoint(path, mmap=True).get("manifest")
    return value if isinstance(value, str) else None


def check_same_backbone(recipe_file: Path, path: Path, recorded: Recipe) -> None:
    """Refuse a checkpoint whose recorded backbone differs from the run folder's recipe.yaml (a folder mixing
    two runs would otherwise load silently with the wrong recipe's TTA and cache key, or fail on shapes)."""
    if not recipe_file.is_file():
        return
    own = config.to_mapping(config.load(Recipe, recipe_file).backbone)
    saved = config.to_mapping(recorded.backbone)
    for key in own:
        if own[key] != saved[key]:
            raise SubmitError(f"{path}: trained with backbone.{key} {saved[key]!r}, but {recipe_file} says "
                              f"{own[key]!r}; the folder mixes two runs (retrain it, or use the checkpoint's own run)")


def rng_state() -> dict:
    """The python, numpy, torch and CUDA generator states, as a checkpoint stores them (`state['rng']`)."""
    np_state: Any = np.random.get_state()  # the legacy tuple (name, keys, pos, has_gauss, cached_gaussian)
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore the generators from `rng_state()`'s dict (resume continues the exact random stream)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_trained(run_dir: str | Path, checkpoint: str = "best") -> tuple[nn.Module, Recipe]:
    """The trained embedder (EMA weights when the run used EMA) and its recipe, from RUN_DIR/<checkpoint>.pt.

    `checkpoint` is 'best', 'last' or a path to a .pt file. The backbone is built without pretrained
    weights (nothing is downloaded); the checkpoint supplies them.
    """
    from submit.backbones import build_embedder

    path = checkpoint_path(run_dir, checkpoint)
    obj = load_checkpoint(path)
    recipe = config.from_mapping(Recipe, obj["recipe"], where=str(path))
    check_same_backbone(Path(run_dir) / "recipe.yaml", path, recipe)
    embedder = build_embedder(recipe.backbone, load_weights=False)
    weights = obj.get("ema") or obj["model"]
    embedder.load_state_dict(weights)
    return embedder.eval(), recipe
