"""The run folder contract: what `train` writes to RUN_DIR and how everything else reads it back.

RUN_DIR holds `recipe.yaml`, `best.pt` / `last.pt` (format `FORMAT`: model, EMA, optimiser, scaler, loop state,
RNG state, history, recipe, manifest fingerprint), `metrics.csv`/`metrics.json` and `tb/`. Checkpoints are
written atomically (`save_atomic`) and read with `weights_only=True` (`load_checkpoint`). `TrainState` is the
loop's state as a checkpoint stores it, `check_resumable` what a resume must share with the run (and the
accumulation that keeps its global batch on another number of processes), `write_metrics` and `write_recipe` the
plain files. It reads and writes files only: building the trained embedder from a run
folder is `trained.load_trained`, a layer above the model factory.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from submit import atomic, config
from submit.errors import SubmitError
from submit.metrics import METRIC_KEYS
from submit.recipe import Recipe

FORMAT = "reident-submit/train-v1"
RESUME_MAY_CHANGE = ("train.epochs", "train.checkpoint_every", "data.workers", "data.cache_images")
CSV_COLUMNS = ("epoch", "step", "loss", "lr", "temperature", "images_per_s", "seconds", *METRIC_KEYS)


@dataclasses.dataclass
class TrainState:
    """Everything the training loop mutates besides the model and optimiser, saved as it is in `last.pt`.

    A checkpoint holds the fields under `state` and the history at its top level (where `runs` reads it); adding
    a field is this one line (a checkpoint saved before it existed resumes with the default).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    best_map: float = -1.0
    history: list[dict] = dataclasses.field(default_factory=list)

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint entries: `state` (every field but the history) and `history`."""
        scalars = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "history"}
        return {"state": scalars, "history": self.history}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        """The state `to_checkpoint` saved (fields the checkpoint lacks keep their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"history"}
        saved = {k: v for k, v in ckpt["state"].items() if k in names}
        return cls(**saved, history=list(ckpt["history"]))


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


def check_resumable(ckpt: dict, path: Path, recipe: Recipe, manifest: str, data_dir: Path, world_size: int) -> int:
    """Refuse to continue `ckpt` with another recipe, other data or another global batch (one line naming it);
    returns the accumulation steps that keep the run's global batch on `world_size` processes.

    A run of P processes x accumulation A resumes on P' processes with accumulation P x A / P' when that is a
    whole number (the sampler's global batches depend only on their size, so the pairs of every step are the
    same), and is refused otherwise. A is what the run last trained with (`resumed_layout`), not the recipe's."""
    _check_same_recipe(ckpt["recipe"], recipe, path)
    _check_same_manifest(ckpt.get("manifest"), manifest, path, data_dir)
    saved_pairs = ckpt["sampler"]["global_pairs"]
    processes, accum = resumed_layout(ckpt)
    if processes * accum % world_size:
        raise SubmitError(f"{path}: trained with global batch {saved_pairs} pairs on {processes} processes x accum "
                          f"{accum}; {world_size} processes cannot keep it ({processes} x {accum} / {world_size} is "
                          "not a whole number)")
    accum_now = processes * accum // world_size
    global_pairs = recipe.train.pairs_per_batch * world_size * accum_now
    if saved_pairs != global_pairs:
        raise SubmitError(f"{path}: the run used a global batch of {saved_pairs} pairs, this launch gives "
                          f"{global_pairs} (pairs_per_batch x processes x accum_steps); resume "
                          "with the same number of processes")
    return accum_now


def resumed_layout(ckpt: dict) -> tuple[int, int]:
    """(processes, accumulation steps) a checkpoint was saved with; before they were recorded, 1 process (or the
    checkpoint's `world_size`) and the recipe's `train.accum_steps`."""
    accum = ckpt["sampler"].get("accum_steps", ckpt["recipe"]["train"]["accum_steps"])
    return int(ckpt.get("world_size", 1)), int(accum)


def _check_same_recipe(saved: dict, recipe: Recipe, path: Path) -> None:
    """Resuming with a different recipe would silently mix runs: name the first differing key."""
    now = config.to_mapping(recipe)
    for key, (a, b) in _flat_diff(saved, now).items():
        if key not in RESUME_MAY_CHANGE and not key.startswith("tta."):
            raise SubmitError(f"{path}: the run was trained with {key}={a!r}, the recipe now says {b!r}; "
                              "resume with the run's recipe.yaml")


def _check_same_manifest(saved: str | None, now: str, path: Path, data_dir: Path) -> None:
    """Resuming on other data would silently mix runs; a run saved before fingerprints were recorded passes."""
    if saved is not None and saved != now:
        raise SubmitError(f"{path.parent}: the run was trained on manifest {saved[:12]}, {data_dir}/manifest.csv "
                          f"is {now[:12]}; resume with the run's data or train into another --out")


def _flat_diff(a: Any, b: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested mappings (tuples compared as lists)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for k in sorted(set(a) | set(b)):
            out.update(_flat_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k))
        return out
    a = list(a) if isinstance(a, tuple) else a
    b = list(b) if isinstance(b, tuple) else b
    return {} if a == b else {prefix: (a, b)}


def write_metrics(out_dir: Path, history: list[dict], meta: dict) -> None:
    """metrics.csv (one row per validated epoch) and metrics.json (history, best, notes), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    scored = [r for r in history if r.get("mAP") is not None]
    best = max(scored, key=lambda r: r["mAP"]) if scored else None
    for name, text in (("metrics.csv", buf.getvalue()),
                       ("metrics.json", json.dumps({**meta, "best": best, "history": history}, indent=2))):
        atomic.write_text(out_dir / name, text)


def write_recipe(out_dir: Path, recipe: Recipe) -> None:
    """RUN_DIR/recipe.yaml: the resolved recipe (after `--set` overrides), plain YAML, atomically."""
    atomic.write_text(out_dir / "recipe.yaml", yaml.safe_dump(config.to_mapping(recipe), sort_keys=False))


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
