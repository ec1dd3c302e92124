"""The model recipe (`models/*.yaml`): one fine-tuned backbone, how to train it and how to embed with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from submit import config


@dataclass(frozen=True)
class BackboneSpec:
    """Which image tower, which weights, and which embedding it exposes."""

    name: str  # "open_clip:<model>" or "timm:<model>"
    pretrained: str | None = None  # open_clip tag, "hf-hub:<org>/<repo>", or a local checkpoint file
    embedding: Literal["projected", "token"] = "projected"  # CLIP projection output or pre-projection token
    image_size: tuple[int, int] | None = None  # (height, width); None = the model's native size
    mean: tuple[float, float, float] | None = None  # None = the model's own normalisation
    std: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class AugmentSpec:
    """Pair augmentation; `hflip` flips anchor and positive together, as the published recipe did."""

    hflip: float = 0.5
    random_erasing: float = 0.0
    sharpen: float = 0.0
    color_jitter: float = 0.0


@dataclass(frozen=True)
class DataSpec:
    """Which manifest rows train: the train split, train+test ('all'), or k-fold by identity groups."""

    split: Literal["train", "all", "kfold"] = "train"
    folds: int = 10
    fold: int = 0
    workers: int = 2
    cache_images: bool = False  # keep letterboxed training crops in RAM per loader process (H x W x 3 B each)


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation: the published CLIP-ReIdent defaults (AdamW 4e-5, 1 warm-up epoch, poly decay to 1e-5)."""

    epochs: int = 4
    pairs_per_batch: int = 16  # per process; the global batch is this x world size x accum_steps
    loss: Literal["infonce", "triplet"] = "infonce"
    label_smoothing: float = 0.1
    learn_temperature: bool = True
    triplet_margin: float = 0.3
    lr: float = 4e-5
    min_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    schedule: Literal["polynomial", "cosine", "constant"] = "polynomial"
    poly_power: float = 2.0
    layer_decay: float | None = None
    accum_steps: int = 1
    grad_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    grad_clip: float | None = None
    ema_decay: float | None = None
    max_logit_scale: float | None = None  # optional cap on the learnable temperature (None: not clamped)
    checkpoint_every: int = 500  # optimizer steps between resumable checkpoints (0: only at epoch ends)
    augment: AugmentSpec = field(default_factory=AugmentSpec)


@dataclass(frozen=True)
class TTASpec:
    """Test-time augmentation: views are averaged on L2-normalised features."""

    hflip: bool = True
    scales: tuple[float, ...] = (1.0,)
    batch_size: int = 64


@dataclass(frozen=True)
class Recipe:
    """A whole `models/<name>.yaml`."""

    name: str
    backbone: BackboneSpec
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    tta: TTASpec = field(default_factory=TTASpec)


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe YAML file."""
    return config.load(Recipe, path)
