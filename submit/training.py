"""CLIP-ReIdent fine-tuning: pair batches -> image tower -> symmetric InfoNCE, with resumable checkpoints and DDP.

This module is the loop: `train` (the entry point), `_Trainer` (builds a run, resumes and saves it, runs its
epochs, validates at each epoch end) around `train_step.TrainStep` (one optimiser step: accumulation with
cached negatives, AMP and the gradient scaler, clipping, EMA). Its pieces live beside it: `train_data` (splits,
pair dataset), `optimisation` (parameter groups, LR schedule, EMA), `distributed` (ranks, gathering, CPU
threads), `run_folder` (what RUN_DIR holds and the training state it saves), `embedding` (validation features).

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
so keep the global batch (or retune lr) when moving between 1 GPU and several. A run resumed on another number
of processes keeps its global batch by itself: P processes x accumulation A continue on P' processes with
accumulation P x A / P' (refused when that is not a whole number; `run_folder.check_resumable`), on the same
pairs in every step; last.pt records the accumulation the run last trained with.

Distributed: launched by `torchrun`, `train` reads WORLD_SIZE/RANK/LOCAL_RANK, joins the process group
(nccl on CUDA, gloo on CPU), wraps the model in DistributedDataParallel, shards the sampler by rank,
validates on every rank (each embeds a shard with the unwrapped model, features are all-gathered, so
no rank waits at a barrier while another runs a wrapped forward) and writes files on rank 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from submit import config, locks, reporting
from submit.backbones import build_embedder
from submit.device import pick_device, precision_note
from submit.distributed import (
    DistInfo,
    Stopped,
    StopSignals,
    cpu_threads,
    gather_objects,
    init_distributed,
    launch_id,
    release_group,
    restart_count,
)
from submit.embedding import embed_views
from submit.ensembling import load_spec, member_recipe
from submit.errors import SubmitError, loader_errors
from submit.manifest import fingerprint, read_manifest
from submit.metrics import METRIC_KEYS, evaluate_distances
from submit.optimisation import EpochLengths, LRSchedule
from submit.progress import progress_bar
from submit.recipe import Recipe, apply_overrides, load_recipe  # noqa: F401 - tests build recipes through training
from submit.reranking import cosine_distance
from submit.run_folder import (  # noqa: F401
    FORMAT,
    TrainState,
    check_resumable,
    load_checkpoint,
    recorded_manifest,
    resumed_layout,
    rng_state,
    save_atomic,
    set_rng_state,
    write_metrics,
    write_recipe,
)
from submit.sampler import PairBatchSampler
from submit.train_data import PairDataset, make_splits
from submit.train_step import Diverged, TrainStep
from submit.trained import load_trained  # noqa: F401 - training's old public name

IDENTITY_VIEW = [(1.0, False)]  # validation embeds each crop once: letterboxed, unflipped, no cache


def _seed_all(seed: int) -> None:
    """Seed python, numpy and torch (model initialisation, then per-rank randomness such as dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng(saved: list[dict], info: DistInfo, seed: int, step: int) -> bool:
    """Restore this rank's saved generators when the run had this world size (True). On another world size the
    saved states belong to other ranks: seed afresh from (seed, rank, step), so the resumed run neither replays
    a fresh run's first draws nor differs between two such resumes (False)."""
    if len(saved) == info.world_size:
        set_rng_state(saved[info.rank])
        return True
    _seed_all(int(np.random.SeedSequence([seed, info.rank, step]).generate_state(1)[0]))
    return False


def validate(embedder: nn.Module, root: str | Path, query: pd.DataFrame, gallery: pd.DataFrame,
             device: torch.device, precision: str, info: DistInfo, batch_size: int = 64,
             workers: int = 0) -> dict[str, float]:
    """Test-split metrics with cosine distance; each rank embeds a shard, then every rank computes the same result.

    Features come from the predictor's embedder (`embedding.embed_views`) with the identity view only and no
    cache, the model kept as training left it (`in_training`)."""
    rows = pd.concat([query, gallery])
    shard = np.array_split(np.arange(len(rows)), info.world_size)[info.rank]
    feats = embed_views(embedder, root, rows.iloc[shard], IDENTITY_VIEW, batch_size, device, workers, precision,
                        progress=False, in_training=True)
    feats = np.concatenate(gather_objects(feats, info))
    q, g = feats[:len(query)], feats[len(query):]
    result = evaluate_distances(cosine_distance(q, g), query["pid"].to_numpy(), gallery["pid"].to_numpy())
    return {k: float(result[k]) for k in METRIC_KEYS}


# ---- the training loop ------------------------------------------------------------------------------


class _Trainer:
    """One training run: its data, its `TrainStep` and its `TrainState`; runs epochs, validates, saves (rank 0)."""

    def __init__(self, recipe: Recipe, data_dir: Path, out_dir: Path, device: torch.device, info: DistInfo,
                 resume_from: Path | None = None) -> None:
        """A new run, or with `resume_from` the run its last.pt holds (checked first: same recipe, data and global
        batch, whose accumulation on this world size the sampler and the step are built with)."""
        self.recipe, self.data_dir, self.out_dir, self.device, self.info = recipe, data_dir, out_dir, device, info
        manifest = read_manifest(data_dir)
        self.manifest = fingerprint(manifest)  # recorded in checkpoints and metrics.json
        ckpt = None if resume_from is None else self._resumable(resume_from)
        self.resumed_from: tuple[int, int] | None = None if ckpt is None else resumed_layout(ckpt)
        self.accum_steps = recipe.train.accum_steps if ckpt is None else ckpt["accum_now"]
        self.splits = make_splits(manifest, recipe.data, recipe.seed)
        _seed_all(recipe.seed)
        embedder = build_embedder(recipe.backbone)
        self.train_step = TrainStep.build(recipe, embedder, device, distributed=info.world_size > 1,
                                          accum_steps=self.accum_steps)
        self.sampler = self._sampler()
        # drawn per epoch when needed: a run bounded by --max-steps draws only the epochs it reaches
        self.steps_per_epoch = EpochLengths(lambda e: len(self.sampler.global_batches(e)), recipe.train.epochs)
        self.schedule = self._schedule()
        self.loader = self._loader(embedder)
        self.state = TrainState()
        self.reporter: reporting.Reporter = reporting.NullReporter()  # `train` sets the --report-to one
        self.signals = StopSignals()  # `train` sets the one holding the signal handlers
        self.on_epoch: Callable[[dict, int], bool] | None = None  # `train`'s hook: True stops after this epoch
        self.stopped_early = False
        self._epoch_start = time.perf_counter()
        _seed_all(recipe.seed + 1000 * info.rank)  # per-rank randomness (dropout) from here on
        if ckpt is not None:
            self._restore(ckpt)

    def _sampler(self) -> PairBatchSampler:
        """This rank's pair batches of the training rows (global batch: pairs x accumulation x world size)."""
        t = self.recipe.train
        return PairBatchSampler(self.splits.train["pid"].tolist(), t.pairs_per_batch * self.accum_steps,
                                self.info.world_size, self.info.rank, self.recipe.seed)

    def _schedule(self) -> LRSchedule:
        """The LR per optimizer step over the recipe's epochs (`EpochLengths.total`); refuses a batch the identities
        cannot fill."""
        t = self.recipe.train
        if self.steps_per_epoch[0] == 0:
            raise SubmitError(
                f"recipe: key 'train.pairs_per_batch': the global batch needs {self.sampler.global_pairs} distinct "
                f"identities with >= 2 images, the training rows have {len(self.sampler.groups)}")
        return LRSchedule(t.lr, t.min_lr, round(t.warmup_epochs * self.steps_per_epoch[0]),
                          self.steps_per_epoch.total, t.schedule, t.poly_power)

    def _loader(self, embedder: nn.Module) -> DataLoader:
        """Augmented crop pairs in the sampler's order, decoded by `data.workers` processes."""
        t, workers = self.recipe.train, self.recipe.data.workers
        h, w = embedder.input_size
        images = PairDataset(self.data_dir, self.splits.train["path"].tolist(), (int(h), int(w)),
                             tuple(embedder.mean), tuple(embedder.std), t.augment, self.recipe.data.cache_images)
        return DataLoader(images, batch_sampler=self.sampler, num_workers=workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(self.recipe.seed))

    def end_workers(self) -> None:
        """Drop the loader, so its persistent workers end here. The trainer may sit in a reference cycle: freed
        by a later garbage collection, the loader could be freed inside a process forked meanwhile (a worker of
        the next run's or the embedder's loader), whose check fails there ('can only test a child process')."""
        del self.loader

    # -- checkpoints --

    def resume(self, path: Path) -> None:
        """Restore the full training state from `last.pt` (same recipe, data and global batch, and the
        accumulation this trainer was built with: a change of world size is resumed by `resume_from`)."""
        ckpt = self._resumable(path)
        if ckpt["accum_now"] != self.accum_steps:
            raise SubmitError(f"{path}: keeping its global batch needs accumulation {ckpt['accum_now']} on "
                              f"{self.info.world_size} process(es); this trainer was built with {self.accum_steps}")
        self._restore(ckpt)

    def _resumable(self, path: Path) -> dict:
        """last.pt, checked against this launch (`check_resumable`), with `accum_now`: the accumulation steps
        that keep its global batch on this world size."""
        ckpt = load_checkpoint(path)
        ckpt["accum_now"] = check_resumable(ckpt, path, self.recipe, self.manifest, self.data_dir,
                                            self.info.world_size)
        return ckpt

    def _restore(self, ckpt: dict) -> None:
        """Load the step's weights and optimiser, the loop state and this rank's generators (`restore_rng`)."""
        self.train_step.load_state_dict(ckpt)
        self.state = TrainState.from_checkpoint(ckpt)
        restore_rng(ckpt["rng"], self.info, self.recipe.seed, self.state.step)

    def save_last(self) -> None:
        """Write the resumable checkpoint (RNG states gathered from every rank; rank 0 writes)."""
        rngs = gather_objects(rng_state(), self.info)
        if not self.info.main:
            return
        self.reporter.flush()  # the event files hold every step this checkpoint covers (a resume purges the rest)
        s = self.state
        obj = {
            "format": FORMAT, "kind": "last", "recipe": config.to_mapping(self.recipe), "manifest": self.manifest,
            **self.train_step.state_dict(), "schedule": dataclasses.asdict(self.schedule), **s.to_checkpoint(),
            "sampler": {"seed": self.sampler.seed, "epoch": s.epoch, "position": s.batch_in_epoch,
                        "global_pairs": self.sampler.global_pairs, "accum_steps": self.accum_steps},
            "rng": rngs, "world_size": self.info.world_size,
            "launch": launch_id(),  # which torchrun job wrote it: a restart of that job resumes it (`_resuming`)
        }
        save_atomic(obj, self.out_dir / "last.pt")

    def save_best(self, row: dict) -> None:
        """Write the inference checkpoint (EMA weights when enabled)."""
        if not self.info.main:
            return
        source = self.train_step.inference_model
        save_atomic({"format": FORMAT, "kind": "best", "recipe": config.to_mapping(self.recipe),
                     "manifest": self.manifest, "model": source.embedder.state_dict(),
                     "temperature": source.temperature.state_dict(), "metrics": row}, self.out_dir / "best.pt")

    # -- epochs --

    def run(self, max_steps: int | None, progress: bool) -> None:
        """Train from the current state until the recipe's epochs (or `max_steps`) are done.

        The epochs end the run (the schedule's total may be an estimate, `EpochLengths.total`); `max_steps` ends it
        mid-epoch with a partial validation, unless that step is validated already (a resumed run that
        `--max-steps` stopped there: nothing to do, and no row twice)."""
        s = self.state
        stop = max_steps if max_steps is not None else math.inf
        bar = _progress(progress and self.info.main)
        with bar:
            task = bar.add_task("train", total=min(self.steps_per_epoch.total, stop), completed=s.step,
                                loss=float("nan"), lr=0.0, temp=self.train_step.temperature, ips=0.0)
            while s.step < stop and s.epoch < self.recipe.train.epochs and not self.stopped_early:
                self._run_epoch(stop, bar, task)
        validated = bool(s.history) and s.history[-1]["step"] == s.step
        if s.batch_in_epoch and s.step >= stop and not validated:
            self._end_epoch(partial=True)

    def _run_epoch(self, stop: float, bar: Any, task: Any) -> None:
        """The rest of the current epoch (or up to `stop`), checkpointing every `train.checkpoint_every` steps."""
        s, every = self.state, self.recipe.train.checkpoint_every
        self.sampler.set_epoch(s.epoch, start=s.batch_in_epoch)
        tick = time.perf_counter()
        if s.batch_in_epoch == 0:
            self._epoch_start = tick
        step_s: float | None = None
        for batch in self.loader:
            loss, lr = self._optimizer_step(batch)
            now = time.perf_counter()
            step_s = now - tick if step_s is None else 0.9 * step_s + 0.1 * (now - tick)  # smoothed for display
            tick = now
            self._report_step(loss, lr, 2 * self.sampler.global_pairs / max(step_s, 1e-9), bar, task)
            if s.step >= stop:
                if s.batch_in_epoch < self.steps_per_epoch[s.epoch]:
                    return
                break
            if every and s.step % every == 0 and s.batch_in_epoch < self.steps_per_epoch[s.epoch]:
                self.save_last()  # (not after an epoch's last batch: the epoch's end checkpoints next)
            self._stop_if_signalled()
        self._end_epoch(partial=False)

    def _stop_if_signalled(self) -> None:
        """At a step boundary: when any rank received a stop signal (every rank learns it from the same
        all-reduce, `StopSignals.agreed`), save last.pt and raise `Stopped` on every rank together."""
        signum = self.signals.agreed(self.info, self.device)
        if signum:
            self.save_last()
            raise Stopped(signum, self.state.step, self.info.main)

    def _optimizer_step(self, batch: torch.Tensor) -> tuple[float, float]:
        """One step at the schedule's LR, counted in the state; returns (loss, lr). Divergence names the step."""
        s = self.state
        lr = self.schedule(s.step)
        self.train_step.set_lr(lr)
        try:
            loss = self.train_step(batch)
        except Diverged as exc:
            raise SubmitError(f"{exc} at step {s.step + 1} (epoch {s.epoch + 1}); the last good checkpoint is "
                              f"kept in {self.out_dir / 'last.pt'}") from None
        s.step += 1
        s.batch_in_epoch += 1
        s.loss_sum += loss
        s.loss_count += 1
        return loss, lr

    def _report_step(self, loss: float, lr: float, ips: float, bar: Any, task: Any) -> None:
        """The progress bar, the reporter's per-step curves and the `on_step` hook."""
        temp = self.train_step.temperature
        bar.update(task, advance=1, loss=loss, lr=lr, temp=temp, ips=ips)
        self.reporter.step(self.state.step, {"loss": loss, "lr": lr, "temperature": temp, "images_per_s": ips})
        self.on_step(self.state.step)

    def on_step(self, step: int) -> None:
        """Hook called after every optimizer step (tests slow runs down here to kill them mid-way)."""

    def _end_epoch(self, partial: bool) -> None:
        """Validate, record the row, write best.pt (on a new best mAP), the metrics files and the curves, then
        last.pt. The checkpoint comes last: a kill before it is redone by a resume from the previous checkpoint,
        and everything it covers (best.pt, metrics, the flushed event files) is on disk once it is written, so a
        resumed run leaves what an uninterrupted one leaves (no validation lost, none twice)."""
        s = self.state
        row = self._epoch_row()
        is_best = self.splits.query is None or row["mAP"] > s.best_map
        if is_best and row["mAP"] is not None:
            s.best_map = row["mAP"]
        s.history.append(row)
        if not partial:
            s.epoch, s.batch_in_epoch, s.loss_sum, s.loss_count = s.epoch + 1, 0, 0.0, 0
        if is_best:
            self.save_best(row)
        if self.info.main:
            write_metrics(self.out_dir, s.history, {"recipe": self.recipe.name, "manifest": self.manifest,
                                                    "validation": self.splits.note,
                                                    "world_size": self.info.world_size,
                                                    "accum_steps": self.accum_steps,
                                                    "global_batch_pairs": self.sampler.global_pairs})
            self.reporter.validation(row)
        self.save_last()
        if self.info.main:
            _log(_row_text(row, partial))
        if not partial and self.on_epoch is not None:
            hook = self.on_epoch
            epochs = self.recipe.train.epochs
            self.stopped_early = bool(_on_main(lambda: hook(row, epochs), self.info))  # rank 0 asks; all hear

    def _epoch_row(self) -> dict[str, Any]:
        """The epoch's metrics row: mean loss, LR, temperature, images/s, seconds and the validation scores."""
        s, recipe = self.state, self.recipe
        seconds = time.perf_counter() - self._epoch_start
        row: dict[str, Any] = {
            "epoch": s.epoch + 1, "step": s.step, "loss": s.loss_sum / max(1, s.loss_count),
            "lr": self.train_step.lr, "temperature": self.train_step.temperature,
            "images_per_s": 2 * self.sampler.global_pairs * s.batch_in_epoch / max(seconds, 1e-9),
            "seconds": seconds, **{k: None for k in METRIC_KEYS}}
        if self.splits.query is not None and self.splits.gallery is not None:
            row.update(validate(self.train_step.inference_model.embedder, self.data_dir, self.splits.query,
                                self.splits.gallery, self.device, recipe.train.precision, self.info,
                                recipe.tta.batch_size, recipe.data.workers))
        return row


def _progress(enabled: bool) -> Any:
    """The training progress bar (loss, LR, temperature, images/s); silent when disabled or not a terminal."""
    return progress_bar(enabled, "loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} "
                                 "temp {task.fields[temp]:.1f} {task.fields[ips]:.0f} img/s", tty_only=True)


def _log(text: str) -> None:
    """A line for the user through `logging` (logger `submit.training`, INFO): the CLI prints it on stderr,
    a library caller or a notebook sees it only when it configures logging."""
    logging.getLogger(__name__).info(text)


def _row_text(row: dict, partial: bool) -> str:
    """An epoch's log line."""
    score = (f" mAP {row['mAP']:.4f} rank1 {row['rank1']:.4f}" if row.get("mAP") is not None else "")
    tag = " (stopped mid-epoch)" if partial else ""
    return (f"epoch {row['epoch']}{tag} step {row['step']}: loss {row['loss']:.4f} temp {row['temperature']:.1f} "
            f"{row['images_per_s']:.1f} img/s{score}")


# ---- the entry point --------------------------------------------------------------------------------


RESUME_MODES = (False, True, "auto")  # train(resume=...): a new run, continue last.pt, continue it if it exists


def train(recipe: Recipe, data_dir: str | Path, out_dir: str | Path, resume: bool | str = False,
          device: str | None = None, max_steps: int | None = None, progress: bool = True,
          report_to: Sequence[str] = reporting.DEFAULT, on_epoch: Callable[[dict, int], bool] | None = None) -> dict:
    """Fine-tune `recipe` on DATA_DIR's manifest into run dir `out_dir`; returns a summary dict.

    `resume`: False starts a new run (refused when OUT holds one), True continues `out_dir/last.pt` (refused
    when there is none; same recipe, `train.epochs` may grow), "auto" continues it when it exists and starts a
    new run when not. A worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) continues the last.pt
    its own job wrote even without `resume`. Every other refusal (another recipe, other data, another global
    batch) holds in every mode. `max_steps` stops after that many optimizer steps in total (the LR schedule
    still follows the recipe's epochs). `report_to` names where curves go besides metrics.csv
    (`reporting.TARGETS`; default TensorBoard in OUT/tb). `on_epoch(row, epochs)` is called (on rank 0) after
    each whole epoch's checkpoint with its metrics row and the run's number of epochs; True stops the run there
    (`stopped_early` in the summary): `tune --train-space` prunes poor runs this way.
    Under torchrun (WORLD_SIZE > 1) this joins the process group and trains with DDP; the group is destroyed,
    its threads with it, before this returns or raises (`distributed.release_group`).
    SIGTERM, SIGUSR1 and a first SIGINT (in the main thread) save last.pt at the next step boundary on every
    rank and raise `Stopped` (`status` 128 + the signal's number); a second SIGINT aborts (KeyboardInterrupt).
    """
    if resume not in RESUME_MODES:
        raise SubmitError(f"resume={resume!r}: expected False, True or 'auto'")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    info, dev = init_distributed(pick_device(device))
    threads = torch.get_num_threads()
    error: BaseException | None = None
    try:
        cpu_threads(dev, recipe.data.workers)
        with _run_lock(out_dir, info), StopSignals() as signals:
            return _train(recipe, data_dir, out_dir, resume, dev, info, max_steps, progress, report_to, signals,
                          on_epoch)
    except BaseException as exc:
        error = exc
        raise
    finally:
        torch.set_num_threads(threads)
        if info.owns_group:
            release_group(error)
        error = None


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
        refused = gather_objects(refused, info)[0]
        if refused:
            raise SubmitError(refused)
        yield


def _train(recipe: Recipe, data_dir: Path, out_dir: Path, resume: bool | str, device: torch.device,
           info: DistInfo, max_steps: int | None, progress: bool, report_to: Sequence[str] = reporting.DEFAULT,
           signals: StopSignals | None = None, on_epoch: Callable[[dict, int], bool] | None = None) -> dict:
    """`train` inside the run lock: build (or resume) the run, write recipe.yaml, run the loop, summarise."""
    report_to = reporting.parse_report_to(report_to)
    last = out_dir / "last.pt"
    resuming = _on_main(lambda: _resuming(resume, last), info)  # rank 0 decides: every rank hears it
    trainer = _Trainer(recipe, data_dir, out_dir, device, info, resume_from=last if resuming else None)
    if signals is not None:
        trainer.signals = signals
    trainer.on_epoch = on_epoch

    def start_run() -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_recipe(out_dir, recipe)
        _log(_start_text(trainer) + (f"; resumed at step {trainer.state.step}" if resuming else ""))
        if trainer.resumed_from is not None and trainer.resumed_from[0] != info.world_size:
            processes, accum = trainer.resumed_from
            _log(f"resumed on {info.world_size} processes with accumulation {trainer.accum_steps} (global batch "
                 f"kept: {trainer.sampler.global_pairs} pairs; the run had {processes} processes x accum {accum}); "
                 f"random generators seeded from the seed, rank and step (its saved ones are for {processes})")
        if note := precision_note(device, recipe.train.precision):
            _log(note)

    _on_main(start_run, info)  # (also the barrier: no rank starts before recipe.yaml is written)
    start = time.perf_counter()
    trainer.reporter = reporting.open_reporter(report_to, out_dir, main=info.main, start_step=trainer.state.step,
                                               name=recipe.name, recipe=config.to_mapping(recipe))
    try:
        with loader_errors():  # a loader worker's error: its one line, not the worker's traceback
            trainer.run(max_steps, progress)
    finally:
        trainer.reporter.close()
        trainer.end_workers()
    return _summary(trainer, out_dir, time.perf_counter() - start)


def _resuming(resume: bool | str, last: Path) -> bool:
    """Whether this launch continues `last` (RUN_DIR/last.pt) under `train`'s `resume` rules, or its refusal."""
    exists = last.exists()
    if resume == "auto":
        return exists
    if not resume and restart_count() > 0 and (not exists or _written_by_this_job(last)):
        return exists  # torchrun restarted this job: continue its own checkpoint, or start afresh without one
    if exists and not resume:
        raise SubmitError(f"{last.parent}: already holds a run (last.pt); pass --resume (or --resume auto) "
                          "or choose another --out")
    if resume and not exists:
        raise SubmitError(f"{last}: nothing to resume (no checkpoint); --resume auto starts a new run then")
    return bool(resume)


def _written_by_this_job(last: Path) -> bool:
    """Whether `last` was saved by this torchrun job (before torchrun restarted it): its `launch` field."""
    job = launch_id()
    return job is not None and load_checkpoint(last, mmap=True).get("launch") == job


def _on_main(work: Any, info: DistInfo) -> Any:
    """`work()` on rank 0 only; every rank returns its result, or raises its SubmitError (so none waits at a
    collective for a rank 0 that stopped)."""
    result, refused = None, None
    if info.main:
        try:
            result = work()
        except SubmitError as exc:
            refused = str(exc)
    result, refused = gather_objects((result, refused), info)[0]
    if refused:
        raise SubmitError(refused)
    return result


def _start_text(trainer: _Trainer) -> str:
    """The opening log line: device and threads, images, global batch, LR, steps, validation."""
    recipe, device, info, sampler = trainer.recipe, trainer.device, trainer.info, trainer.sampler
    where = (f"{device}" if device.type != "cpu" else
             f"cpu, {torch.get_num_threads()} compute thread(s) + {recipe.data.workers} loader worker(s)")
    return (f"training {recipe.name} on {where}: {len(trainer.splits.train)} images, global batch "
            f"{sampler.global_pairs} pairs ({info.world_size} process(es)), lr {recipe.train.lr:g} for "
            f"that batch, {trainer.steps_per_epoch.total} steps; {trainer.splits.note}"
            + (f"; {sampler.skipped} single-image identities skipped" if sampler.skipped else ""))


def _summary(trainer: _Trainer, out_dir: Path, seconds: float) -> dict:
    """What `train` returns: steps, epochs, time, the best and last rows, the batch and process layout."""
    s, info = trainer.state, trainer.info
    scored = [r for r in s.history if r.get("mAP") is not None]
    best = max(scored, key=lambda r: r["mAP"]) if scored else None
    return {"run_dir": str(out_dir), "steps": s.step, "epochs": s.epoch, "seconds": seconds,
            "validation": trainer.splits.note, "best": best, "last": s.history[-1] if s.history else None,
            "world_size": info.world_size, "main": info.main, "accum_steps": trainer.accum_steps,
            "global_batch_pairs": trainer.sampler.global_pairs, "stopped_early": trainer.stopped_early}


# ---- train --ensemble: every member of a spec ------------------------------------------------------


def train_members(spec_path: str | Path, data_dir: str | Path, runs_dir: str | Path | None = None,
                  device: str | None = None, progress: bool = True, skip_finished: bool = False,
                  on_epoch: Callable[[str, dict, int], bool] | None = None) -> list[dict]:
    """Train every member that has a `train` block into its run dir; a run with `last.pt` is resumed.

    Resuming a finished run is a no-op, so re-running (the demo, a benchmark) retrains nothing; with
    `skip_finished` a finished run is not even opened (no lock taken), so several processes can share the runs.
    `on_epoch(run_dir, row, epochs)` is each run's epoch hook (`train`); a run it stops ends the loop (no later member).
    """
    spec = load_spec(spec_path, runs_dir, require_runs=False)
    results: list[dict] = []
    for member in spec.members:
        if member.train is None or (results and results[-1]["stopped_early"]):
            continue
        recipe = member_recipe(member, spec_path)
        run = Path(member.run or "")
        if skip_finished and finished(run, recipe):
            continue
        hook = None if on_epoch is None else functools.partial(on_epoch, str(run))
        results.append(train(recipe, data_dir, run, resume=(run / "last.pt").is_file(),
                             device=device, progress=progress, on_epoch=hook))
    if not any(member.train is not None for member in spec.members):
        raise SubmitError(f"{spec_path}: no member has a 'train' block, so there is nothing to train")
    return results


def finished(run_dir: Path, recipe: Recipe) -> bool:
    """Whether RUN_DIR's last.pt has trained all of `recipe`'s epochs (read memory-mapped: no weights loaded)."""
    last = run_dir / "last.pt"
    return last.is_file() and int(load_checkpoint(last, mmap=True)["state"]["epoch"]) >= recipe.train.epochs
