"""Contrastive losses on pair batches: symmetric image-to-image InfoNCE (CLIP-ReIdent) and batch-hard triplet.

Every loss takes `(anchors, positives, logit_scale)`: (B, D) features of the local batch, row i of
both being the same player, and no player twice in the batch (the sampler guarantees it, across all
ranks). The loss owns the distributed all-gather: under torch.distributed each rank gathers every
rank's features WITH gradients and computes the loss over the whole global batch, so every rank sees
every negative; DDP's gradient averaging then yields exactly the single-process gradient.

`LOSSES` is the registry: adding a loss is one module (or function) here, one `LOSSES` line (recipes then accept
its name in `train.loss`) and one test against a hand computation in `tests/test_losses.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks in rank order, keeping the gradient path to every rank's slice."""
    if world_size() == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherWithGradient.apply(x)
    return _all_gather(x)


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGradient(torch.autograd.Function):
    """All-gather whose backward hands each rank the gradient of its own slice summed over every rank's loss.

    Ours rather than `torch.distributed.nn.functional.all_gather`: that one is deprecated, and its default
    `group=group.WORLD` is evaluated when the module is first imported, so an import after the process group
    exists keeps that group alive for good (past `destroy_process_group`, until the interpreter exits: the
    teardown abort of issue 24). Every collective here uses the default group as it is at the call."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _all_gather(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # (world x B, D): not the engine's buffer
        dist.all_reduce(grad)  # summed over the ranks' losses: d(sum of losses) / d(every rank's features)
        size = grad.shape[0] // world_size()
        return grad[dist.get_rank() * size:(dist.get_rank() + 1) * size]


class LogitScale(nn.Module):
    """CLIP's learnable temperature, stored as a log; `forward()` returns exp(log) (optionally capped)."""

    def __init__(self, init: float, learn: bool = True, max_scale: float | None = None) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learn)
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        scale = self.log_scale.exp()
        return scale.clamp(max=self.max_scale) if self.max_scale is not None else scale


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE: anchors->positives and positives->anchors cross-entropy with label smoothing."""

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        a = F.normalize(gather_features(anchors).float(), dim=-1)
        p = F.normalize(gather_features(positives).float(), dim=-1)
        logits = logit_scale.float() * a @ p.t()
        labels = torch.arange(len(a), device=a.device)
        forward = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        backward = F.cross_entropy(logits.t(), labels, label_smoothing=self.label_smoothing)
        return (forward + backward) / 2


class TripletLoss(nn.Module):
    """Batch-hard triplet on L2-normalised features (ablation): hardest positive vs hardest negative."""

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        a, p = gather_features(anchors), gather_features(positives)
        x = F.normalize(torch.cat([a, p]).float(), dim=-1)
        labels = torch.arange(len(a), device=x.device).repeat(2)
        dist_mat = (2 - 2 * x @ x.t()).clamp_min(1e-12).sqrt()
        same = labels[:, None] == labels[None, :]
        hardest_pos = dist_mat.masked_fill(~same, float("-inf")).max(dim=1).values
        hardest_neg = dist_mat.masked_fill(same, float("inf")).min(dim=1).values
        return F.relu(hardest_pos - hardest_neg + self.margin).mean()


class LossSettings(Protocol):
    """What a loss builder reads: the recipe's `train` section (`recipe.TrainSpec`) has these fields."""

    @property
    def label_smoothing(self) -> float: ...

    @property
    def triplet_margin(self) -> float: ...


@dataclass(frozen=True)
class Settings:
    """Loss settings given as plain numbers (`build_loss`); the same fields as the recipe's `train` section."""

    label_smoothing: float = 0.1
    triplet_margin: float = 0.3


@dataclass(frozen=True)
class Loss:
    """A registered loss: `build(train)` makes it from the recipe's `train` section; `temperature` says whether it
    uses the learnable temperature (`train.learn_temperature` is ignored for a loss that does not)."""

    build: Callable[[LossSettings], nn.Module]
    temperature: bool


LOSSES: dict[str, Loss] = {  # the names `recipe.train.loss` accepts
    "infonce": Loss(lambda t: InfoNCELoss(t.label_smoothing), temperature=True),
    "triplet": Loss(lambda t: TripletLoss(t.triplet_margin), temperature=False),
}


def build_loss(kind: str, label_smoothing: float = 0.1, margin: float = 0.3) -> nn.Module:
    """The loss named by `recipe.train.loss`, a name in `LOSSES`."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {list(LOSSES)}")
    return LOSSES[kind].build(Settings(label_smoothing=label_smoothing, triplet_margin=margin))
