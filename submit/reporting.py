"""Training curves for the tools people already use: TensorBoard event files and (optionally) Weights & Biases.

The training loop talks to one `Reporter` in two places: `step` after every optimizer step (loss, learning
rate, temperature = CLIP's logit scale, images/s) and `validation` after each validated epoch (mAP, rank-1,
mINP, ...). `open_reporter` builds it from `--report-to` (`tensorboard`, `wandb`, `none`, comma-separated):

- `tensorboard`: event files in RUN_DIR/tb/ (`tensorboard --logdir RUNS`), tags `train/*` and `val/*`, the
  resolved recipe as text. The global step is the x axis. The loop flushes the reporter before it writes each
  checkpoint (`flush`), and writes an epoch's checkpoint after its validation is reported, so the event files
  hold every record up to the checkpoint's step; a resumed run opens its writer with
  `purge_step = resumed step + 1`, so what a killed run logged after its last checkpoint is dropped by every
  reader and logged again (a run started afresh where a killed one left events before its first checkpoint
  purges from step 0). Readers take a folder's event files in name order, which begins with the second the
  writer was opened, so a new writer waits for the next second when an earlier file bears this one. A resumed
  run thus leaves the event history of a run never interrupted (every step and every validation once).
- `wandb`: only when the `wandb` package is importable; offline (RUN_DIR/wandb/) unless WANDB_MODE is set.
  The run id is kept in RUN_DIR/tb/wandb-id so a resume continues the same W&B run.

Only rank 0 reports (other ranks get `NullReporter`); writers are created lazily on the first record, so
resuming a finished run leaves no empty event file behind.

A writer that cannot write (a full or read-only disk, at its opening, a record, a flush or its closing) never
ends the run: `open_reporter` wraps each one in `_Guarded`, the one place that catches its `OSError`, says so
once (`RUN/tb: cannot write TensorBoard events (No space left on device); training goes on without curves`),
releases it and ignores its later records; metrics.json, metrics.csv and the checkpoints are the loop's and go
on as before. TensorBoard's writer writes in a background thread, which stores its error for the next call
to raise and then dies; while an event writer is open, `_QUIET_WRITER_THREADS` keeps that thread from printing
the same error as a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from submit.errors import SubmitError, first_line
from submit.metrics import METRIC_KEYS

TARGETS = ("tensorboard", "wandb", "none")
DEFAULT = ("tensorboard",)
STEP_KEYS = ("loss", "lr", "temperature", "images_per_s")
VALIDATION_KEYS = METRIC_KEYS
TB_DIR = "tb"
WANDB_DIR = "wandb"
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")  # the second its writer was opened comes first
_LOG = logging.getLogger(__name__)  # the CLI prints the `submit` logger's lines on stderr


class Reporter(Protocol):
    """Where the training loop sends its numbers; every method is cheap and never raises for bad values."""

    def step(self, step: int, values: Mapping[str, float]) -> None:
        """Per-optimizer-step scalars (`STEP_KEYS`) at global step `step`."""

    def validation(self, row: Mapping[str, Any]) -> None:
        """One validated epoch's metrics row (keys `step`, `epoch` and `VALIDATION_KEYS`, None when skipped)."""

    def flush(self) -> None:
        """Put every record so far on disk (the loop calls it before writing a checkpoint)."""

    def close(self) -> None:
        """Flush and release files."""


class NullReporter:
    """Reports nothing: `--report-to none`, ranks other than 0, and trainers built outside `train`."""

    def step(self, step: int, values: Mapping[str, float]) -> None:
        """Ignore the step."""

    def validation(self, row: Mapping[str, Any]) -> None:
        """Ignore the validation row."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to release."""


class TensorBoardReporter:
    """Event files in RUN_DIR/tb/ through tensorboard's SummaryWriter (via torch.utils.tensorboard)."""

    records, without = "TensorBoard events", "curves"  # for `_Guarded`'s line

    def __init__(self, run_dir: Path, start_step: int, recipe: Mapping[str, Any]) -> None:
        import yaml

        self.log_dir = self.folder = Path(run_dir) / TB_DIR
        self.start_step = start_step
        self.recipe_text = yaml.safe_dump(dict(recipe), sort_keys=False)
        self._writer: Any = None
        self._quiet = False  # whether this reporter holds `_QUIET_WRITER_THREADS`

    def _get(self) -> Any:
        """The writer, created on first use; on resume it purges what a killed run logged after its checkpoint,
        on a fresh start everything a killed run logged before its first one, in a file that sorts last."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            earlier = _opened_at(self.log_dir)
            purge = self.start_step + 1 if self.start_step > 0 else (0 if earlier else None)
            if earlier:
                _wait_past(max(earlier))
            if not self._quiet:  # before the writer's thread starts: its first write may already fail
                _QUIET_WRITER_THREADS.acquire()
                self._quiet = True
            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge)
            if self.start_step == 0:
                self._writer.add_text("recipe", f"```yaml\n{self.recipe_text}```", global_step=0)
        return self._writer

    def step(self, step: int, values: Mapping[str, float]) -> None:
        """Write `train/<key>` scalars at `step`."""
        writer = self._get()
        for key in STEP_KEYS:
            if values.get(key) is not None:
                writer.add_scalar(f"train/{key}", float(values[key]), global_step=step)

    def validation(self, row: Mapping[str, Any]) -> None:
        """Write `val/<metric>` scalars at the row's step (rows without metrics write nothing)."""
        if not _new_scores(row, self.start_step):
            return
        writer = self._get()
        for key in VALIDATION_KEYS:
            if row.get(key) is not None:
                writer.add_scalar(f"val/{key}", float(row[key]), global_step=int(row["step"]))
        writer.flush()  # a validation is rare and worth keeping if the run is killed next

    def flush(self) -> None:
        """Write the queued events to the event file (nothing when no writer was opened)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        finally:
            self._unquiet()

    def abandon(self) -> None:
        """Release the writer after it failed, whatever else fails now (its thread may be dead already)."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                _quietly(writer.close)
        finally:
            self._unquiet()

    def _unquiet(self) -> None:
        """Give back `_QUIET_WRITER_THREADS` if this reporter holds it."""
        if self._quiet:
            self._quiet = False
            _QUIET_WRITER_THREADS.release()


class _QuietWriterThreads:
    """A `threading.excepthook`, installed while TensorBoard writers are open, that keeps the error of a dying
    event-writer thread from being printed as a traceback: the thread stores it (`exception`) for its writer's
    next call to raise in the caller's thread, where `_Guarded` reports it in one line. Every other thread's
    error goes to the hook that was there before."""

    def __init__(self) -> None:
        self.users = 0
        self.previous: Any = None

    def hook(self, args: Any) -> None:
        """Drop an error the writer thread kept for its caller; hand on anything else."""
        thread = args.thread
        if type(thread).__name__ == "_AsyncWriterThread" and getattr(thread, "exception", None) is args.exc_value:
            return
        (self.previous or threading.__excepthook__)(args)

    def acquire(self) -> None:
        """One more open writer: install the hook for the first."""
        if self.users == 0:
            self.previous, threading.excepthook = threading.excepthook, self.hook
        self.users += 1

    def release(self) -> None:
        """One writer fewer: after the last, wait for failed writer threads to end (their hook call included),
        then put the previous hook back unless someone replaced ours meanwhile."""
        self.users = max(self.users - 1, 0)
        if self.users:
            return
        for thread in threading.enumerate():
            if type(thread).__name__ == "_AsyncWriterThread" and getattr(thread, "exception", None) is not None:
                thread.join(timeout=5)
        if threading.excepthook == self.hook:
            threading.excepthook = self.previous
        self.previous = None


_QUIET_WRITER_THREADS = _QuietWriterThreads()


def _opened_at(log_dir: Path) -> list[int]:
    """The seconds at which the event files already in `log_dir` were opened (from their names)."""
    try:
        names = [p.name for p in log_dir.iterdir()]
    except OSError:  # no folder yet
        return []
    return [int(m.group(1)) for m in map(_EVENT_FILE.match, names) if m]


def _wait_past(second: int, most: float = 2.0) -> None:
    """Sleep until the clock is past `second` (at most `most` seconds: a file from a clock ahead of this one is
    not waited for), so a file opened next sorts after one opened then."""
    deadline = time.time() + most
    while int(time.time()) <= second and time.time() < deadline:
        time.sleep(0.02)


class WandbReporter:
    """A Weights & Biases run (offline unless WANDB_MODE says otherwise), resumed under the same id."""

    records, without = "W&B records", "W&B"  # for `_Guarded`'s line

    def __init__(self, run_dir: Path, start_step: int, name: str, recipe: Mapping[str, Any]) -> None:
        self.run_dir, self.start_step, self.name, self.recipe = Path(run_dir), start_step, name, dict(recipe)
        self.folder = self.run_dir / WANDB_DIR
        self._run: Any = None

    def _get(self) -> Any:
        """The W&B run, started on first use."""
        if self._run is None:
            wandb = importlib.import_module("wandb")
            id_file = self.run_dir / TB_DIR / "wandb-id"
            id_file.parent.mkdir(parents=True, exist_ok=True)
            if not id_file.is_file():
                id_file.write_text(wandb.util.generate_id())
            self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "reident-submit"), name=self.name,
                                   id=id_file.read_text().strip(), resume="allow", dir=str(self.run_dir),
                                   config=self.recipe, mode=os.environ.get("WANDB_MODE", "offline"))
        return self._run

    def step(self, step: int, values: Mapping[str, float]) -> None:
        """Log `train/<key>` at `step`."""
        self._get().log({f"train/{k}": float(values[k]) for k in STEP_KEYS if values.get(k) is not None}, step=step)

    def validation(self, row: Mapping[str, Any]) -> None:
        """Log `val/<metric>` at the row's step."""
        if _new_scores(row, self.start_step):
            self._get().log({f"val/{k}": float(row[k]) for k in VALIDATION_KEYS if row.get(k) is not None},
                            step=int(row["step"]))

    def flush(self) -> None:
        """W&B writes its own files as it goes: nothing to do."""

    def close(self) -> None:
        """Finish the W&B run."""
        if self._run is not None:
            self._run.finish()
            self._run = None

    def abandon(self) -> None:
        """Let go of the W&B run after it failed, whatever else fails now."""
        run, self._run = self._run, None
        if run is not None:
            _quietly(run.finish)


def _quietly(release: Callable[[], Any]) -> None:
    """Call `release` (close a failed writer) and ignore what it raises: the failure was reported once already."""
    try:
        release()
    except Exception:  # noqa: BLE001 - what is left of a failed writer is released quietly
        pass


def _new_scores(row: Mapping[str, Any], start_step: int) -> bool:
    """A row with metrics that the run has not reported before: the event files of a resumed run already hold
    every record up to its checkpoint's step (the loop flushes before it checkpoints)."""
    return row.get("mAP") is not None and (start_step == 0 or int(row["step"]) > start_step)


class _Writer(Reporter, Protocol):
    """A reporter that writes files of its own: what `_Guarded` names and how it lets go after a failure."""

    folder: Path  # where it writes, named in the line
    records: str  # what it writes ("TensorBoard events")
    without: str  # what the run goes on without ("curves")

    def abandon(self) -> None:
        """Release files and threads after a failure; never raises."""


class _Guarded:
    """The one place a writer's disk error ends: its first `OSError` (a full or read-only disk at its opening,
    a record, a flush or its closing) is logged once, `FOLDER: cannot write WHAT (reason); training goes on
    without ...`, the writer is abandoned and every later call is ignored. The run goes on: metrics.json,
    metrics.csv and the checkpoints are written by the loop, not by a reporter."""

    def __init__(self, writer: _Writer) -> None:
        self.writer: _Writer | None = writer

    def _do(self, call: str, *args: Any) -> None:
        writer = self.writer
        if writer is None:
            return
        try:
            getattr(writer, call)(*args)
        except OSError as exc:
            self.writer = None
            reason = exc.strerror or first_line(exc)
            _LOG.warning("%s: cannot write %s (%s); training goes on without %s", writer.folder, writer.records,
                         reason, writer.without)
            writer.abandon()

    def step(self, step: int, values: Mapping[str, float]) -> None:
        """The writer's `step`, unless it failed before."""
        self._do("step", step, values)

    def validation(self, row: Mapping[str, Any]) -> None:
        """The writer's `validation`, unless it failed before."""
        self._do("validation", row)

    def flush(self) -> None:
        """The writer's `flush`, unless it failed before."""
        self._do("flush")

    def close(self) -> None:
        """The writer's `close`, unless it failed before (then it was released already)."""
        self._do("close")
        self.writer = None


class MultiReporter:
    """Sends every record to several reporters."""

    def __init__(self, reporters: Sequence[Reporter]) -> None:
        self.reporters = list(reporters)

    def step(self, step: int, values: Mapping[str, float]) -> None:
        """Forward the step to each reporter."""
        for reporter in self.reporters:
            reporter.step(step, values)

    def validation(self, row: Mapping[str, Any]) -> None:
        """Forward the validation row to each reporter."""
        for reporter in self.reporters:
            reporter.validation(row)

    def flush(self) -> None:
        """Flush each reporter."""
        for reporter in self.reporters:
            reporter.flush()

    def close(self) -> None:
        """Close each reporter."""
        for reporter in self.reporters:
            reporter.close()


def parse_report_to(value: str | Sequence[str] | None, where: str = "--report-to") -> tuple[str, ...]:
    """`tensorboard,wandb` -> ('tensorboard', 'wandb'); checks names and that the packages import."""
    if value is None:
        return DEFAULT
    if not isinstance(value, str) and not list(value):
        return ()  # already parsed: `--report-to none` is the empty tuple (train() parses what the CLI parsed)
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(item.strip().lower() for item in items if item.strip()))
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        shown = value if isinstance(value, str) else ",".join(value)
        raise SubmitError(f"{where} {shown!r}: expected a comma-separated list of {', '.join(TARGETS)}")
    if "none" in names:
        if len(names) > 1:
            raise SubmitError(f"{where}: 'none' cannot be combined with {', '.join(n for n in names if n != 'none')}")
        return ()
    for name, package, hint in (("tensorboard", "torch.utils.tensorboard", "pip install tensorboard"),
                                ("wandb", "wandb", "pip install wandb")):
        if name in names:
            _require(package, f"{where} {name}", hint)
    return names


def _require(module: str, what: str, hint: str) -> None:
    """Import `module` or raise a one-line error saying how to get it."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise SubmitError(f"{what}: the package is not installed ({first_line(exc)}); {hint}, "
                          "or choose another --report-to") from None


def open_reporter(targets: Sequence[str], run_dir: str | Path, *, main: bool, start_step: int, name: str,
                  recipe: Mapping[str, Any]) -> Reporter:
    """The reporter for `targets` (from `parse_report_to`); rank != 0 and an empty list get a NullReporter."""
    if not main or not targets:
        return NullReporter()
    reporters: list[Reporter] = []
    for target in targets:
        if target == "tensorboard":
            reporters.append(_Guarded(TensorBoardReporter(Path(run_dir), start_step, recipe)))
        elif target == "wandb":
            reporters.append(_Guarded(WandbReporter(Path(run_dir), start_step, name, recipe)))
    return reporters[0] if len(reporters) == 1 else MultiReporter(reporters)
