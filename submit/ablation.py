"""Helpers shared by the ablation notebooks (`notebooks/*.py`): data, cached runs and features, scores, outputs.

Each notebook answers one question on the test split of a prepared DATA_DIR (default: a synthetic demo data
set built once under WORK_DIR). Everything expensive is cached under WORK_DIR, so a re-run is cheap:
- runs: `WORK_DIR/runs/<recipe name>-<hash>`; the hash pins the resolved recipe and the manifest's
  fingerprint, so notebooks asking for the same recipe on the same data share one run. A run is trained
  only when its folder lacks `best.pt` (training goes to a temp folder renamed into place when done).
- features: `WORK_DIR/features/<key>.npy`, keyed like `embedding`'s cache (weights hash, backbone spec,
  TTA views, manifest rows).
- outputs: `WORK_DIR/results/<notebook>.csv` (the table) and `<notebook>.png` (the plot).
Scores are percentages (mAP, rank1, rank5, rank10, mINP, as `metrics.evaluate_distances` x 100).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from submit import atomic, bundled, config, embedding
from submit.backbones import build_embedder
from submit.errors import SubmitError
from submit.manifest import fingerprint, manifest_path, read_manifest, select
from submit.metrics import METRIC_KEYS, evaluate_distances
from submit.predict import pretrained_identity
from submit.prepare import prepare
from submit.recipe import Recipe, TTASpec, apply_overrides, load_recipe
from submit.reranking import cosine_distance
from submit.run_folder import checkpoint_path
from submit.synthetic import make_dataset
from submit.trained import load_trained
from submit.training import train

REPO = Path(__file__).resolve().parents[1]
HIST_BINS = (8, 4, 4)  # hue, saturation, value bins of the colour-histogram baseline
HIST_STRIPES = 3  # horizontal body stripes (head/torso, shorts, legs), one histogram each


@dataclass(frozen=True)
class Budget:
    """How big the notebooks' experiments are: the base recipe, its overrides and the demo data's size."""

    recipe: str  # a file in the repo's models/ folder
    overrides: tuple[str, ...] = ()
    players: int = 150  # synthetic demo data (used when no DATA_DIR is given)
    seqs: int = 2
    frames: int = 5


BUDGETS = {
    # tiny random ViT at 32x32, one epoch on ~100 crops: every notebook runs in seconds on 2 CPU cores
    "ci": Budget("tiny-test.yaml", ("train.epochs=1",), players=30, seqs=2, frames=3),
    # the real from-scratch CPU recipe (minutes per run on 2 cores), on a larger demo set
    "full": Budget("cpu-small.yaml", (), players=150, seqs=2, frames=5),
    # the pre-trained CPU recipe (ImageNet MobileNetV2, `reident-submit weights fetch mobilenetv2-imagenet`)
    "pretrained": Budget("cpu-pretrained.yaml", (), players=150, seqs=2, frames=5),
}


def budget(name: str) -> Budget:
    """The named budget, or a one-line error listing the known ones."""
    if name not in BUDGETS:
        raise SubmitError(f"BUDGET {name!r}: expected one of {sorted(BUDGETS)}")
    return BUDGETS[name]


def setup(work_dir: str | Path | None = None, threads: int | None = None) -> Path:
    """Notebook start: cap torch at `threads` (None: torch's default); return WORK_DIR (None: <repo>/runs/notebooks)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out = Path(work_dir).expanduser() if work_dir is not None else REPO / "runs" / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---- data -------------------------------------------------------------------------------------------


def data_dir(given: str | Path | None, work_dir: str | Path, budget_name: str) -> Path:
    """The prepared DATA_DIR to analyse: `given`, or the synthetic demo data built once under WORK_DIR."""
    if given is not None:
        path = Path(given).expanduser()
        if not manifest_path(path).is_file():
            raise SubmitError(f"DATA_DIR {path}: no manifest.csv; run `reident-submit prepare SOURCE --out {path}`")
        return path
    b = budget(budget_name)
    out = Path(work_dir) / f"demo-data-{b.players}x{b.seqs}x{b.frames}"
    if not manifest_path(out).is_file():
        _build_demo(out, b)
    return out


def _build_demo(out: Path, b: Budget, seed: int = 0) -> None:
    """Synthetic crops in the official layout, prepared into `out` (atomic: prepare swaps a temp dir in)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".demo-src-") as tmp:
        src = make_dataset(Path(tmp) / "src", players=b.players, seqs=b.seqs, frames=b.frames, seed=seed)
        try:
            prepare(src, out, progress=False)
        except SubmitError:
            if not (out / "manifest.csv").is_file():  # not just another process finishing first
                raise


def pretrained_weights(budget_name: str, work_dir: str | Path, progress: bool = True) -> str:
    """The `backbone.pretrained` value of the pre-trained vs scratch comparison for a budget.

    A budget whose recipe names weights uses them (`pretrained`: ImageNet MobileNetV2). The others have
    none to download, so they get a stand-in: the budget's recipe trained on OTHER synthetic players (demo
    data of another seed, no identity shared with the data analysed), as a tower pre-trained elsewhere."""
    base = recipe(budget_name)
    if base.backbone.pretrained:
        return base.backbone.pretrained
    b = budget(budget_name)
    other = Path(work_dir) / f"pretrain-data-{b.players}x{b.seqs}x{b.frames}-seed1"
    if not manifest_path(other).is_file():
        _build_demo(other, b, seed=1)
    return str(ensure_run(base, other, work_dir, progress) / "last.pt")


def zero_shot(rec: Recipe, data: str | Path, query: pd.DataFrame, gallery: pd.DataFrame,
              work_dir: str | Path) -> dict[str, float]:
    """Scores of `rec`'s pre-trained tower without any fine-tuning (the paper's zero-shot baseline)."""
    rows = pd.concat([query, gallery], ignore_index=True)
    identity = pretrained_identity(rec.backbone)
    path = Path(work_dir) / "features" / f"{embedding.cache_key(identity, rec.tta, rows)}.npy"
    feats = _load_npy(path, len(rows))
    if feats is None:
        feats = embedding.embed(lambda: build_embedder(rec.backbone), data, rows, rec.tta, workers=0,
                                precision=rec.train.precision, progress=False)
        _save_npy(path, feats)
    return score(cosine(feats[:len(query)], feats[len(query):]), query, gallery)


def split_rows(data: str | Path, split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Query and gallery manifest rows of `split` (ranking-file order); queries need identities to score."""
    manifest = read_manifest(data)
    query, gallery = select(manifest, split, "query"), select(manifest, split, "gallery")
    if (query["pid"] < 0).all():
        raise SubmitError(f"{data}: the {split} split has no identities to score; use the test split")
    return query, gallery


# ---- recipes and runs -------------------------------------------------------------------------------


def recipe(budget_name: str, overrides: Sequence[str] = ()) -> Recipe:
    """The budget's base recipe with the budget's and then the caller's `a.b=value` overrides."""
    b = budget(budget_name)
    base = load_recipe(bundled.MODELS / b.recipe)
    return apply_overrides(base, [*b.overrides, *overrides], where="ablation overrides")


def run_dir(rec: Recipe, data: str | Path, work_dir: str | Path) -> Path:
    """Where the run of `rec` on `data` lives: named by the recipe and a hash of (recipe, manifest)."""
    text = json.dumps({"recipe": config.to_mapping(rec), "data": fingerprint(read_manifest(data))}, sort_keys=True)
    return Path(work_dir) / "runs" / f"{rec.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def ensure_run(rec: Recipe, data: str | Path, work_dir: str | Path, progress: bool = True) -> Path:
    """The run dir of `rec`, trained now only if it has no `best.pt` yet (a finished run is reused)."""
    final = run_dir(rec, data, work_dir)
    if (final / "best.pt").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        train(rec, data, tmp / "run", progress=progress)
        shutil.rmtree(final, ignore_errors=True)  # a half-finished folder without best.pt
        try:
            os.replace(tmp / "run", final)
        except OSError:
            if not (final / "best.pt").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def variant_run(variant: Mapping[str, Any], budget_name: str, data: str | Path, work_dir: str | Path,
                progress: bool = True) -> Path:
    """The (trained or reused) run of the budget's base recipe with `variant`'s `key: value` overrides."""
    rec = recipe(budget_name, [f"{k}={json.dumps(v)}" for k, v in variant.items()])
    return ensure_run(rec, data, work_dir, progress)


def variant_name(variant: Mapping[str, Any]) -> str:
    """A short label for a variant: `loss=triplet, backbone=timm:resnet34` (`base` when nothing is overridden)."""
    def short(key: str) -> str:
        parts = key.split(".")
        return parts[0] if parts[-1] == "name" else parts[-1]
    return ", ".join(f"{short(k)}={v}" for k, v in variant.items()) or "base"


def score_runs(variants: Sequence[Mapping[str, Any]], budget_name: str, data: str | Path, work_dir: str | Path,
               query: pd.DataFrame, gallery: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """Train (or reuse) one run per variant (`{"train.loss": "triplet", ...}` recipe overrides) and score it.

    One row per variant: the override values (one column per key), cosine-distance scores of the best
    checkpoint on query x gallery, training cost (steps, seconds, images/s) and the run folder's name.
    """
    rows = []
    for variant in variants:
        run = variant_run(variant, budget_name, data, work_dir, progress)
        q, g = split_features(run, data, query, gallery, work_dir)
        rows.append({**variant, **score(cosine(q, g), query, gallery), **run_summary(run), "run": run.name})
    return pd.DataFrame(rows)


def run_history(run: str | Path) -> pd.DataFrame:
    """The run's per-epoch metrics.csv (loss, lr, temperature, images_per_s, seconds, mAP, ...)."""
    return pd.read_csv(Path(run) / "metrics.csv")


def run_summary(run: str | Path) -> dict[str, float]:
    """Training cost of a run: optimizer steps, total seconds and mean images/s over its epochs."""
    h = run_history(run)
    return {"steps": int(h["step"].iloc[-1]), "train_s": round(float(h["seconds"].sum()), 2),
            "images_per_s": round(float(h["images_per_s"].mean()), 1)}


# ---- features and scores ----------------------------------------------------------------------------


def features(run: str | Path, data: str | Path, rows: pd.DataFrame, work_dir: str | Path,
             tta: TTASpec | None = None, checkpoint: str = "best") -> np.ndarray:
    """(N, D) unit TTA features of `rows` from a run's checkpoint (default TTA: the run's recipe), cached."""
    rec = load_recipe(Path(run) / "recipe.yaml")
    tta = tta or rec.tta
    identity = embedding.checkpoint_identity(checkpoint_path(run, checkpoint), rec.backbone)
    path = Path(work_dir) / "features" / f"{embedding.cache_key(identity, tta, rows)}.npy"
    cached = _load_npy(path, len(rows))
    if cached is not None:
        return cached
    feats = embedding.embed(lambda: load_trained(run, checkpoint)[0], data, rows, tta, workers=0,
                            precision=rec.train.precision, progress=False)
    _save_npy(path, feats)
    return feats


def split_features(run: str | Path, data: str | Path, query: pd.DataFrame, gallery: pd.DataFrame,
                   work_dir: str | Path, tta: TTASpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery features of a run (one cached embedding pass over both)."""
    rows = pd.concat([query, gallery], ignore_index=True)
    feats = features(run, data, rows, work_dir, tta)
    return feats[:len(query)], feats[len(query):]


cosine = cosine_distance  # (Q, G) float32 cosine distances; the notebooks' name for the one in submit.reranking


def score(dist: np.ndarray, query: pd.DataFrame, gallery: pd.DataFrame) -> dict[str, float]:
    """mAP, rank-1/5/10 and mINP in percent for distances between query and gallery rows."""
    result = evaluate_distances(dist, query["pid"].to_numpy(), gallery["pid"].to_numpy())
    return {k: round(100.0 * float(result[k]), 2) for k in METRIC_KEYS}


def noisy_oracle(truth: np.ndarray, noise: float, flagged: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A simulated shirt-number reader: the truth with a `noise` share of crops read as another number.

    Probabilities are 1.0, except that corrupted crops get 0.3 when `flagged` (a calibrated reader that
    knows when it is unsure); otherwise it is confidently wrong. Crops without a true number (< 0, e.g.
    `jersey.match_truth`'s -2) are read as "none" (-1) with probability 0. Deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    truth = np.asarray(truth, dtype=np.int64)
    known = truth >= 0
    numbers, probs = np.where(known, truth, -1), known.astype(np.float64)
    bad = known & (rng.random(len(truth)) < noise)
    numbers[bad] = (truth[bad] + rng.integers(1, 100, size=int(bad.sum()))) % 100
    if flagged:
        probs[bad] = 0.3
    return numbers, probs


# ---- outputs ----------------------------------------------------------------------------------------


def results_dir(work_dir: str | Path) -> Path:
    """WORK_DIR/results, created on first use."""
    out = Path(work_dir) / "results"
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_table(df: pd.DataFrame, work_dir: str | Path, name: str) -> Path:
    """Write the notebook's table to WORK_DIR/results/<name>.csv atomically; returns the path."""
    path = results_dir(work_dir) / f"{name}.csv"
    with _atomic(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    """An Agg-backed matplotlib Figure (no pyplot state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def save_plot(fig: Any, work_dir: str | Path, name: str) -> Path:
    """Write the figure to WORK_DIR/results/<name>.png atomically and display it (in a notebook)."""
    from IPython.display import Image, display

    path = results_dir(work_dir) / f"{name}.png"
    with _atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    display(Image(filename=str(path)))
    return path


def dot_plot(ax: Any, df: pd.DataFrame, label: str, metrics: Sequence[str] = ("mAP", "rank1"),
             title: str = "") -> None:
    """One row per table row (named by column `label`), one marker per metric; the x-axis zooms to the data."""
    y = np.arange(len(df))
    for marker, m in zip("os^Dv", metrics):
        ax.scatter(df[m].to_numpy(), y, marker=marker, label=m, zorder=3)
    ax.set_yticks(y, df[label].astype(str).tolist())
    ax.set_ylim(len(df) - 0.5, -0.5)
    ax.grid(axis="both", alpha=0.3)
    values = df[list(metrics)].to_numpy(dtype=float)
    low, high = np.nanmin(values), np.nanmax(values)
    pad = max(1.0, 0.08 * (high - low))
    ax.set_xlim(max(0.0, low - pad), min(100.0 + pad, high + pad))
    ax.set_xlabel("%")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(metrics), frameon=False)
    ax.set_title(title)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temp path beside `path`, renamed over it when the block succeeds (removed otherwise): submit.atomic."""
    with atomic.atomic_path(path) as tmp:
        yield tmp


def _load_npy(path: Path, n: int) -> np.ndarray | None:
    """Cached float32 (n, D) features, or None when missing or unusable (then they are recomputed)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.ndim == 2 and arr.shape[0] == n and arr.dtype == np.float32 else None


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)


# ---- a baseline with no learning at all ---------------------------------------------------------------------


def colour_histogram(path: Path) -> np.ndarray:
    """The measured-in-the-same-run reference: joint HSV histograms of horizontal stripes of a crop,
    square-rooted (Hellinger) and L2-normalised, so 1 - dot is a distance. No learning at all."""
    hsv = np.asarray(Image.open(path).convert("RGB").convert("HSV"), dtype=np.int64)
    scale = np.array([256 // b for b in HIST_BINS])
    code = ((hsv // scale) * np.array([HIST_BINS[1] * HIST_BINS[2], HIST_BINS[2], 1])).sum(axis=2)
    size = int(np.prod(HIST_BINS))
    parts = [np.bincount(stripe.ravel(), minlength=size) for stripe in np.array_split(code, HIST_STRIPES, axis=0)]
    feat = np.sqrt(np.concatenate(parts) / max(1, code.size))
    return feat / np.linalg.norm(feat)


def histogram_scores(data_dir: str | Path) -> dict:
    """Test-split metrics of the colour-histogram baseline (a few seconds for 305 crops)."""
    manifest = read_manifest(data_dir)
    query, gallery = select(manifest, "test", "query"), select(manifest, "test", "gallery")
    q = np.stack([colour_histogram(Path(data_dir) / p) for p in query["path"]])
    g = np.stack([colour_histogram(Path(data_dir) / p) for p in gallery["path"]])
    return evaluate_distances(1.0 - q @ g.T, query["pid"].to_numpy(), gallery["pid"].to_numpy())
