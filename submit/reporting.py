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
"""

from __future__ import annotations

import importlib
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from submit.errors import SubmitError, first_line
from submit.metrics import METRIC_KEYS

TARGETS = ("tensorboard", "wandb", "none")
DEFAULT = ("tensorboard",)
STEP_KEYS = ("loss", "lr", "temperature", "images_per_s")
VALIDATION_KEYS = METRIC_KEYS
TB_DIR = "tb"
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")  # the second its writer was opened comes first


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

    def __init__(self, run_dir: Path, start_step: int, recipe: Mapping[str, Any]) -> None:
        import yaml

        self.log_dir = Path(run_dir) / TB_DIR
        self.start_step = start_step
        self.recipe_text = yaml.safe_dump(dict(recipe), sort_keys=False)
        self._writer: Any = None

    def _get(self) -> Any:
        """The writer, created on first use; on resume it purges what a killed run logged after its checkpoint,
        on a fresh start everything a killed run logged before its first one, in a file that sorts last."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            earlier = _opened_at(self.log_dir)
            purge = self.start_step + 1 if self.start_step > 0 else (0 if earlier else None)
            if earlier:
                _wait_past(max(earlier))
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
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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

    def __init__(self, run_dir: Path, start_step: int, name: str, recipe: Mapping[str, Any]) -> None:
        self.run_dir, self.start_step, self.name, self.recipe = Path(run_dir), start_step, name, dict(recipe)
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


def _new_scores(row: Mapping[str, Any], start_step: int) -> bool:
    """A row with metrics that the run has not reported before: the event files of a resumed run already hold
    every record up to its checkpoint's step (the loop flushes before it checkpoints)."""
    return row.get("mAP") is not None and (start_step == 0 or int(row["step"]) > start_step)


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
            reporters.append(TensorBoardReporter(Path(run_dir), start_step, recipe))
        elif target == "wandb":
            reporters.append(WandbReporter(Path(run_dir), start_step, name, recipe))
    return reporters[0] if len(reporters) == 1 else MultiReporter(reporters)
