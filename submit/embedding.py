"""The one embedder: manifest rows -> (N, D) float32 L2-normalised features, with TTA and an on-disk cache for
prediction (`embed`), and with the identity view only for the training loop's validation (`embed_views`).

Each test-time view (scale x horizontal flip, from a `TTASpec`) is embedded and L2-normalised; the views
are averaged and renormalised. Images are decoded (once for all views) by DataLoader workers one batch
at a time, so memory is bounded by the batch plus the (N, D) output. Workers hand over letterboxed uint8
pixels (a quarter of float32's bytes through shared memory, pinning and the host-to-device copy); the
conversion to float and the normalisation run on the model's device. On CUDA the forward runs under AMP
in channels_last.

Features are cached in `DATA_DIR/.cache/features/<key>.npy`, written atomically. The key hashes the
caller's model identity (`checkpoint_identity`: the weights file's content hash + the backbone spec,
which fixes the architecture, image size and normalisation), the TTA views and the manifest rows'
fingerprint, so a changed manifest, checkpoint or TTA setting misses the cache instead of returning
stale features. The weights are hashed, not dated: a copied run dir still hits its cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from submit import atomic, config
from submit.device import amp_dtype, autocast, pick_device
from submit.errors import SubmitError, loader_errors
from submit.manifest import fingerprint
from submit.progress import progress_bar
from submit.recipe import TTASpec
from submit.transforms import letterbox, normalise_pixels, open_image, to_uint8

View = tuple[float, bool]  # (scale, horizontal flip)
CACHE_VERSION = "1"
_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def tta_views(tta: TTASpec) -> list[View]:
    """The (scale, flip) views a TTA spec asks for: every scale, each also flipped when `hflip`."""
    flips = (False, True) if tta.hflip else (False,)
    return [(float(s), f) for s in tta.scales for f in flips]


class _Views(Dataset):
    """One item = all views of one image stacked as uint8 (V, 3, H, W): decoded once, letterboxed once per scale.

    `transforms.normalise_pixels(view, mean, std)` of a view is exactly `CropDataset(..., hflip=flip,
    scale=scale)[i]` (the same letterbox, then the same float arithmetic); a flipped view is the mirrored
    pixels of its scale's unflipped one, which is the same thing."""

    def __init__(self, root: str | Path, paths: Sequence[str], size_hw: tuple[int, int],
                 views: Sequence[View]) -> None:
        self.root, self.paths, self.size_hw, self.views = Path(root), list(paths), size_hw, list(views)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = open_image(self.root / self.paths[i])
        by_scale: dict[float, torch.Tensor] = {}
        out = []
        for scale, flip in self.views:
            if scale not in by_scale:
                by_scale[scale] = to_uint8(letterbox(img, self.size_hw, scale=scale))
            out.append(by_scale[scale].flip(-1) if flip else by_scale[scale])
        return torch.stack(out), i


def file_hash(path: str | Path) -> str:
    """SHA-256 (16 hex) of a file's content; memoised per (path, size, mtime) within the process."""
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _HASH_MEMO[memo] = h.hexdigest()[:16]
    return _HASH_MEMO[memo]


def checkpoint_identity(checkpoint: str | Path, extra: object = None) -> str:
    """A cache identity for weights loaded from `checkpoint`: its content hash plus `extra` (e.g. the backbone spec)."""
    return f"ckpt:{file_hash(checkpoint)}:{json.dumps(config.to_mapping(extra), sort_keys=True, default=str)}"


def cache_key(identity: str, tta: TTASpec, rows: pd.DataFrame, model: torch.nn.Module | None = None,
              amp: torch.dtype | None = None) -> str:
    """The feature-cache key: model identity, TTA views, manifest rows; plus the model's input geometry when a
    model is given and the autocast dtype when there is one (bf16/fp16 features differ from fp32 ones)."""
    parts: dict[str, object] = {"version": CACHE_VERSION, "identity": identity, "views": tta_views(tta),
                                "rows": fingerprint(rows)}
    if amp is not None:
        parts["amp"] = str(amp)
    if model is not None:
        parts["size"] = list(model.input_size)
        parts["mean"] = [float(v) for v in model.mean]
        parts["std"] = [float(v) for v in model.std]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(data_dir: str | Path, key: str) -> Path:
    """Where the features for `key` live under a data dir."""
    return Path(data_dir) / ".cache" / "features" / f"{key}.npy"


def embed(model: torch.nn.Module | Callable[[], torch.nn.Module], data_dir: str | Path, rows: pd.DataFrame,
          tta: TTASpec, device: str | torch.device | None = None, workers: int = 2, identity: str | None = None,
          precision: str = "auto", progress: bool = True, label: str = "embedding") -> np.ndarray:
    """Embed manifest `rows` (paths relative to `data_dir`) with TTA; (N, D) float32, unit rows.

    With `identity` the result is cached under `DATA_DIR/.cache/features/` and reused by later calls with
    the same key; without it nothing is cached. The identity must pin the weights AND the backbone spec
    (architecture, image size, normalisation): `checkpoint_identity(path, recipe.backbone)` does. `model`
    may be a zero-argument loader, called only on a cache miss (a hit then loads no weights at all).
    """
    module = model if isinstance(model, torch.nn.Module) else None
    amp = amp_dtype(pick_device(str(device) if device is not None else None), precision)
    path = cache_path(data_dir, cache_key(identity, tta, rows, module, amp)) if identity else None
    if path is not None and path.is_file():
        feats = _load_cached(path, len(rows))
        if feats is not None:
            return feats
    module = module if module is not None else model()  # type: ignore[operator]
    feats = embed_views(module, data_dir, rows, tta_views(tta), tta.batch_size, device, workers,
                        precision, progress, label)
    if path is not None:
        _save_atomic(path, feats)
    return feats


def embed_views(model: torch.nn.Module, data_dir: str | Path, rows: pd.DataFrame, views: Iterable[View],
                batch_size: int = 64, device: str | torch.device | None = None, workers: int = 2,
                precision: str = "auto", progress: bool = True, label: str = "embedding",
                in_training: bool = False) -> np.ndarray:
    """Embed `rows` under explicit (scale, flip) views; per-view features are normalised, averaged, renormalised.

    `in_training` (the training loop's validation: the model trains on afterwards) leaves the model's memory
    layout alone (no channels_last: DDP's gradient buckets keep theirs) and runs under no_grad instead of
    inference mode (a tensor a module caches during the forward stays usable by autograd). The global random
    generators are never drawn from, so validating does not change a run's random stream.
    """
    views = list(views)
    if not views or any(scale <= 0 for scale, _ in views):
        raise SubmitError(f"tta.scales: expected one or more positive scales, got {[s for s, _ in views]}")
    dev = pick_device(str(device) if device is not None else None)
    channels_last = dev.type == "cuda" and not in_training
    size_hw = tuple(model.input_size)
    paths = rows["path"].tolist()
    dataset = _Views(data_dir, paths, size_hw, views)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda", persistent_workers=False,
                        generator=torch.Generator())  # its own seed source: the global torch RNG is not drawn
    was_training = model.training
    model.eval().to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    grad_off = torch.no_grad() if in_training else torch.inference_mode()
    out: np.ndarray | None = None
    try:
        with loader_errors(), grad_off, _bar(progress) as bar:
            task = bar.add_task(label, total=len(paths))
            for batch, index in loader:
                feats = _forward_views(model, batch, dev, precision, channels_last)
                if out is None:
                    out = np.empty((len(paths), feats.shape[1]), dtype=np.float32)
                out[index.numpy()] = feats.cpu().numpy()
                bar.advance(task, len(index))
    finally:
        model.train(was_training)
    if out is None:
        dim = int(getattr(model, "embed_dim", 0))
        return np.zeros((0, dim), dtype=np.float32)
    return out


def _forward_views(model: torch.nn.Module, batch: torch.Tensor, dev: torch.device, precision: str,
                   channels_last: bool) -> torch.Tensor:
    """uint8 (B, V, 3, H, W) -> (B, D): per view, to float and normalise with the model's mean/std on `dev`,
    forward, L2-normalise; then average the views and renormalise (fp32)."""
    batch = batch.to(dev, non_blocking=True)  # the whole (pinned, contiguous) batch at once: a view slice is neither
    total = None
    for v in range(batch.shape[1]):
        x = batch[:, v]
        if channels_last:  # on the uint8 pixels (a quarter of the bytes); the float copy keeps the layout
            x = x.contiguous(memory_format=torch.channels_last)
        x = normalise_pixels(x, model.mean, model.std)
        with autocast(dev, precision):
            f = model(x)
        f = F.normalize(f.float(), dim=1)
        total = f if total is None else total + f
    assert total is not None, "at least one view is required"
    return F.normalize(total, dim=1)


def _bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr (images done / total, ETA); silent when disabled or not a terminal."""
    return progress_bar(enabled, "img", stderr=True, tty_only=True)


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    """Cached features, or None when the file is unreadable or has the wrong row count (then recompute)."""
    try:
        feats = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if feats.ndim != 2 or feats.shape[0] != n or feats.dtype != np.float32:
        return None
    return feats


def _save_atomic(path: Path, feats: np.ndarray) -> None:
    """Write `feats` to `path` atomically (submit.atomic); a read-only or full data dir just skips caching."""
    try:
        with atomic.atomic_file(path, "wb") as fh:
            np.save(fh, feats, allow_pickle=False)
    except SubmitError:
        return
