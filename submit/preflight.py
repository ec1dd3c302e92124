"""Pre-flight for a training recipe: build the tower, run a few real optimiser steps on random crops, report.

`dry_run` answers "will this recipe fit, and how long will it take?" before hours on a rented GPU. It uses the
training loop's own step (`train_step.TrainStep`: the recipe's micro-batch, accumulation with cached
negatives, precision and gradient scaler, clipping, gradient checkpointing, EMA) on random crops at the
recipe's image size, and writes nothing. Weights are the real ones when cached, else random (same cost).

Peak memory: on CUDA the peak allocated by tensors (`torch.cuda.max_memory_allocated`); on CPU the process's
peak resident set (`ru_maxrss`: the whole process, Python and torch included). The `--memory` verdict on CUDA
counts what the device must hold: the allocator's peak reserved (cached blocks included) plus what was in use
on the device before the build (the CUDA context, other processes), measured, not assumed. The memory advice is an
estimate: activations (peak minus weights, gradients, AdamW state, EMA and the memory before the build) scale
with the micro-batch, so a smaller `train.pairs_per_batch` with a larger `train.accum_steps` keeps the global
batch (every negative, through the cached features) at a proportionally smaller peak.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import sys
import time
from pathlib import Path

import torch

from submit.backbones import build_embedder
from submit.device import amp_dtype, pick_device, precision_note
from submit.errors import SubmitError
from submit.manifest import read_manifest
from submit.optimisation import EpochLengths
from submit.recipe import Recipe
from submit.sampler import PairBatchSampler
from submit.train_data import make_splits
from submit.train_step import TrainStep
from submit.weights import locate

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What a dry run measured: size, memory, speed, the whole recipe's estimated time and the fit verdict."""

    recipe: str
    backbone: str
    device: str
    precision: str  # the autocast dtype actually used ("fp32" when none)
    weights: str  # "random" or the checkpoint file used
    params: int
    trainable: int
    image_size: tuple[int, int]
    pairs_per_batch: int
    accum_steps: int
    grad_checkpointing: bool
    steps: int
    seconds_per_step: float
    images_per_s: float
    peak_memory: int  # bytes
    memory_kind: str  # what `peak_memory` counts
    static_memory: int  # bytes of weights + gradients + AdamW state (+ EMA): independent of the batch
    total_steps: int | None = None  # with data: the recipe's optimiser steps over all epochs (EpochLengths.total)
    estimated_seconds: float | None = None
    budget: int | None = None  # bytes, from --memory
    fits: bool | None = None
    needed_memory: int = 0  # bytes the verdict counts: the CPU peak, or on CUDA peak reserved + in use before
    advice: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def dry_run(recipe: Recipe, device: str | None = None, steps: int = 3, data_dir: str | Path | None = None,
            memory_gib: float | None = None) -> Preflight:
    """Run `steps` optimiser steps of `recipe` on random crops; measure parameters, peak memory and speed."""
    if steps < 1:
        raise SubmitError(f"--steps {steps}: expected at least 1")
    if memory_gib is not None and not (memory_gib > 0 and math.isfinite(memory_gib)):
        raise SubmitError(f"--memory {memory_gib}: expected a positive number of GiB")
    dev = pick_device(device)
    total_steps = _recipe_steps(recipe, data_dir) if data_dir is not None else None  # bad data fails first
    before = _resident() if dev.type == "cpu" else _device_in_use(dev)
    embedder, weights, notes = _build(recipe)
    if note := precision_note(dev, recipe.train.precision):
        notes.append(note)
    step = TrainStep.build(recipe, embedder, dev)  # the loop's own step: same model, loss, optimiser, scaler, EMA
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = _time_steps(step, recipe, dev, steps)
    peak, kind = _peak(dev)
    params = sum(p.numel() for p in step.model.parameters())
    trainable = sum(p.numel() for p in step.model.parameters() if p.requires_grad)
    static = _static_bytes(step)
    per_step = sum(times[1:]) / (len(times) - 1) if len(times) > 1 else times[0]
    if len(times) == 1:
        notes.append("one step timed, warm-up included: pass --steps 2 or more for a steady figure")
    t = recipe.train
    images = 2 * t.pairs_per_batch * t.accum_steps
    budget = int(memory_gib * GIB) if memory_gib is not None else None
    need = peak if dev.type == "cpu" else before + int(torch.cuda.max_memory_reserved(dev))
    fits = None if budget is None else need <= budget
    advice = () if budget is None or fits else _advice(recipe, need, static, before, budget)
    if budget is not None and dev.type == "cuda":
        notes.append(f"the fit verdict counts {need / GIB:.2f} GiB: the allocator's peak reserved plus "
                     f"{before / GIB:.2f} GiB in use on the device before the build (CUDA context, other processes)")
    dtype = amp_dtype(dev, t.precision)
    return Preflight(
        recipe=recipe.name, backbone=recipe.backbone.name, device=str(dev),
        precision=str(dtype).removeprefix("torch.") if dtype is not None else "fp32", weights=weights,
        params=params, trainable=trainable, image_size=tuple(embedder.input_size), pairs_per_batch=t.pairs_per_batch,
        accum_steps=t.accum_steps, grad_checkpointing=t.grad_checkpointing, steps=steps, seconds_per_step=per_step,
        images_per_s=images / max(per_step, 1e-12), peak_memory=peak, memory_kind=kind, static_memory=static,
        total_steps=total_steps, estimated_seconds=None if total_steps is None else total_steps * per_step,
        budget=budget, fits=fits, needed_memory=need, advice=advice, notes=tuple(notes))


def _build(recipe: Recipe) -> tuple[torch.nn.Module, str, list[str]]:
    """The recipe's tower with its real weights when they are on this machine, else random (with a note)."""
    spec = recipe.backbone
    loc = locate(spec.name, spec.pretrained)
    torch.manual_seed(recipe.seed)
    if loc.kind == "none":
        return build_embedder(spec, load_weights=False), "random", []
    if loc.path is None:
        fetch = ("the real run needs that file: check the path" if loc.kind == "file"
                 else "`reident-submit weights fetch` gets them")
        note = (f"weights {spec.pretrained!r} are not on this machine: random initialisation (same size and speed; "
                f"{fetch})")
        return build_embedder(spec, load_weights=False), "random", [note]
    return build_embedder(spec), str(loc.path), []


def _time_steps(step: TrainStep, recipe: Recipe, dev: torch.device, steps: int) -> list[float]:
    """Seconds of each optimiser step on a fresh random global batch of the recipe's geometry."""
    t = recipe.train
    h, w = step.model.embedder.input_size
    gen = torch.Generator().manual_seed(recipe.seed)
    times = []
    step.model.train()
    for _ in range(steps):
        batch = torch.rand(t.pairs_per_batch * t.accum_steps, 2, 3, h, w, generator=gen)
        start = time.perf_counter()
        step(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    return times


def _recipe_steps(recipe: Recipe, data_dir: str | Path) -> int:
    """The optimiser steps of the whole recipe on DATA_DIR's training rows (one process), counted as the loop
    counts them (`EpochLengths.total`: bounded work whatever `train.epochs` says)."""
    t = recipe.train
    splits = make_splits(read_manifest(data_dir), recipe.data, recipe.seed)
    sampler = PairBatchSampler(splits.train["pid"].tolist(), t.pairs_per_batch * t.accum_steps, 1, 0, recipe.seed)
    lengths = EpochLengths(lambda e: len(sampler.global_batches(e)), t.epochs)
    if lengths[0] == 0:
        raise SubmitError(f"{data_dir}: the global batch needs {sampler.global_pairs} distinct identities with >= 2 "
                          f"images, the training rows have {len(sampler.groups)}")
    return lengths.total


def _peak(dev: torch.device) -> tuple[int, str]:
    """Peak memory in bytes and what it counts."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev)), "CUDA peak allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "CPU peak resident (whole process)"


def _device_in_use(dev: torch.device) -> int:
    """Bytes in use on CUDA device `dev` now, by anything: this process's context and tensors, other processes."""
    free, total = torch.cuda.mem_get_info(dev)
    return int(total - free)


def _resident() -> int:
    """This process's resident memory now, in bytes (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0


def _static_bytes(step: TrainStep) -> int:
    """Weights + gradients + AdamW moments (+ EMA copy): the part of the peak that no batch change removes."""
    weights = sum(p.numel() * p.element_size() for p in step.model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in step.model.parameters() if p.requires_grad)
    return weights + 3 * trainable + (weights if step.ema is not None else 0)


def _advice(recipe: Recipe, peak: int, static: int, before: int, budget: int) -> tuple[str, ...]:
    """Changes that would bring the peak under `budget`: smaller micro-batch with accumulation, checkpointing."""
    t = recipe.train
    activations = max(peak - static - before, 0)
    out = []
    if static + before > budget:
        out.append(f"weights, gradients and optimiser state alone take {static / GIB:.2f} GiB"
                   f"{f' (+{before / GIB:.2f} GiB before the build)' if before else ''}: no batch change fits "
                   f"{budget / GIB:.2f} GiB; use a smaller backbone or a larger device")
        return tuple(out)
    for pairs in sorted((d for d in range(1, t.pairs_per_batch) if t.pairs_per_batch % d == 0), reverse=True):
        estimate = before + static + activations * pairs / t.pairs_per_batch
        if estimate <= budget:
            accum = t.accum_steps * t.pairs_per_batch // pairs
            out.append(f"--set train.pairs_per_batch={pairs} --set train.accum_steps={accum}: same global batch "
                       f"(every negative kept), estimated peak {estimate / GIB:.2f} GiB")
            break
    if not t.grad_checkpointing:
        out.append("--set train.grad_checkpointing=true: recomputes each block's activations in the backward "
                   "(typically several times less activation memory, ~30% slower); re-run --dry-run to measure")
    if not out:
        out.append(f"even 1 pair per micro-batch is estimated above {budget / GIB:.2f} GiB; use a smaller "
                   "backbone or image size, or a larger device")
    return tuple(out)
