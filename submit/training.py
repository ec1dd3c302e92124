"""CLIP-ReIdent fine-tuning: pair batches -> image tower -> symmetric InfoNCE, with resumable checkpoints and DDP.

Run dir (`out_dir`):
- `recipe.yaml`   the resolved recipe (after `--set` overrides), plain YAML.
- `last.pt`       the resumable state: model, optimizer, schedule, scaler, EMA, step, epoch, batch within
                  the epoch, RNG states of every rank, metrics history, recipe. Written every
                  `train.checkpoint_every` steps and at each epoch end, atomically (submit.atomic).
- `best.pt`       inference weights (EMA when enabled) of the epoch with the best validation mAP, or of
                  the latest epoch when validation is skipped (`data.split: all`).
- `metrics.csv`, `metrics.json`  one row per validated epoch (loss, lr, temperature, images/s, mAP, ...).
- `tb/`           TensorBoard event files (per step and per validation, `submit.reporting`; `--report-to`).
Both checkpoints and metrics.json record `manifest`: the fingerprint of the manifest the run trained on
(`manifest.fingerprint`, a hash of its rows with DATA_DIR-relative paths), so resume and predict can refuse
to mix runs trained on different data.
Checkpoints hold only tensors and plain Python types, so they load with `torch.load(weights_only=True)`.

Batches: `train.pairs_per_batch` pairs per process and micro-batch; the global (effective) batch is
pairs_per_batch x world size x accum_steps pairs, every pair a distinct player, and the InfoNCE loss sees
all of them as negatives (all-gather across ranks, cached features across accumulation micro-batches).
`train.lr` is the learning rate of that global batch: it is NOT rescaled when the world size changes,
so keep the global batch (or retune lr) when moving between 1 GPU and several.

Distributed: launched by `torchrun`, `train` reads WORLD_SIZE/RANK/LOCAL_RANK, joins the process group
(nccl on CUDA, gloo on CPU), wraps the model in DistributedDataParallel, shards the sampler by rank,
validates on every rank (each embeds a shard with the unwrapped model, features are all-gathered, so
no rank waits at a barrier while another runs a wrapped forward) and writes files on rank 0 only.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from submit import atomic, config, locks, reporting
from submit.device import amp_dtype, autocast, pick_device, usable_cores
from submit.errors import SubmitError, loader_errors
from submit.losses import LOSSES, LogitScale, build_loss
from submit.manifest import fingerprint, read_manifest
from submit.metrics import METRIC_KEYS
from submit.recipe import AugmentSpec, DataSpec, Recipe
from submit.run_folder import FORMAT, load_checkpoint, load_trained, recorded_manifest, save_atomic  # noqa: F401
from submit.run_folder import rng_state as _rng_state
from submit.run_folder import set_rng_state as _set_rng_state
from submit.sampler import PairBatchSampler

RESUME_MAY_CHANGE = ("train.epochs", "train.checkpoint_every", "data.workers", "data.cache_images")
CSV_COLUMNS = ("epoch", "step", "loss", "lr", "temperature", "images_per_s", "seconds", *METRIC_KEYS)


# ---- recipes and overrides --------------------------------------------------------------------------


def apply_overrides(recipe: Recipe, overrides: Sequence[str], where: str = "--set") -> Recipe:
    """Apply `a.b=value` overrides (YAML values) and re-validate the whole recipe strictly."""
    data = config.to_mapping(recipe)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SubmitError(f"{where}: expected KEY=VALUE, got {item!r}")
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SubmitError(f"{where}: key {'.'.join(parts[:depth + 1])!r} is a value, not a section ({key!r})")
        node[parts[-1]] = _yaml_value(raw, where, key)
    return config.from_mapping(Recipe, data, where=where)


def _yaml_value(raw: str, where: str, key: str) -> Any:
    """A YAML scalar/list, with `1e-4`-style numbers read as floats (YAML 1.1 would keep them strings)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise SubmitError(f"{where}: key {key!r}: value {raw!r} is not valid YAML") from None
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
        return float(value)
    return value


# ---- data -------------------------------------------------------------------------------------------


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
    return rows.sort_values("image_id", kind="stable")


class PairDataset(Dataset):
    """Item `(anchor, positive, aug_seed)` -> (2, 3, H, W): both crops letterboxed, jointly augmented.

    With `cache`, each crop is decoded and letterboxed once per process and kept in memory (H x W x 3
    bytes per crop); letterboxing an already letterboxed crop is an exact copy, so results are unchanged.
    """

    def __init__(self, root: str | Path, paths: Sequence[str], size_hw: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float], augment: AugmentSpec, cache: bool = False) -> None:
        from submit.transforms import PairAugment

        self.root = Path(root)
        self.paths = list(paths)
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self.augment = PairAugment(augment, size_hw, mean, std)
        self.cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> Any:
        from submit.transforms import letterbox, open_image

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


# ---- model pieces -----------------------------------------------------------------------------------


class ContrastiveModel(nn.Module):
    """The embedder plus the learnable temperature; forward returns both so DDP syncs the temperature too."""

    def __init__(self, embedder: nn.Module, temperature: LogitScale) -> None:
        super().__init__()
        self.embedder = embedder
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder(x), self.temperature()


_BLOCK = re.compile(r"(?:resblocks|blocks|layers|stages|layer)\.?(\d+)\.")
_STEM = re.compile(r"(?:^|\.)(?:patch_embed|conv1|bn1|stem|cls_token|reg_token|class_embedding|pos_embed|"
                   r"positional_embedding|ln_pre|norm_pre)(?:\.|$)")


def layer_ids(names: Sequence[str]) -> dict[str, int]:
    """Depth of each parameter for layer-wise LR decay: 0 stem/embeddings, 1+i block i, the rest the head."""
    found = {n: _BLOCK.search(n) for n in names}
    blocks = [int(m.group(1)) for m in found.values() if m]
    head = (max(blocks) + 2) if blocks else 1
    return {n: int(m.group(1)) + 1 if m else (0 if _STEM.search(n) else head) for n, m in found.items()}


def param_groups(model: ContrastiveModel, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """AdamW groups: no decay on norms/biases (ndim < 2) and the temperature; optional layer-wise LR scale."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depth = layer_ids([n for n, _ in named])
    top = max(depth.values(), default=0)
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in named:
        decay = param.ndim >= 2 and not name.startswith("temperature.")
        scale = layer_decay ** (top - depth[name]) if layer_decay else 1.0
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up to `lr`, then polynomial / cosine decay to `min_lr` (or constant), per optimizer step."""

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "polynomial"
    power: float = 2.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * (1 - progress) ** self.power


class EMA:
    """Exponential moving average of a model's weights (a full copy, used for validation and saving)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, live in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.mul_(self.decay).add_(live.detach(), alpha=1 - self.decay)
            else:
                ema.copy_(live)


# ---- distributed ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; `owns_group` when `train` created the process group."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by WORLD_SIZE/RANK/LOCAL_RANK (nccl on CUDA, gloo on CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_world_size(), dist.get_rank(), local, owns), device


def _gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- validation -------------------------------------------------------------------------------------


@torch.no_grad()
def embed_rows(embedder: nn.Module, root: str | Path, paths: Sequence[str], device: torch.device,
               precision: str = "auto", batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """L2-normalised features (N, D) of crops `paths` (single view, letterboxed), in order."""
    from submit.transforms import CropDataset

    data = CropDataset(root, list(paths), tuple(embedder.input_size), tuple(embedder.mean), tuple(embedder.std))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                        generator=torch.Generator())  # leaves the global RNG (dropout) untouched
    was_training = embedder.training
    embedder.eval()
    out = []
    try:
        for images, _ in loader:
            with autocast(device, precision):
                feats = embedder(images.to(device, non_blocking=True))
            out.append(torch.nn.functional.normalize(feats.float(), dim=1).cpu().numpy())
    finally:
        embedder.train(was_training)
    dim = int(getattr(embedder, "embed_dim", 0))
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def validate(embedder: nn.Module, root: str | Path, query: pd.DataFrame, gallery: pd.DataFrame,
             device: torch.device, precision: str, info: DistInfo, batch_size: int = 64,
             workers: int = 0) -> dict[str, float]:
    """Test-split metrics with cosine distance; each rank embeds a shard, then every rank computes the same result."""
    from submit.metrics import evaluate_distances
    from submit.reranking import cosine_distance

    paths = query["path"].tolist() + gallery["path"].tolist()
    shard = np.array_split(np.arange(len(paths)), info.world_size)[info.rank]
    feats = embed_rows(embedder, root, [paths[i] for i in shard], device, precision, batch_size, workers)
    feats = np.concatenate(_gather_objects(feats, info))
    q, g = feats[:len(query)], feats[len(query):]
    result = evaluate_distances(cosine_distance(q, g), query["pid"].to_numpy(), gallery["pid"].to_numpy())
    return {k: float(result[k]) for k in METRIC_KEYS}


# ---- the training loop ------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    """Everything the loop mutates, in one place (so checkpoints save exactly this)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    best_map: float = -1.0
    history: list[dict] = dataclasses.field(default_factory=list)


class _Trainer:
    """One training run: built from a recipe, runs epochs, saves checkpoints (rank 0)."""

    def __init__(self, recipe: Recipe, data_dir: Path, out_dir: Path, device: torch.device, info: DistInfo) -> None:
        from submit.backbones import build_embedder

        self.recipe, self.data_dir, self.out_dir, self.device, self.info = recipe, data_dir, out_dir, device, info
        t = recipe.train
        manifest = read_manifest(data_dir)
        self.manifest = fingerprint(manifest)  # recorded in checkpoints and metrics.json
        self.splits = make_splits(manifest, recipe.data, recipe.seed)
        _seed_all(recipe.seed)
        embedder = build_embedder(recipe.backbone)
        if t.grad_checkpointing:
            embedder.set_grad_checkpointing(True)
        learn = t.learn_temperature and LOSSES[t.loss].temperature
        temperature = LogitScale(float(embedder.logit_scale_init), learn=learn, max_scale=t.max_logit_scale)
        self.model = ContrastiveModel(embedder, temperature).to(device)
        self.criterion = build_loss(t.loss, t.label_smoothing, t.triplet_margin)
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda"
                                                        else None) if info.world_size > 1 else None)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay, t.layer_decay), lr=t.lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, t.precision) == torch.float16)
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay else None
        self.sampler = PairBatchSampler(self.splits.train["pid"].tolist(), t.pairs_per_batch * t.accum_steps,
                                        info.world_size, info.rank, recipe.seed)
        self.steps_per_epoch = [len(self.sampler.global_batches(e)) for e in range(t.epochs)]
        if not self.steps_per_epoch or self.steps_per_epoch[0] == 0:
            raise SubmitError(
                f"recipe: key 'train.pairs_per_batch': the global batch needs {self.sampler.global_pairs} distinct "
                f"identities with >= 2 images, the training rows have {len(self.sampler.groups)}")
        self.schedule = LRSchedule(t.lr, t.min_lr, round(t.warmup_epochs * self.steps_per_epoch[0]),
                                   sum(self.steps_per_epoch), t.schedule, t.poly_power)
        images = PairDataset(data_dir, self.splits.train["path"].tolist(), tuple(embedder.input_size),
                             tuple(embedder.mean), tuple(embedder.std), t.augment, recipe.data.cache_images)
        workers = recipe.data.workers
        self.loader = DataLoader(images, batch_sampler=self.sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                 generator=torch.Generator().manual_seed(recipe.seed))
        self.state = _State()
        self.reporter: reporting.Reporter = reporting.NullReporter()  # `train` sets the --report-to one
        self._epoch_start = time.perf_counter()
        _seed_all(recipe.seed + 1000 * info.rank)  # per-rank randomness (dropout) from here on

    # -- checkpoints --

    def resume(self, path: Path) -> None:
        """Restore the full training state from `last.pt`."""
        ckpt = load_checkpoint(path)
        _check_same_recipe(ckpt["recipe"], self.recipe, path)
        _check_same_manifest(ckpt.get("manifest"), self.manifest, path, self.data_dir)
        saved_pairs = ckpt["sampler"]["global_pairs"]
        if saved_pairs != self.sampler.global_pairs:
            raise SubmitError(f"{path}: the run used a global batch of {saved_pairs} pairs, this launch gives "
                              f"{self.sampler.global_pairs} (pairs_per_batch x processes x accum_steps); resume "
                              "with the same number of processes")
        self.model.embedder.load_state_dict(ckpt["model"])
        self.model.temperature.load_state_dict(ckpt["temperature"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.model.embedder.load_state_dict(ckpt["ema"])
            self.ema.model.temperature.load_state_dict(ckpt["ema_temperature"])
        s = ckpt["state"]
        self.state = _State(s["step"], s["epoch"], s["batch_in_epoch"], s["loss_sum"], s["loss_count"],
                            s["best_map"], list(ckpt["history"]))
        rngs = ckpt["rng"]
        if len(rngs) == self.info.world_size:
            _set_rng_state(rngs[self.info.rank])

    def save_last(self) -> None:
        """Write the resumable checkpoint (RNG states gathered from every rank; rank 0 writes)."""
        rngs = _gather_objects(_rng_state(), self.info)
        if not self.info.main:
            return
        s = self.state
        obj = {
            "format": FORMAT, "kind": "last", "recipe": config.to_mapping(self.recipe), "manifest": self.manifest,
            "model": self.model.embedder.state_dict(), "temperature": self.model.temperature.state_dict(),
            "ema": self.ema.model.embedder.state_dict() if self.ema else None,
            "ema_temperature": self.ema.model.temperature.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "schedule": dataclasses.asdict(self.schedule),
            "state": {"step": s.step, "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "loss_sum": s.loss_sum,
                      "loss_count": s.loss_count, "best_map": s.best_map},
            "sampler": {"seed": self.sampler.seed, "epoch": s.epoch, "position": s.batch_in_epoch,
                        "global_pairs": self.sampler.global_pairs},
            "rng": rngs, "history": s.history, "world_size": self.info.world_size,
        }
        save_atomic(obj, self.out_dir / "last.pt")

    def save_best(self, row: dict) -> None:
        """Write the inference checkpoint (EMA weights when enabled)."""
        if not self.info.main:
            return
        source = self.ema.model if self.ema else self.model
        save_atomic({"format": FORMAT, "kind": "best", "recipe": config.to_mapping(self.recipe),
                     "manifest": self.manifest, "model": source.embedder.state_dict(),
                     "temperature": source.temperature.state_dict(), "metrics": row}, self.out_dir / "best.pt")

    # -- one optimizer step --

    def train_step(self, batch: torch.Tensor) -> float:
        """One optimizer step on one global batch; returns the loss."""
        loss = self.accumulate_gradients(batch)
        self.apply_gradients()
        return loss

    def accumulate_gradients(self, batch: torch.Tensor) -> float:
        """Forward/backward of this rank's (P x accum, 2, 3, H, W) pairs into .grad; returns the loss.

        With accum_steps > 1, a first pass embeds every micro-batch without gradients; each micro-batch is
        then recomputed with gradients while the cached features of the others stay in the loss, so the
        negatives (and the gradient) are those of the whole effective batch, as in open_clip's accum_freq.
        """
        t = self.recipe.train
        micro = batch.to(self.device, non_blocking=True).chunk(t.accum_steps)
        if t.accum_steps == 1:
            return self._micro_step(micro[0], None, 0, sync=True)
        cached = self._cached_features(micro)
        losses = [self._micro_step(pairs, cached, m, sync=m == len(micro) - 1) for m, pairs in enumerate(micro)]
        return losses[0]

    def apply_gradients(self) -> None:
        """Clip (optional), step the optimizer through the scaler, clear grads, update the EMA."""
        t = self.recipe.train
        if t.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    def _forward(self, pairs: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(pairs)
        images = torch.cat([pairs[:, 0], pairs[:, 1]])
        module = self.ddp if (grad and self.ddp is not None) else self.model
        with autocast(self.device, self.recipe.train.precision):
            feats, scale = module(images)
        return feats[:n], feats[n:], scale

    @torch.no_grad()
    def _cached_features(self, micro: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """First accumulation pass: features of every micro-batch without gradients (BN statistics untouched)."""
        buffers = {k: v.clone() for k, v in self.model.embedder.named_buffers()}
        out = [self._forward(pairs, grad=False)[:2] for pairs in micro]
        with torch.no_grad():
            for name, value in self.model.embedder.named_buffers():
                value.copy_(buffers[name])
        return out

    def _micro_step(self, pairs: torch.Tensor, cached: list | None, index: int, sync: bool) -> float:
        """Recompute one micro-batch with gradients; the others come from the cache (their negatives kept)."""
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        with no_sync:
            fa, fp, scale = self._forward(pairs, grad=True)
            if cached is not None:
                if not sync:
                    scale = scale.detach()  # the temperature's gradient is taken once, on the last micro-batch
                fa = torch.cat([fa if j == index else c[0] for j, c in enumerate(cached)])
                fp = torch.cat([fp if j == index else c[1] for j, c in enumerate(cached)])
            loss = self.criterion(fa, fp, scale)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SubmitError(f"training diverged: loss is {value} at step {self.state.step + 1} "
                                  f"(epoch {self.state.epoch + 1}); the last good checkpoint is kept in "
                                  f"{self.out_dir / 'last.pt'}")
            self.scaler.scale(loss).backward()
        return value

    # -- epochs --

    def run(self, max_steps: int | None, progress: bool) -> None:
        """Train from the current state until the recipe's epochs (or `max_steps`) are done."""
        t = self.recipe.train
        total = sum(self.steps_per_epoch)
        stop = min(total, max_steps) if max_steps is not None else total
        bar = _progress(progress and self.info.main)
        with bar:
            task = bar.add_task("train", total=stop, completed=self.state.step, loss=float("nan"), lr=0.0,
                                temp=float(self.model.temperature().detach()), ips=0.0)
            while self.state.step < stop and self.state.epoch < t.epochs:
                self._run_epoch(stop, bar, task)
        if self.state.batch_in_epoch and self.state.step >= stop:
            self._end_epoch(partial=True)

    def _run_epoch(self, stop: int, bar: Any, task: Any) -> None:
        s, t = self.state, self.recipe.train
        self.sampler.set_epoch(s.epoch, start=s.batch_in_epoch)
        tick = time.perf_counter()
        if s.batch_in_epoch == 0:
            self._epoch_start = tick
        global_images = 2 * self.sampler.global_pairs
        step_s: float | None = None
        for batch in self.loader:
            lr = self.schedule(s.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss = self.train_step(batch)
            s.step += 1
            s.batch_in_epoch += 1
            s.loss_sum += loss
            s.loss_count += 1
            now = time.perf_counter()
            step_s = now - tick if step_s is None else 0.9 * step_s + 0.1 * (now - tick)  # smoothed for display
            ips, tick = global_images / max(step_s, 1e-9), now
            temp = float(self.model.temperature().detach())
            bar.update(task, advance=1, loss=loss, lr=lr, temp=temp, ips=ips)
            self.reporter.step(s.step, {"loss": loss, "lr": lr, "temperature": temp, "images_per_s": ips})
            self.on_step(s.step)
            if s.step >= stop:
                if s.batch_in_epoch < self.steps_per_epoch[s.epoch]:
                    return
                break
            if t.checkpoint_every and s.step % t.checkpoint_every == 0:
                self.save_last()
        self._end_epoch(partial=False)

    def on_step(self, step: int) -> None:
        """Hook called after every optimizer step (tests slow runs down here to kill them mid-way)."""

    def _end_epoch(self, partial: bool) -> None:
        s, t = self.state, self.recipe.train
        seconds = time.perf_counter() - self._epoch_start
        row: dict[str, Any] = {
            "epoch": s.epoch + 1, "step": s.step, "loss": s.loss_sum / max(1, s.loss_count),
            "lr": self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0]["lr_scale"],
            "temperature": float(self.model.temperature().detach()),
            "images_per_s": 2 * self.sampler.global_pairs * s.batch_in_epoch / max(seconds, 1e-9),
            "seconds": seconds, **{k: None for k in METRIC_KEYS}}
        if self.splits.query is not None:
            embedder = (self.ema.model if self.ema else self.model).embedder
            row.update(validate(embedder, self.data_dir, self.splits.query, self.splits.gallery, self.device,
                                t.precision, self.info, self.recipe.tta.batch_size, self.recipe.data.workers))
        is_best = self.splits.query is None or row["mAP"] > s.best_map
        if is_best and row["mAP"] is not None:
            s.best_map = row["mAP"]
        s.history.append(row)
        if not partial:
            s.epoch, s.batch_in_epoch, s.loss_sum, s.loss_count = s.epoch + 1, 0, 0.0, 0
        self.save_last()
        if is_best:
            self.save_best(row)
        if self.info.main:
            write_metrics(self.out_dir, s.history, {"recipe": self.recipe.name, "manifest": self.manifest,
                                                    "validation": self.splits.note,
                                                    "world_size": self.info.world_size,
                                                    "global_batch_pairs": self.sampler.global_pairs})
            self.reporter.validation(row)
            _log(_row_text(row, partial))


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


def _progress(enabled: bool) -> Any:
    from submit.progress import progress_bar

    return progress_bar(enabled, "loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} "
                                 "temp {task.fields[temp]:.1f} {task.fields[ips]:.0f} img/s", tty_only=True)


def _log(text: str) -> None:
    """A line for the user through `logging` (logger `submit.training`, INFO): the CLI prints it on stderr,
    a library caller or a notebook sees it only when it configures logging."""
    logging.getLogger(__name__).info(text)


def _row_text(row: dict, partial: bool) -> str:
    score = (f" mAP {row['mAP']:.4f} rank1 {row['rank1']:.4f}" if row.get("mAP") is not None else "")
    tag = " (stopped mid-epoch)" if partial else ""
    return (f"epoch {row['epoch']}{tag} step {row['step']}: loss {row['loss']:.4f} temp {row['temperature']:.1f} "
            f"{row['images_per_s']:.1f} img/s{score}")


def train(recipe: Recipe, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
          device: str | None = None, max_steps: int | None = None, progress: bool = True,
          report_to: Sequence[str] = reporting.DEFAULT) -> dict:
    """Fine-tune `recipe` on DATA_DIR's manifest into run dir `out_dir`; returns a summary dict.

    `resume` continues from `out_dir/last.pt` (same recipe; `train.epochs` may grow). `max_steps` stops
    after that many optimizer steps in total (the LR schedule still follows the recipe's epochs).
    `report_to` names where curves go besides metrics.csv (`reporting.TARGETS`; default TensorBoard in OUT/tb).
    Under torchrun (WORLD_SIZE > 1) this joins the process group and trains with DDP.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    info, dev = init_distributed(pick_device(device))
    threads = torch.get_num_threads()
    try:
        cpu_threads(dev, recipe.data.workers)
        with _run_lock(out_dir, info):
            return _train(recipe, data_dir, out_dir, resume, dev, info, max_steps, progress, report_to)
    finally:
        torch.set_num_threads(threads)
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _run_lock(out_dir: Path, info: DistInfo) -> Iterator[None]:
    """Rank 0 holds RUN_DIR's lock (`locks.run_lock`) for the whole run; every rank hears a refusal, so
    none waits at a barrier for a rank that stopped (a second `train` into one --out is refused at once)."""
    with contextlib.ExitStack() as stack:
        refused = None
        if info.main:
            try:
                stack.enter_context(locks.run_lock(out_dir, "train"))
            except SubmitError as exc:
                refused = str(exc)
        refused = _gather_objects(refused, info)[0]
        if refused:
            raise SubmitError(refused)
        yield


def cpu_threads(device: torch.device, workers: int) -> int:
    """On CPU, pick the compute threads: the cores this process may use, minus one per DataLoader worker
    and minus the cores other programs keep busy (1-minute load average), at least 1.

    OpenMP threads spin at barriers: when a loader worker or another program preempts one of them, a
    step can take many times longer (on a busy 2-core VM, 2 threads ran 27x slower than 1). An explicit
    OMP_NUM_THREADS always wins.
    """
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    torch.set_num_threads(max(1, min(cores - workers, cores - busy)))
    return torch.get_num_threads()


def _train(recipe: Recipe, data_dir: Path, out_dir: Path, resume: bool, device: torch.device, info: DistInfo,
           max_steps: int | None, progress: bool, report_to: Sequence[str] = reporting.DEFAULT) -> dict:
    report_to = reporting.parse_report_to(report_to)
    last = out_dir / "last.pt"
    if last.exists() and not resume:
        raise SubmitError(f"{out_dir}: already holds a run (last.pt); pass --resume or choose another --out")
    if resume and not last.exists():
        raise SubmitError(f"{last}: nothing to resume (no checkpoint)")
    trainer = _Trainer(recipe, data_dir, out_dir, device, info)
    if resume:
        trainer.resume(last)
    if info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_recipe(out_dir, recipe)
        where = (f"{device}" if device.type != "cpu" else
                 f"cpu, {torch.get_num_threads()} compute thread(s) + {recipe.data.workers} loader worker(s)")
        _log(f"training {recipe.name} on {where}: {len(trainer.splits.train)} images, global batch "
             f"{trainer.sampler.global_pairs} pairs ({info.world_size} process(es)), lr {recipe.train.lr:g} for "
             f"that batch, {sum(trainer.steps_per_epoch)} steps; {trainer.splits.note}"
             + (f"; {trainer.sampler.skipped} single-image identities skipped" if trainer.sampler.skipped else ""))
    if info.world_size > 1:
        dist.barrier()
    start = time.perf_counter()
    trainer.reporter = reporting.open_reporter(report_to, out_dir, main=info.main, start_step=trainer.state.step,
                                               name=recipe.name, recipe=config.to_mapping(recipe))
    try:
        with loader_errors():  # a loader worker's error: its one line, not the worker's traceback
            trainer.run(max_steps, progress)
    finally:
        trainer.reporter.close()
    s = trainer.state
    scored = [r for r in s.history if r.get("mAP") is not None]
    best = max(scored, key=lambda r: r["mAP"]) if scored else None
    return {"run_dir": str(out_dir), "steps": s.step, "epochs": s.epoch, "seconds": time.perf_counter() - start,
            "validation": trainer.splits.note, "best": best, "last": s.history[-1] if s.history else None,
            "world_size": info.world_size, "main": info.main, "global_batch_pairs": trainer.sampler.global_pairs}


def _write_recipe(out_dir: Path, recipe: Recipe) -> None:
    atomic.write_text(out_dir / "recipe.yaml", yaml.safe_dump(config.to_mapping(recipe), sort_keys=False))
