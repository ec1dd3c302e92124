"""One optimiser step of contrastive fine-tuning, and everything it updates.

`TrainStep` owns the model (embedder + learnable temperature), its DDP wrapper, the loss, AdamW, the AMP
gradient scaler and the EMA: calling it on a batch is one step on one global batch (this rank's share of it). With
`train.accum_steps` > 1 the batch is split into micro-batches whose features are first computed without
gradients (BatchNorm buffers restored afterwards); each micro-batch is then recomputed with gradients while
the cached features of the others stay in the loss, so every pair of the global batch is a negative, as in
open_clip's accum_freq (`accum_steps`: the recipe's, unless the run was resumed on another number of processes,
`run_folder.check_resumable`). The training loop (`training`) and the pre-flight (`preflight`) share it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from submit.device import autocast, needs_scaler
from submit.errors import SubmitError
from submit.losses import LOSSES, LogitScale, build_loss
from submit.optimisation import EMA, param_groups
from submit.recipe import Recipe, TrainSpec

Features = tuple[torch.Tensor, torch.Tensor]  # (anchor features, positive features) of one micro-batch


class ContrastiveModel(nn.Module):
    """The embedder plus the learnable temperature; forward returns both so DDP syncs the temperature too."""

    def __init__(self, embedder: nn.Module, temperature: LogitScale) -> None:
        super().__init__()
        self.embedder = embedder
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder(x), self.temperature()


class Diverged(SubmitError):
    """The loss became nan or inf; the training loop adds where (step, epoch, the checkpoint it keeps)."""

    def __init__(self, value: float) -> None:
        super().__init__(f"training diverged: loss is {value}")
        self.value = value


class TrainStep:
    """Forward/backward (with accumulation over cached negatives), clipping, scaler, AdamW and EMA of one model."""

    def __init__(self, model: ContrastiveModel, criterion: Callable[..., torch.Tensor],
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ema: EMA | None,
                 train: TrainSpec, device: torch.device, ddp: nn.Module | None = None,
                 accum_steps: int | None = None) -> None:
        self.model, self.criterion, self.optimizer, self.scaler, self.ema = model, criterion, optimizer, scaler, ema
        self.train, self.device, self.ddp = train, device, ddp
        self.accum_steps = train.accum_steps if accum_steps is None else accum_steps

    @classmethod
    def build(cls, recipe: Recipe, embedder: nn.Module, device: torch.device, distributed: bool = False,
              accum_steps: int | None = None) -> TrainStep:
        """The recipe's step for `embedder` on `device` (wrapped in DDP when `distributed`); `accum_steps`
        replaces the recipe's accumulation (a run resumed on another number of processes)."""
        t = recipe.train
        if t.grad_checkpointing:
            embedder.set_grad_checkpointing(True)
        learn = t.learn_temperature and LOSSES[t.loss].temperature
        temperature = LogitScale(float(embedder.logit_scale_init), learn=learn, max_scale=t.max_logit_scale)
        model = ContrastiveModel(embedder, temperature).to(device)
        criterion = build_loss(t.loss, t.label_smoothing, t.triplet_margin)
        ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
               if distributed else None)
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay, t.layer_decay), lr=t.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler(device, t.precision))
        ema = EMA(model, t.ema_decay) if t.ema_decay else None
        return cls(model, criterion, optimizer, scaler, ema, t, device, ddp, accum_steps)

    # -- what the loop reads and sets --

    def set_lr(self, lr: float) -> None:
        """The schedule's LR for the next step, times each parameter group's layer-wise scale."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

    @property
    def lr(self) -> float:
        """The LR of the last step (before layer-wise scaling)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group["lr_scale"]

    @property
    def temperature(self) -> float:
        """The current logit scale (1 / temperature)."""
        return float(self.model.temperature().detach())

    @property
    def inference_model(self) -> ContrastiveModel:
        """What validation embeds with and best.pt holds: the EMA weights when enabled, else the live ones."""
        return self.ema.model if self.ema is not None else self.model

    # -- checkpoints --

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries of everything the step updates (weights, EMA, optimiser, scaler)."""
        ema = self.ema.model if self.ema is not None else None
        return {"model": self.model.embedder.state_dict(), "temperature": self.model.temperature.state_dict(),
                "ema": ema.embedder.state_dict() if ema is not None else None,
                "ema_temperature": ema.temperature.state_dict() if ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore `state_dict()`'s entries from a checkpoint (a disabled scaler or a run without EMA skip theirs)."""
        self.model.embedder.load_state_dict(ckpt["model"])
        self.model.temperature.load_state_dict(ckpt["temperature"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.model.embedder.load_state_dict(ckpt["ema"])
            self.ema.model.temperature.load_state_dict(ckpt["ema_temperature"])

    # -- one optimizer step --

    def __call__(self, batch: torch.Tensor) -> float:
        """One optimizer step on this rank's share of one global batch; returns the loss."""
        loss = self.accumulate_gradients(batch)
        self.apply_gradients()
        return loss

    def accumulate_gradients(self, batch: torch.Tensor) -> float:
        """Forward/backward of this rank's (P x accum, 2, 3, H, W) pairs into .grad; returns the loss.

        With accum_steps > 1, a first pass embeds every micro-batch without gradients; each micro-batch is
        then recomputed with gradients while the cached features of the others stay in the loss, so the
        negatives (and the gradient) are those of the whole effective batch, as in open_clip's accum_freq.
        """
        micro = batch.to(self.device, non_blocking=True).chunk(self.accum_steps)
        if self.accum_steps == 1:
            return self._micro_step(micro[0], None, 0, sync=True)
        cached = self.cached_features(micro)
        losses = [self._micro_step(pairs, cached, m, sync=m == len(micro) - 1) for m, pairs in enumerate(micro)]
        return losses[0]

    def apply_gradients(self) -> None:
        """Clip (optional, unscaled first), step the optimizer through the scaler, clear grads, update the EMA."""
        if self.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    @torch.no_grad()
    def cached_features(self, micro: Sequence[torch.Tensor]) -> list[Features]:
        """First accumulation pass: features of every micro-batch without gradients (BN statistics untouched)."""
        buffers = {k: v.clone() for k, v in self.model.embedder.named_buffers()}
        out = [self._forward(pairs, grad=False)[:2] for pairs in micro]
        for name, value in self.model.embedder.named_buffers():
            value.copy_(buffers[name])
        return out

    def _forward(self, pairs: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, 2, 3, H, W) pairs -> anchor features, positive features, logit scale (through DDP when `grad`)."""
        n = len(pairs)
        images = torch.cat([pairs[:, 0], pairs[:, 1]])
        module = self.ddp if (grad and self.ddp is not None) else self.model
        with autocast(self.device, self.train.precision):
            feats, scale = module(images)
        return feats[:n], feats[n:], scale

    def _micro_step(self, pairs: torch.Tensor, cached: list[Features] | None, index: int, sync: bool) -> float:
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
                raise Diverged(value)
            self.scaler.scale(loss).backward()
        return value
