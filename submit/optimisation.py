"""What the optimiser needs besides the model: AdamW parameter groups (no decay on norms, biases and the
temperature; optional layer-wise LR decay by depth), the epochs' lengths and the LR schedule per step, and the
EMA of the weights."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

_BLOCK = re.compile(r"(?:resblocks|blocks|layers|stages|layer)\.?(\d+)\.")
_STEM = re.compile(r"(?:^|\.)(?:patch_embed|conv1|bn1|stem|cls_token|reg_token|class_embedding|pos_embed|"
                   r"positional_embedding|ln_pre|norm_pre)(?:\.|$)")


def layer_ids(names: Sequence[str]) -> dict[str, int]:
    """Depth of each parameter for layer-wise LR decay: 0 stem/embeddings, 1+i block i, the rest the head."""
    found = {n: _BLOCK.search(n) for n in names}
    blocks = [int(m.group(1)) for m in found.values() if m]
    head = (max(blocks) + 2) if blocks else 1
    return {n: int(m.group(1)) + 1 if m else (0 if _STEM.search(n) else head) for n, m in found.items()}


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """AdamW groups of a `ContrastiveModel`: no decay on norms/biases (ndim < 2) and the temperature (parameters
    named `temperature.*`); each group's `lr_scale` is the layer-wise LR factor (1 without `layer_decay`)."""
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


EXACT_EPOCHS = 100  # `EpochLengths.total` draws at most this many epochs (the rest at their mean)


class EpochLengths:
    """Optimiser steps per epoch, each asked of `length(epoch)` only when needed (and once), so the work of a run
    bounded by `--max-steps` is bounded too, whatever `train.epochs` says (an epoch's length depends on its
    shuffle: drawing one costs a pass over the training rows).

    `total`, the length of the LR schedule: the exact sum over the epochs when there are at most `EXACT_EPOCHS`;
    beyond that, the first `EXACT_EPOCHS` drawn and every later epoch counted at their mean (rounded), since
    drawing them all would take as long as the epochs say (an epoch's length varies by a batch or so, so the
    decay then ends within a few steps of the last one).
    """

    def __init__(self, length: Callable[[int], int], epochs: int) -> None:
        self.length, self.epochs = length, epochs
        self._known: dict[int, int] = {}
        self._total: int | None = None

    def __len__(self) -> int:
        return self.epochs

    def __getitem__(self, epoch: int) -> int:
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} out of range 0..{self.epochs - 1}")
        if epoch not in self._known:
            self._known[epoch] = int(self.length(epoch))
        return self._known[epoch]

    def __iter__(self) -> Iterator[int]:
        return (self[e] for e in range(self.epochs))

    @property
    def total(self) -> int:
        """Steps over all epochs: exact up to `EXACT_EPOCHS` epochs, else extrapolated from the first ones."""
        if self._total is None:
            drawn = [self[e] for e in range(min(self.epochs, EXACT_EPOCHS))]
            rest = self.epochs - len(drawn)
            self._total = sum(drawn) + (round(rest * sum(drawn) / len(drawn)) if rest else 0)
        return self._total


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
        """average = decay x average + (1 - decay) x live, for floating tensors; integer buffers are copied."""
        for ema, live in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.mul_(self.decay).add_(live.detach(), alpha=1 - self.decay)
            else:
                ema.copy_(live)
