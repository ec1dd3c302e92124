"""Zero-shot shirt numbers with CLIP, and a ranking step that uses them.

Reading: each crop is scored against 101 classes (numbers 0-99 and "none") by CLIP text prompts. Each
class's prompts (a small ensemble, "a photo of a basketball player wearing number {n}", ...) are embedded,
L2-normalised, averaged and renormalised; the text matrix (101, D) is computed ONCE per model and prompt
set (kept in memory per model object and, when the weights have a stable identity, on disk). Crops are
letterboxed to the model's input size with its own mean/std and encoded in batches; probabilities are
softmax(exp(logit_scale) * cos(image, class)).

Ranking: `number_agreement` lowers the distance of query/gallery pairs whose confident numbers agree and
raises it where confident numbers differ; pairs where either side is unconfident (or read as "none")
are left alone. `apply_jersey` is the ensemble post-processing entry point (`{"jersey": {...}}`).

Ground truth (`numbers.csv`, `path,number`) may use paths relative to `data_reid/` (the synthetic
generator, and `prepare` copies it into DATA_DIR) while the manifest's are relative to DATA_DIR
(`images/...`): a manifest path matches the truth path that equals its longest trailing path suffix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch.utils.data import DataLoader

from submit import atomic, config
from submit.backbones import load_clip
from submit.device import autocast, check_device, pick_device
from submit.embedding import file_hash
from submit.ensembling import JerseySpec, check_number_source  # the spec's `jersey:` block, torch-free
from submit.errors import SubmitError, loader_errors
from submit.manifest import read_csv, read_manifest, select
from submit.progress import progress_bar
from submit.reranking import NO_NUMBER, number_agreement  # noqa: F401 - number_agreement: jersey's old name
from submit.transforms import CropDataset

NONE = NO_NUMBER  # the "no readable number" class
CLASSES: tuple[int, ...] = (*range(100), NONE)
NUMBER_PROMPTS: tuple[str, ...] = (
    "a photo of a basketball player wearing number {n}.",
    "a player with the number {n} on the jersey.",
    "a basketball jersey with the number {n} on it.",
    "a cropped photo of player number {n}.",
    "the number {n} printed on a sports shirt.",
)
NONE_PROMPTS: tuple[str, ...] = (
    "a photo of a basketball player whose shirt number is not visible.",
    "a player seen from the side with no number visible.",
    "a photo of a referee.",
    "a blurry photo of a person on a basketball court.",
)
OUT_COLUMNS = ["path", "image_id", "number", "prob", "top5"]
_TEXT_MEMO: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------- text side


def class_prompts(number_prompts: Sequence[str] = NUMBER_PROMPTS,
                  none_prompts: Sequence[str] = NONE_PROMPTS) -> list[list[str]]:
    """The prompt texts of each class in `CLASSES` order (numbers 0-99, then "none")."""
    if not number_prompts or not none_prompts or any("{n}" not in p for p in number_prompts):
        raise SubmitError("prompts: need >= 1 number prompt (each containing '{n}') and >= 1 'none' prompt")
    return [[p.format(n=n) for p in number_prompts] for n in range(100)] + [list(none_prompts)]


def prompts_key(number_prompts: Sequence[str] = NUMBER_PROMPTS, none_prompts: Sequence[str] = NONE_PROMPTS) -> str:
    """A short hash of a prompt set (part of every cache key)."""
    text = json.dumps([list(number_prompts), list(none_prompts)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def text_matrix(clip_model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor],
                number_prompts: Sequence[str] = NUMBER_PROMPTS, none_prompts: Sequence[str] = NONE_PROMPTS,
                cache_file: str | Path | None = None, device: str | torch.device | None = None,
                batch_size: int = 256) -> torch.Tensor:
    """(101, D) unit class embeddings: per class the mean of L2-normalised prompt embeddings, renormalised.

    Encoded once per (model object, prompt set); `cache_file` (.npy) also keeps it across processes and
    should only be given when the weights have a stable identity (a pretrained tag or file).
    """
    key = prompts_key(number_prompts, none_prompts)
    memo = _TEXT_MEMO.setdefault(clip_model, {})
    if key in memo:
        return memo[key]
    texts = class_prompts(number_prompts, none_prompts)
    mat = _load_text_cache(cache_file, len(texts))
    if mat is None:
        mat = _encode_classes(clip_model, tokenizer, texts, pick_device(_dev_str(device)), batch_size)
        if cache_file is not None:
            _save_npy(Path(cache_file), mat.numpy())
    memo[key] = mat
    return mat


def _encode_classes(clip_model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor],
                    texts: list[list[str]], dev: torch.device, batch_size: int) -> torch.Tensor:
    """Encode every prompt of every class in batches; average per class on the unit sphere."""
    flat = [t for group in texts for t in group]
    clip_model.eval().to(dev)
    parts = []
    with torch.inference_mode():
        for start in range(0, len(flat), batch_size):
            tokens = tokenizer(flat[start:start + batch_size]).to(dev)
            with autocast(dev):
                parts.append(F.normalize(clip_model.encode_text(tokens).float(), dim=-1).cpu())
    emb = torch.cat(parts)
    out, start = [], 0
    for group in texts:
        out.append(emb[start:start + len(group)].mean(0))
        start += len(group)
    return F.normalize(torch.stack(out), dim=-1)


def _load_text_cache(path: str | Path | None, n_classes: int) -> torch.Tensor | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.ndim != 2 or arr.shape[0] != n_classes:
        return None
    return torch.from_numpy(arr.astype(np.float32))


# ---------------------------------------------------------------- image side


def model_geometry(clip_model: torch.nn.Module) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """(input size (H, W), mean, std) of an open_clip model's image tower."""
    from open_clip import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(clip_model)
    size = cfg.get("size", clip_model.visual.image_size)
    size_hw = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
    return size_hw, tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def read_numbers(clip_model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], data_dir: str | Path,
                 paths: Sequence[str], batch_size: int = 64, device: str | torch.device | None = None,
                 workers: int = 0, text_cache: str | Path | None = None, progress: bool = True,
                 number_prompts: Sequence[str] = NUMBER_PROMPTS,
                 none_prompts: Sequence[str] = NONE_PROMPTS) -> np.ndarray:
    """(N, 101) class probabilities (columns in `CLASSES` order) for crops at `paths` under `data_dir`."""
    dev = pick_device(_dev_str(device))
    classes = text_matrix(clip_model, tokenizer, number_prompts, none_prompts, text_cache, dev).to(dev)
    size_hw, mean, std = model_geometry(clip_model)
    loader = DataLoader(CropDataset(data_dir, list(paths), size_hw, mean, std), batch_size=batch_size,
                        shuffle=False, num_workers=workers)
    scale = float(clip_model.logit_scale.detach().float().exp())
    out = np.zeros((len(paths), len(CLASSES)), dtype=np.float32)
    clip_model.eval().to(dev)
    with loader_errors(), torch.inference_mode(), _bar(progress) as bar:
        task = bar.add_task("shirt numbers", total=len(paths))
        for images, index in loader:
            with autocast(dev):
                feats = clip_model.encode_image(images.to(dev))
            logits = scale * F.normalize(feats.float(), dim=-1) @ classes.T
            out[index.numpy()] = torch.softmax(logits, dim=-1).cpu().numpy()
            bar.advance(task, len(index))
    return out


def predictions(rows: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """Per crop: the most likely number (-1 = none), its probability and the top-5 numbers (space-separated)."""
    classes = np.asarray(CLASSES)
    top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    best = top5[:, 0]
    return pd.DataFrame({
        "path": rows["path"].to_numpy(),
        "image_id": rows["image_id"].to_numpy() if "image_id" in rows else np.arange(len(rows)),
        "number": classes[best],
        "prob": probs[np.arange(len(probs)), best].round(6),
        "top5": [" ".join(str(int(c)) for c in classes[t]) for t in top5],
    })


# ---------------------------------------------------------------- ground truth and accuracy


@dataclass(frozen=True)
class NumberScore:
    """Accuracy of shirt-number predictions against ground truth."""

    n: int  # crops with ground truth
    accuracy: float
    top5: float
    none_rate: float  # fraction predicted "none"
    confusions: list[tuple[int, int, int]]  # (true, predicted, count), most common first


def read_truth(path: str | Path) -> dict[str, int]:
    """A `path,number` CSV -> {posix path: number}, with one-line errors naming the file."""
    path = Path(path)
    df = read_csv(path, missing="ground-truth numbers file not found")
    if not {"path", "number"} <= set(df.columns):
        raise SubmitError(f"{path}: expected columns path,number")
    numbers = pd.to_numeric(df["number"], errors="coerce")
    if numbers.isna().any() or (numbers != numbers.round()).any():
        raise SubmitError(f"{path}: column 'number' must hold integers (row {int(numbers.isna().idxmax()) + 2})")
    return {PurePosixPath(p).as_posix(): int(n) for p, n in zip(df["path"].astype(str), numbers)}


def match_truth(paths: Sequence[str], truth: Mapping[str, int]) -> np.ndarray:
    """Ground-truth number per manifest path by the longest matching trailing path suffix; -2 = unknown."""
    out = np.full(len(paths), -2, dtype=np.int64)
    for i, p in enumerate(paths):
        parts = PurePosixPath(p).parts
        for start in range(len(parts)):
            hit = truth.get("/".join(parts[start:]))
            if hit is not None:
                out[i] = hit
                break
    return out


def score_numbers(pred: pd.DataFrame, truth: np.ndarray, top_confusions: int = 10) -> NumberScore:
    """Top-1 / top-5 accuracy and the most common confusions of `predictions(...)` rows vs truth (-2 = skip)."""
    known = truth != -2
    if not known.any():
        raise SubmitError("no predicted crop has a ground-truth number (check the truth file's paths)")
    t = truth[known]
    p = pred["number"].to_numpy()[known]
    top5 = [str(int(v)) in s.split() for v, s in zip(t, pred["top5"].to_numpy()[known])]
    pairs = Counter((int(a), int(b)) for a, b in zip(t, p) if a != b)
    return NumberScore(n=int(known.sum()), accuracy=float((t == p).mean()), top5=float(np.mean(top5)),
                       none_rate=float((p == NONE).mean()),
                       confusions=[(a, b, c) for (a, b), c in pairs.most_common(top_confusions)])


# ---------------------------------------------------------------- the `jersey` command


def select_rows(data_dir: str | Path, split: str, role: str) -> pd.DataFrame:
    """Manifest rows of a split for role query, gallery, train or all (query then gallery, or train)."""

    df = read_manifest(data_dir)
    if role != "all":
        return select(df, split, role)
    if split == "train":
        return select(df, "train", "train")
    return pd.concat([select(df, split, "query"), select(df, split, "gallery")], ignore_index=True)


def run_jersey(data_dir: str | Path, split: str, role: str, model: str, pretrained: str | None,
               out: str | Path, truth: str | Path | None = None, batch_size: int = 64,
               device: str | None = None, workers: int = 0,
               progress: bool = True) -> tuple[pd.DataFrame, NumberScore | None]:
    """Read shirt numbers of a split's crops, write `out` (CSV) atomically, and score them when truth exists.

    Without `truth`, DATA_DIR/numbers.csv is used when present (prepare copies the generator's file there).
    """
    atomic.check_file_target(Path(out))
    check_device(device)
    rows = select_rows(data_dir, split, role)
    truth_path = Path(truth) if truth else Path(data_dir) / "numbers.csv"
    if truth and not truth_path.is_file():
        raise SubmitError(f"{truth_path}: ground-truth numbers file not found")
    truth_map = read_truth(truth_path) if truth_path.is_file() else None
    clip_model, tokenizer = load_clip(model, pretrained)
    cache = _text_cache_file(data_dir, model, pretrained, NUMBER_PROMPTS, NONE_PROMPTS)
    probs = read_numbers(clip_model, tokenizer, data_dir, rows["path"].tolist(), batch_size, device, workers,
                         cache, progress)
    pred = predictions(rows, probs)
    score = None if truth_map is None else score_numbers(pred, match_truth(pred["path"].tolist(), truth_map))
    write_csv(pred, out)  # last: a refusal above leaves no file behind
    return pred, score


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A numbers CSV written by `run_jersey` (path,image_id,number,prob[,top5]), validated."""
    path = Path(path)
    df = read_csv(path, missing="shirt-number file not found")
    missing = [c for c in ("path", "number", "prob") if c not in df.columns]
    if missing:
        raise SubmitError(f"{path}: missing column(s) {', '.join(missing)}; expected path,image_id,number,prob")
    return df


# ---------------------------------------------------------------- numbers for the ranking step


def apply_jersey(dist: np.ndarray, query_rows: pd.DataFrame, gallery_rows: pd.DataFrame,
                 data_dir: str | Path, params: Mapping[str, Any] | JerseySpec, base_dir: str | Path = ".",
                 device: str | None = None, progress: bool = True) -> np.ndarray:
    """The ensemble's `{"jersey": {...}}` step in one call (notebooks, scripts): validate `params` as `JerseySpec`
    (`base_dir` resolves a relative `numbers` path), read the numbers, apply `reranking.number_agreement`."""
    spec = params if isinstance(params, JerseySpec) else config.from_mapping(JerseySpec, dict(params), "jersey")
    check_number_source(spec, "jersey")
    if spec.numbers is not None:
        spec = dataclasses.replace(spec, numbers=str(Path(base_dir) / spec.numbers))
    numbers, probs = spec_numbers(spec, data_dir, [*query_rows["path"], *gallery_rows["path"]], device, progress)
    nq = len(query_rows)
    return number_agreement(dist, numbers[:nq], probs[:nq], numbers[nq:], probs[nq:],
                            spec.bonus, spec.penalty, spec.threshold)


def spec_numbers(spec: JerseySpec, data_dir: str | Path, paths: Sequence[str], device: str | None = None,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(number, probability) per manifest path for a resolved `jersey:` block: from its numbers CSV, or read
    zero-shot with its model (cached under DATA_DIR/.cache/jersey/ when the weights are named)."""
    if spec.numbers is not None:
        return _numbers_from_csv(Path(spec.numbers), paths)
    return _numbers_from_model(spec, data_dir, paths, device, progress)


def _numbers_from_csv(path: Path, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(number, prob) per path from a numbers CSV; every path must be present."""
    df = read_predictions(path)
    lookup = {str(p): (int(n), float(pr)) for p, n, pr in zip(df["path"], df["number"], df["prob"])}
    missing = [p for p in paths if p not in lookup]
    if missing:
        raise SubmitError(f"{path}: no shirt number for {missing[0]} ({len(missing)} crops missing); "
                          f"run `reident-submit jersey --role all` on the same split")
    pairs = [lookup[p] for p in paths]
    return np.array([n for n, _ in pairs]), np.array([pr for _, pr in pairs])


def _numbers_from_model(spec: JerseySpec, data_dir: str | Path, paths: Sequence[str], device: str | None,
                        progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot (number, prob) per path, cached on disk when the weights are named."""
    assert spec.model is not None
    cache = _numbers_cache_file(data_dir, spec, paths)
    if cache is not None and cache.is_file():
        hit = pd.read_csv(cache)
        if hit["path"].tolist() == list(paths):
            return hit["number"].to_numpy(), hit["prob"].to_numpy()
    clip_model, tokenizer = load_clip(spec.model, spec.pretrained)
    text_cache = _text_cache_file(data_dir, spec.model, spec.pretrained, NUMBER_PROMPTS, NONE_PROMPTS)
    probs = read_numbers(clip_model, tokenizer, data_dir, paths, spec.batch_size, device, 0, text_cache, progress)
    pred = predictions(pd.DataFrame({"path": list(paths)}), probs)
    if cache is not None:
        write_csv(pred, cache)
    return pred["number"].to_numpy(), pred["prob"].to_numpy()


# ---------------------------------------------------------------- caches and files


def weights_identity(model: str, pretrained: str | None) -> str | None:
    """A stable name for the weights (tag, hub id or file content hash); None for random weights."""
    if not pretrained:
        return None
    if Path(pretrained).is_file():
        return f"{model}|file:{file_hash(pretrained)}"
    return f"{model}|{pretrained}"


def _text_cache_file(data_dir: str | Path, model: str, pretrained: str | None, number_prompts: Sequence[str],
                     none_prompts: Sequence[str]) -> Path | None:
    ident = weights_identity(model, pretrained)
    if ident is None:
        return None
    key = hashlib.sha256(f"{ident}|{prompts_key(number_prompts, none_prompts)}".encode()).hexdigest()[:20]
    return Path(data_dir) / ".cache" / "jersey" / f"text-{key}.npy"


def _numbers_cache_file(data_dir: str | Path, spec: JerseySpec, paths: Sequence[str]) -> Path | None:
    ident = weights_identity(str(spec.model), spec.pretrained)
    if ident is None:
        return None
    text = json.dumps([ident, prompts_key(), list(paths)])
    return Path(data_dir) / ".cache" / "jersey" / f"numbers-{hashlib.sha256(text.encode()).hexdigest()[:20]}.csv"


def write_csv(df: pd.DataFrame, out: str | Path) -> Path:
    """Write a CSV atomically (submit.atomic)."""
    with atomic.atomic_file(out, "w", newline="") as fh:
        df.to_csv(fh, index=False)
    return Path(out)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """Atomic .npy write; a read-only or full data dir just skips caching."""
    try:
        with atomic.atomic_file(path, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
    except SubmitError:
        return


def _dev_str(device: str | torch.device | None) -> str | None:
    return str(device) if device is not None else None


def _bar(enabled: bool) -> Progress:
    return progress_bar(enabled, "img")
