"""The model recipe (`models/*.yaml`): one fine-tuned backbone, how to train it and how to embed with it;
`apply_overrides`, the `--set KEY=VALUE` edits re-validated like the YAML."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from submit import config
from submit.config import bounded, probability, registered
from submit.errors import SubmitError
from submit.space import Param, choice, floats, integers


@dataclass(frozen=True)
class BackboneSpec:
    """Which image tower, which weights, and which embedding it exposes."""

    name: str  # "open_clip:<model>" or "timm:<model>"
    pretrained: str | None = None  # open_clip tag, "hf-hub:<org>/<repo>", or a local checkpoint file
    embedding: Literal["projected", "token"] = "projected"  # CLIP projection output or pre-projection token
    image_size: tuple[int, int] | None = bounded(None, ge=1)  # (height, width); None = the model's native size
    mean: tuple[float, float, float] | None = None  # None = the model's own normalisation
    std: tuple[float, float, float] | None = bounded(None, gt=0)


@dataclass(frozen=True)
class AugmentSpec:
    """Pair augmentation; `hflip` flips anchor and positive together, as the published recipe did."""

    hflip: float = probability(0.5)
    random_erasing: float = probability(0.0)
    sharpen: float = probability(0.0)
    color_jitter: float = bounded(0.0, ge=0.0)  # jitter strength (brightness/contrast/saturation)


@dataclass(frozen=True)
class DataSpec:
    """Which manifest rows train: the train split, train+test ('all'), or k-fold by identity groups."""

    split: Literal["train", "all", "kfold"] = "train"
    folds: int = bounded(10, ge=2)
    fold: int = bounded(0, ge=0)
    workers: int = bounded(2, ge=0)
    cache_images: bool = False  # keep letterboxed training crops in RAM per loader process (H x W x 3 B each)


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation: the published CLIP-ReIdent defaults (AdamW 4e-5, 1 warm-up epoch, poly decay to 1e-5)."""

    epochs: int = bounded(4, ge=1)
    pairs_per_batch: int = bounded(16, ge=1)  # per process; the global batch is this x world size x accum_steps
    loss: str = registered("infonce", lambda: _losses())  # a name in losses.LOSSES
    label_smoothing: float = bounded(0.1, ge=0.0, lt=1.0)
    learn_temperature: bool = True
    triplet_margin: float = bounded(0.3, ge=0.0)
    lr: float = bounded(4e-5, gt=0.0)
    min_lr: float = bounded(1e-5, ge=0.0)
    weight_decay: float = bounded(0.01, ge=0.0)
    warmup_epochs: float = bounded(1.0, ge=0.0)
    schedule: Literal["polynomial", "cosine", "constant"] = "polynomial"
    poly_power: float = bounded(2.0, gt=0.0)
    layer_decay: float | None = bounded(None, gt=0.0, le=1.0)
    accum_steps: int = bounded(1, ge=1)
    grad_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    grad_clip: float | None = bounded(None, gt=0.0)
    ema_decay: float | None = bounded(None, ge=0.0, lt=1.0)
    max_logit_scale: float | None = bounded(None, gt=0.0)  # optional cap on the learnable temperature (None: none)
    checkpoint_every: int = bounded(500, ge=0)  # optimizer steps between resumable checkpoints (0: only at epoch ends)
    augment: AugmentSpec = field(default_factory=AugmentSpec)


@dataclass(frozen=True)
class TTASpec:
    """Test-time augmentation: views are averaged on L2-normalised features."""

    hflip: bool = True
    scales: tuple[float, ...] = bounded((1.0,), gt=0.0)
    batch_size: int = bounded(64, ge=1)


@dataclass(frozen=True)
class Recipe:
    """A whole `models/<name>.yaml`."""

    name: str
    backbone: BackboneSpec
    seed: int = bounded(0, ge=0, le=2**32 - 1)  # numpy generators refuse negative seeds
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    tta: TTASpec = field(default_factory=TTASpec)


def _losses() -> dict:
    """The loss registry, imported when a recipe names a loss (it needs torch; loading a recipe otherwise does not)."""
    from submit.losses import LOSSES  # lazy for start-up: losses imports torch

    return LOSSES


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe YAML file."""
    return config.load(Recipe, path)


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


def override(key: str, value: Any) -> str:
    """The `KEY=VALUE` override (`apply_overrides`, a member's `train.overrides`) that sets `key` to `value`."""
    return f"{key}={json.dumps(value)}"  # JSON text is YAML flow text: numbers, lists, strings, booleans


def has_key(key: str) -> bool:
    """Whether `key` (`train.lr`, `backbone.image_size`) names one value of a recipe, not a section."""
    node: Any = Recipe
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return False
        node = hints[part]
    return not dataclasses.is_dataclass(node)


def train_space(recipe: Recipe) -> dict[str, Param]:
    """What `tune --train-space` searches in a member's recipe by default: epochs (half to twice the recipe's),
    the learning rate (a quarter to four times, log scale) and, where the recipe fixes the input size, that size
    at 0.8x, 1x and 1.2x (multiples of 16)."""
    epochs, lr = recipe.train.epochs, recipe.train.lr
    space = {"train.epochs": integers(max(1, epochs // 2), max(2, 2 * epochs)),
             "train.lr": floats(lr / 4, lr * 4, log=True)}
    if recipe.backbone.image_size is not None:
        sizes = [[max(16, round(side * scale / 16) * 16) for side in recipe.backbone.image_size]
                 for scale in (0.8, 1.0, 1.2)]
        space["backbone.image_size"] = choice([s for i, s in enumerate(sizes) if s not in sizes[:i]])
    return space


def _yaml_value(raw: str, where: str, key: str) -> Any:
    """A YAML scalar/list, with `1e-4`-style numbers read as floats (YAML 1.1 would keep them strings)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise SubmitError(f"{where}: key {key!r}: value {raw!r} is not valid YAML") from None
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
        return float(value)
    return value
